"""digits-10 end to end: the plain-PyTorch floor, Flower and fedledger, side by side.

The digits-10 split (sklearn's digits, a stratified 20% test set, the rest over 10 clients by a
Dirichlet(0.5) label partition, seed 0), the MLP 64-32-10 initialised from seed 0, and in
every round all clients train one local epoch of SGD (lr 0.05, batch 32) from the global model.
Client k shuffles its batches in round r with seed k * 1_000_003 + r, as fedledger's nodes do,
so every variant starts from the same updates. Variants:

- ``floor``: FedAvg in one process, plain PyTorch, no framework;
- ``flwr``: Flower's FedAvg, its (legacy, gRPC) server in one process and one process per
  client on loopback, the server evaluating the global model after each round (no Ray);
- ``embedded``: fedledger on the in-process EVM: the coordinator under uvicorn and the nodes
  as threads of one process (``fedledger demo``'s path, ``fedledger.demo.run_demo``);
- ``anvil``: fedledger on anvil: ``fedledger coordinator serve`` and one ``fedledger node run``
  process per organisation, over HTTP on loopback.

fedledger runs with the coordinator's defaults: it screens, clips (3x the median norm), leaves
out updates with a negative Shapley value and then aggregates by FedAvg; accuracy is the
coordinator's validation accuracy, measured on the test set above.

Each variant runs in a fresh process, so peak memory (ru_maxrss, or VmHWM for anvil) is its own;
process trees report every process. fedledger's time is broken down by wrapping, in the
benchmark's processes only, the functions the coordinator and nodes call (training, HTTP,
chain transactions and reads, verification, aggregation, Shapley valuation): no fedledger
file is changed. Round wall time is the mean over rounds 2..R (round 1 includes start-up).

Usage: python bench/digits10.py [--quick] [--rounds 30] [--variants floor flwr embedded anvil]
       [--plot FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import itertools
import json
import logging
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedledger.tasks import DigitsTask

SCRIPT = Path(__file__).resolve()
VARIANTS = ("floor", "flwr", "embedded", "anvil")
ALPHA = 0.5
SEED = 0
LR = 0.05
BATCH_SIZE = 32
EPOCHS = 1
SPEC = Path(__file__).with_name("digits10.toml")
"""fedledger's spec of the same training (the digits task, EPOCHS local epochs, LR, BATCH_SIZE)."""
ROUND_SEED_STRIDE = 1_000_003  # client k, round r: seed k * stride + r (fedledger's node runner)
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


@dataclass
class VariantResult:
    """What one variant measured; ``status`` is "ok" or why it did not run."""

    name: str
    status: str = "ok"
    accuracies: list[float] = field(default_factory=list)  # test accuracy after each round
    round_s: list[float] = field(default_factory=list)  # wall time of each round
    total_s: float = 0.0  # first process start to the last round's model, start-up included
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # process -> peak RSS
    # Rounds 2..R: seconds and calls per round, role -> part (start-up and round 1 left out).
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    calls: dict[str, dict[str, float]] = field(default_factory=dict)
    processes: int = 1
    failed_rounds: list[int] = field(default_factory=list)  # closed without a new model
    notes: list[str] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float | None:
        return self.accuracies[-1] if self.accuracies else None

    @property
    def steady_round_s(self) -> float | None:
        """Mean wall time of rounds 2..R (of round 1 when there is only one)."""
        steady = self.round_s[1:] or self.round_s
        return statistics.fmean(steady) if steady else None


# ----------------------------------------------------------------------------- training


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> None:
    """``EPOCHS`` epochs of minibatch SGD on (x, y), batches shuffled by ``seed``: plain PyTorch."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(int(y.shape[0]), generator=generator)
        for start in range(0, int(y.shape[0]), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimiser.zero_grad(set_to_none=True)
            loss: torch.Tensor = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).to(torch.float64).mean())


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_floor(rounds: int, clients: int) -> VariantResult:
    """FedAvg with no framework: w <- sum_k (n_k / n) w_k over all clients, every round."""
    started = time.perf_counter()
    torch.set_num_threads(1)
    task = DigitsTask()
    model = task.build_model(seed=SEED)
    data = [task.partition(k, clients, alpha=ALPHA, seed=SEED) for k in range(clients)]
    x_test, y_test = task.validation_data(seed=SEED)
    sizes = [int(y.shape[0]) for _, y in data]
    total = sum(sizes)
    global_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    result = VariantResult("floor")
    train_s: list[float] = []
    aggregate_s: list[float] = []
    for round_id in range(1, rounds + 1):
        round_start = time.perf_counter()
        states = []
        for k, (x, y) in enumerate(data):
            model.load_state_dict(global_state)
            local_sgd(model, x, y, seed=k * ROUND_SEED_STRIDE + round_id)
            states.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        mid = time.perf_counter()
        global_state = {
            n: sum(
                (s[n] * (size / total) for s, size in zip(states, sizes, strict=True)),
                torch.zeros_like(global_state[n]),
            )
            for n in global_state
        }
        aggregate_s.append(time.perf_counter() - mid)
        train_s.append(mid - round_start)
        model.load_state_dict(global_state)
        result.accuracies.append(accuracy(model, x_test, y_test))
        result.round_s.append(time.perf_counter() - round_start)
    result.total_s = time.perf_counter() - started
    result.breakdown = {
        "process": {
            "training": statistics.fmean(train_s[1:] or train_s),
            "aggregation": statistics.fmean(aggregate_s[1:] or aggregate_s),
        }
    }
    result.peak_rss_mib = {"process": peak_rss_mib()}
    return result


# ------------------------------------------------------------------------------- timers

_RECORDS: list[tuple[str, float, float]] = []  # ("role/part", unix start, seconds)
_EVENTS: list[tuple[str, int, float]] = []  # ("open" | "close", round_id, unix time)
_ROLE: str | None = None  # fixed per process, or by thread name when None (embedded)
_TIMER_LOCK = threading.Lock()
_ORIGINALS: list[tuple[Any, str, Any]] = []  # what install_timers replaced, to put it back
_OUTCOMES: dict[int, dict[str, Any]] = {}  # round_id -> the coordinator's recorded result


def _record(part: str, start_unix: float, seconds: float) -> None:
    with _TIMER_LOCK:
        _RECORDS.append((f"{_current_role()}/{part}", start_unix, seconds))


def _current_role() -> str:
    if _ROLE is not None:
        return _ROLE
    name = threading.current_thread().name
    if name.startswith("node-"):
        return "nodes"
    if name == "MainThread":
        return "driver"
    return "coordinator"


def _wrap(owner: Any, attr: str, part: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start_unix, started = time.time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _record(part, start_unix, time.perf_counter() - started)

    _ORIGINALS.append((owner, attr, original))
    setattr(owner, attr, timed)


def _mark(owner: Any, attr: str, event: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def marked(self: Any, round_id: int, *args: Any, **kwargs: Any) -> Any:
        out = original(self, round_id, *args, **kwargs)
        with _TIMER_LOCK:
            _EVENTS.append((event, int(round_id), time.time()))
        return out

    _ORIGINALS.append((owner, attr, original))
    setattr(owner, attr, marked)


def _observe(owner: Any, attr: str) -> None:
    """Keep the result the coordinator records when it closes a round (``set_round_status``)."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def observed(self: Any, round_id: int, status: str, *args: Any, **kwargs: Any) -> Any:
        out = original(self, round_id, status, *args, **kwargs)
        recorded = kwargs.get("result")
        if recorded is not None:
            with _TIMER_LOCK:
                _OUTCOMES[int(round_id)] = recorded
        return out

    _ORIGINALS.append((owner, attr, original))
    setattr(owner, attr, observed)


def accuracy_series(
    outcomes: dict[int, dict[str, Any]], rounds: int
) -> tuple[list[float], list[int]]:
    """Validation accuracy after each round and the rounds that failed; a failed round keeps
    the previous model, so it keeps the previous accuracy."""
    accuracies: list[float] = []
    failed: list[int] = []
    for round_id in range(1, rounds + 1):
        outcome = outcomes.get(round_id, {})
        value = outcome.get("validation_accuracy")
        if value is None:
            failed.append(round_id)
            value = accuracies[-1] if accuracies else float("nan")
        accuracies.append(float(value))
    return accuracies, failed


def install_timers() -> None:
    """Time the functions fedledger's coordinator and nodes call, in this process only."""
    from fedledger.coordinator import books, rounds
    from fedledger.coordinator.rounds import RoundMachine
    from fedledger.coordinator.service import RoundService
    from fedledger.coordinator.store import Store
    from fedledger.incentive.ledger import LedgerClient
    from fedledger.incentive.shapley import ExactShapley
    from fedledger.node import runner
    from fedledger.node.client import CoordinatorClient
    from fedledger.tasks import base

    _wrap(base, "train_local", "training")
    _wrap(runner, "encode_tensors", "serialise + hash update")
    _wrap(runner, "sign_upload", "sign upload (EIP-712)")
    _wrap(CoordinatorClient, "model", "HTTP: model download")
    _wrap(CoordinatorClient, "upload", "HTTP: upload (incl. verification)")
    _wrap(CoordinatorClient, "current_round", "HTTP: polling")
    _wrap(LedgerClient, "_send", "chain: transactions")
    _wrap(LedgerClient, "_view", "chain: reads")
    _wrap(LedgerClient, "commit_order", "chain: commit-order log query")
    _wrap(RoundService, "admit_upload", "upload check: headers, chain")
    _wrap(RoundService, "store_upload", "upload check: body, store")
    _wrap(rounds, "close_books", "pricing (screen, value, aggregate)")
    _wrap(books, "aggregate", "aggregation")
    _wrap(ExactShapley, "value", "Shapley valuation")
    _wrap(books, "evaluate_params", "evaluation")
    _wrap(Store, "put_blob", "store writes")
    _wrap(RoundMachine, "close", "round close (all)")
    _mark(RoundMachine, "open_round", "open")
    _mark(RoundMachine, "close", "close")
    _observe(Store, "set_round_status")


@contextlib.contextmanager
def timers() -> Iterator[None]:
    """``install_timers`` for the duration of the block, with fresh records; then undone."""
    with _TIMER_LOCK:
        _RECORDS.clear()
        _EVENTS.clear()
        _OUTCOMES.clear()
    install_timers()
    try:
        yield
    finally:
        while _ORIGINALS:
            owner, attr, original = _ORIGINALS.pop()
            setattr(owner, attr, original)


def timer_report() -> dict[str, Any]:
    with _TIMER_LOCK:
        return {
            "records": list(_RECORDS),
            "events": list(_EVENTS),
            "outcomes": dict(_OUTCOMES),
            "peak_rss_mib": peak_rss_mib(),
        }


def per_round(
    records: Sequence[Sequence[Any]], *, since: float, rounds: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Seconds and calls per round by role and part, over the calls that started at ``since``
    (unix time) or later, spread over ``rounds`` rounds."""
    seconds: dict[str, dict[str, float]] = defaultdict(dict)
    calls: dict[str, dict[str, float]] = defaultdict(dict)
    for key, start_unix, duration in records:
        if float(start_unix) < since:
            continue
        role, part = str(key).split("/", 1)
        seconds[role][part] = seconds[role].get(part, 0.0) + float(duration) / rounds
        calls[role][part] = calls[role].get(part, 0.0) + 1.0 / rounds
    return dict(seconds), dict(calls)


def _steady(events: Sequence[Sequence[Any]], rounds: int) -> tuple[float, int]:
    """Where rounds 2..R start (round 1's close, unix time) and how many they are; round 1
    itself when it is the only one."""
    if rounds < 2:
        return 0.0, 1
    closed = [float(t) for e, r, t in events if e == "close" and int(r) == 1]
    return (closed[0] if closed else 0.0), rounds - 1


def _round_times(events: Sequence[Sequence[Any]], rounds: int) -> tuple[list[float], float]:
    """Each round's wall time from the coordinator's open/close marks: round 1 open to close,
    then close to close (the next round's opening included); and round 1's opening time."""
    opened = {int(r): float(t) for e, r, t in events if e == "open"}
    closed = {int(r): float(t) for e, r, t in events if e == "close"}
    marks = [opened.get(1, 0.0)] + [closed.get(r, float("nan")) for r in range(1, rounds + 1)]
    return [b - a for a, b in itertools.pairwise(marks)], opened.get(1, 0.0)


# --------------------------------------------------------------------- fedledger: embedded


def run_embedded(rounds: int, clients: int) -> VariantResult:
    """``fedledger demo``'s path: in-process EVM, coordinator under uvicorn, nodes as threads."""
    from rich.console import Console

    from fedledger.demo import run_demo

    started = time.perf_counter()
    start_unix = time.time()
    # The demo quietens the "fedledger" logger; its coordinator and node warnings (a missed
    # deadline, a refused upload) are worth keeping in this variant's log.
    loggers = [logging.getLogger(n) for n in ("fedledger.coordinator", "fedledger.node")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with timers():
            run_demo(
                organisations=clients,
                rounds=rounds,
                chain="embedded",
                spec=SPEC,
                seed=SEED,
                console=Console(file=io.StringIO()),
            )
            report = timer_report()
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    round_s, first_open = _round_times(report["events"], rounds)
    accuracies, failed = accuracy_series(report["outcomes"], rounds)
    result = VariantResult("embedded", accuracies=accuracies, round_s=round_s, failed_rounds=failed)
    result.total_s = time.perf_counter() - started
    since, steady_rounds = _steady(report["events"], rounds)
    result.breakdown, result.calls = per_round(report["records"], since=since, rounds=steady_rounds)
    result.peak_rss_mib = {"process (chain, coordinator, nodes)": peak_rss_mib()}
    result.notes.append(
        f"start-up before round 1 opened (chain, deployment): {first_open - start_unix:.1f} s"
    )
    return result


# ------------------------------------------------------------------------ process helpers


def _spawn(
    role: str, args: Sequence[str], log: Path, timings: Path | None = None
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(SCRIPT), "--role", role]
    if timings is not None:
        cmd += ["--timings", str(timings)]
    cmd += ["--", *args]
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV},
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_all(procs: Sequence[tuple[str, subprocess.Popen[bytes], Path]], deadline: float) -> None:
    """Wait for every process to exit 0 by ``deadline`` (monotonic); raise with its log if not."""
    for name, proc, log in procs:
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} did not finish in time; its log:\n{_tail(log)}") from None
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}; its log:\n{_tail(log)}")


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Kill whatever is still running of ``procs`` on the way out (only our own children)."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _load_timings(path: Path) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------ fedledger: anvil


def run_anvil(rounds: int, clients: int, workdir: Path) -> VariantResult:
    """anvil, ``fedledger coordinator serve`` and ``clients`` x ``fedledger node run`` processes."""
    import httpx

    from fedledger.devnet.anvil import free_port, start_anvil
    from fedledger.devnet.deploy import deploy_devnet
    from fedledger.incentive.chain import connect
    from fedledger.tasks import load_spec

    started = time.perf_counter()
    start_unix = time.time()
    anvil = start_anvil(accounts=clients + 2)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        deployment = deploy_devnet(
            connect(anvil.rpc_url), clients, rpc_url=anvil.rpc_url, task_spec=load_spec(SPEC).hash
        )
        deployment_file = workdir / "deployment.json"
        deployment.save(deployment_file)
        assert deployment.accounts is not None
        coordinator_key = deployment.accounts.coordinator.private_key
        assert coordinator_key is not None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        coordinator_timings = workdir / "coordinator.json"
        coordinator_log = workdir / "coordinator.log"
        coordinator = _spawn(
            "coordinator",
            [
                "coordinator", "serve",
                "--deployment", str(deployment_file),
                "--key", coordinator_key,
                "--data-dir", str(workdir / "coordinator"),
                "--spec", str(SPEC),
                "--port", str(port),
                "--rounds", str(rounds),
            ],
            coordinator_log,
            coordinator_timings,
        )  # fmt: skip
        procs.append(coordinator)
        with _reaped(procs):
            deadline = time.monotonic() + 120
            while True:
                if coordinator.poll() is not None:
                    raise RuntimeError(f"the coordinator exited:\n{_tail(coordinator_log)}")
                try:
                    if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the coordinator did not answer:\n{_tail(coordinator_log)}")
                time.sleep(0.1)
            nodes = []
            for k, org in enumerate(deployment.accounts.organisations):
                assert org.private_key is not None
                log = workdir / f"node{k}.log"
                proc = _spawn(
                    "node",
                    [
                        "node", "run",
                        "--coordinator", url,
                        "--deployment", str(deployment_file),
                        "--key", org.private_key,
                        "--spec", str(SPEC),
                        "--data", f"{k}/{clients}",
                        "--seed", str(SEED * 1000 + k),
                    ],
                    log,
                    workdir / f"node{k}.json",
                )  # fmt: skip
                procs.append(proc)
                nodes.append((f"node {k}", proc, log))
            _wait_all(nodes, time.monotonic() + 120 + 60 * rounds)
            trained_s = time.perf_counter() - started
            with httpx.Client(base_url=f"{url}/v1", timeout=30) as client:
                outcomes = [client.get(f"/rounds/{r}").json() for r in range(1, rounds + 1)]
            anvil_peak = _vm_hwm_mib(anvil.pid)
            coordinator.send_signal(signal.SIGTERM)
            _wait_all([("coordinator", coordinator, coordinator_log)], time.monotonic() + 60)
    finally:
        anvil.stop()

    result = VariantResult("anvil", processes=clients + 2)
    result.accuracies, result.failed_rounds = accuracy_series(
        {int(o["round_id"]): o for o in outcomes}, rounds
    )
    result.total_s = trained_s
    report = _load_timings(coordinator_timings) or {}
    result.round_s, first_open = _round_times(report.get("events", []), rounds)
    result.notes.append(
        f"start-up before round 1 opened (anvil, deployment, coordinator): "
        f"{first_open - start_unix:.1f} s"
    )
    records: list[Sequence[Any]] = []
    node_peaks = []
    for path in [coordinator_timings] + [workdir / f"node{k}.json" for k in range(clients)]:
        part = _load_timings(path)
        if part is None:
            result.notes.append(f"no timings from {path.stem}")
            continue
        records.extend(part["records"])
        if path.stem.startswith("node"):
            node_peaks.append(float(part["peak_rss_mib"]))
        else:
            result.peak_rss_mib["coordinator"] = float(part["peak_rss_mib"])
    since, steady_rounds = _steady(report.get("events", []), rounds)
    result.breakdown, result.calls = per_round(records, since=since, rounds=steady_rounds)
    if node_peaks:
        result.peak_rss_mib["node (max)"] = max(node_peaks)
        result.peak_rss_mib["nodes (sum)"] = sum(node_peaks)
    if anvil_peak is not None:
        result.peak_rss_mib["anvil"] = anvil_peak
    result.peak_rss_mib["driver"] = peak_rss_mib()
    result.peak_rss_mib["all processes (sum)"] = (
        result.peak_rss_mib.get("coordinator", 0.0)
        + result.peak_rss_mib.get("nodes (sum)", 0.0)
        + (anvil_peak or 0.0)
        + result.peak_rss_mib["driver"]
    )
    return result


# -------------------------------------------------------------------------------- Flower


def run_flwr(rounds: int, clients: int, workdir: Path) -> VariantResult:
    """Flower's FedAvg: its gRPC server here, one client process per organisation."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    from fedledger.devnet.anvil import free_port

    started = time.perf_counter()
    torch.set_num_threads(1)
    task = DigitsTask()
    model = task.build_model(seed=SEED)
    names = list(model.state_dict())
    x_test, y_test = task.validation_data(seed=SEED)
    marks: list[float] = []  # unix time of each evaluation: round 0 (initial model), 1, 2, ...
    accuracies: list[float] = []

    def evaluate(
        server_round: int, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        del config
        marks.append(time.time())
        model.load_state_dict(
            {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, parameters, strict=True)}
        )
        acc = accuracy(model, x_test, y_test)
        if server_round > 0:
            accuracies.append(acc)
        return 0.0, {"accuracy": acc}

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_evaluate_clients=0,
        min_available_clients=clients,
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda r: {"server_round": r},
        initial_parameters=ndarrays_to_parameters(
            [t.detach().numpy().copy() for t in model.state_dict().values()]
        ),
    )
    address = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    for k in range(clients):
        log = workdir / f"client{k}.log"
        procs.append(
            _spawn(
                "flwr-client",
                ["--server", address, "--index", str(k), "--clients", str(clients)],
                log,
                workdir / f"client{k}.json",
            )
        )
        logs.append(log)
    with _reaped(procs):
        start_server(
            server_address=address, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        trained_s = time.perf_counter() - started
        _wait_all(
            [(f"client {k}", p, log) for k, (p, log) in enumerate(zip(procs, logs, strict=True))],
            time.monotonic() + 60,
        )
    # marks: round-0 evaluation (clients may not be connected yet), then one per round.
    result = VariantResult("flwr", processes=clients + 1, accuracies=accuracies)
    result.round_s = [b - a for a, b in itertools.pairwise(marks[: rounds + 1])]
    result.total_s = trained_s
    records: list[Sequence[Any]] = []
    peaks = []
    for k in range(clients):
        part = _load_timings(workdir / f"client{k}.json")
        if part is None:
            result.notes.append(f"no timings from client {k}")
            continue
        records.extend(part["records"])
        peaks.append(float(part["peak_rss_mib"]))
    since, steady_rounds = (marks[1], rounds - 1) if rounds > 1 and len(marks) > 1 else (0.0, 1)
    result.breakdown, result.calls = per_round(records, since=since, rounds=steady_rounds)
    result.peak_rss_mib = {"server": peak_rss_mib()}
    if peaks:
        result.peak_rss_mib["client (max)"] = max(peaks)
        result.peak_rss_mib["clients (sum)"] = sum(peaks)
        result.peak_rss_mib["all processes (sum)"] = peak_rss_mib() + sum(peaks)
    return result


def flwr_client_main(args: Sequence[str]) -> int:
    """One Flower client process: NumPyClient over the legacy gRPC transport."""
    from flwr.client import NumPyClient, start_client

    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    opts = parser.parse_args(list(args))
    torch.set_num_threads(1)
    task = DigitsTask()
    model = task.build_model(seed=SEED)
    names = list(model.state_dict())
    x, y = task.partition(opts.index, opts.clients, alpha=ALPHA, seed=SEED)

    class DigitsClient(NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return [t.detach().numpy().copy() for t in model.state_dict().values()]

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            model.load_state_dict(
                {
                    n: torch.from_numpy(np.asarray(a).copy())
                    for n, a in zip(names, parameters, strict=True)
                }
            )
            start_unix, started = time.time(), time.perf_counter()
            local_sgd(
                model, x, y, seed=opts.index * ROUND_SEED_STRIDE + int(config["server_round"])
            )
            _record("training", start_unix, time.perf_counter() - started)
            return self.get_parameters({}), int(y.shape[0]), {}

    start_client(server_address=opts.server, client=DigitsClient().to_client())
    return 0


# ----------------------------------------------------------------------------- roles


def role_main(argv: Sequence[str]) -> int:
    """Entry point of the benchmark's own child processes (``--role ROLE ... -- ARGS``)."""
    global _ROLE
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True)
    parser.add_argument("--timings", type=Path)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    opts = parser.parse_args(list(argv))
    rest = opts.rest[1:] if opts.rest[:1] == ["--"] else opts.rest
    if opts.role == "variant":
        return _variant_main(opts.variant, opts.rounds, opts.clients, opts.result, opts.workdir)
    # SIGTERM: uvicorn handles it, then raises it again on the handler it found; that one
    # must let the process return normally, so that the timings below get written.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        if opts.role == "flwr-client":
            _ROLE = "clients"
            return flwr_client_main(rest)
        import typer

        from fedledger.cli import app

        _ROLE = "nodes" if opts.role == "node" else opts.role
        install_timers()
        typer.main.get_command(app).main(args=rest, prog_name="fedledger", standalone_mode=False)
        return 0
    finally:
        if opts.timings is not None:
            opts.timings.write_text(json.dumps(timer_report()))


def _variant_main(variant: str, rounds: int, clients: int, result_file: Path, workdir: Path) -> int:
    runners: dict[str, Callable[[], VariantResult]] = {
        "floor": lambda: run_floor(rounds, clients),
        "flwr": lambda: run_flwr(rounds, clients, workdir),
        "embedded": lambda: run_embedded(rounds, clients),
        "anvil": lambda: run_anvil(rounds, clients, workdir),
    }
    result = runners[variant]()
    result_file.write_text(json.dumps(asdict(result)))
    return 0


def run_variant(
    name: str, rounds: int, clients: int, workdir: Path, *, in_process: bool = False
) -> VariantResult:
    """Run one variant in a fresh process and read back what it measured; with ``in_process``
    the single-process variants (floor, embedded) run here instead, faster to start, and their
    peak memory is then this process's."""
    if name == "flwr" and importlib.util.find_spec("flwr") is None:
        return VariantResult("flwr", status="flwr not installed (pip install -e '.[bench]')")
    if in_process and name in ("floor", "embedded"):
        threads = torch.get_num_threads()
        level = logging.getLogger("fedledger").level
        try:
            result = (
                run_floor(rounds, clients) if name == "floor" else run_embedded(rounds, clients)
            )
        finally:  # both set one torch thread; the demo quietens fedledger's logs
            torch.set_num_threads(threads)
            logging.getLogger("fedledger").setLevel(level)
        result.notes.append("ran inside the benchmark's process: peak RSS is that process's")
        return result
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    result_file = directory / "result.json"
    log = directory / "variant.log"
    cmd = [
        sys.executable, str(SCRIPT), "--role", "variant", "--variant", name,
        "--rounds", str(rounds), "--clients", str(clients),
        "--result", str(result_file), "--workdir", str(directory),
    ]  # fmt: skip
    with log.open("wb") as out:
        completed = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV}, check=False,
        )  # fmt: skip
    if completed.returncode != 0 or not result_file.exists():
        return VariantResult(name, status=f"failed (exit {completed.returncode}):\n{_tail(log)}")
    raw = json.loads(result_file.read_text())
    return VariantResult(**raw)


# ----------------------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str, width: int) -> str:
    return (f"{value:{spec}}" if value is not None else "-").rjust(width)


def print_summary(results: Sequence[VariantResult]) -> None:
    floor = next((r for r in results if r.name == "floor" and r.status == "ok"), None)
    header = (
        f"{'variant':<10} {'final acc':>9} {'Δ floor':>8} {'s/round':>8} {'median':>7} "
        f"{'total s':>8} {'procs':>5} {'peak RSS MiB':>13}  status"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.status != "ok":
            print(
                f"{r.name:<10} {'-':>9} {'-':>8} {'-':>8} {'-':>7} {'-':>8} {'-':>5} {'-':>13}  {r.status.splitlines()[0]}"
            )
            continue
        delta = (
            100 * (r.final_accuracy - floor.final_accuracy)
            if floor and r.final_accuracy is not None and floor.final_accuracy is not None
            else None
        )
        steady = r.round_s[1:] or r.round_s
        peak = r.peak_rss_mib.get("all processes (sum)", max(r.peak_rss_mib.values(), default=0.0))
        print(
            f"{r.name:<10} {_fmt(100 * r.final_accuracy if r.final_accuracy is not None else None, '.2f', 8)}%"
            f" {_fmt(delta, '+.2f', 8)} {_fmt(r.steady_round_s, '.3f', 8)} "
            f"{_fmt(statistics.median(steady) if steady else None, '.3f', 7)} "
            f"{r.total_s:>8.1f} {r.processes:>5} {peak:>13.0f}  ok"
        )
    print()
    for r in results:
        if r.status == "ok":
            peaks = ", ".join(f"{k} {v:.0f}" for k, v in r.peak_rss_mib.items())
            print(f"peak RSS (MiB) of {r.name}: {peaks}")
            if r.failed_rounds:
                print(
                    f"note ({r.name}): round(s) {', '.join(map(str, r.failed_rounds))} failed "
                    "(no new model, accuracy carried over)"
                )
            for note in r.notes:
                print(f"note ({r.name}): {note}")


def print_curves(results: Sequence[VariantResult], rounds: int) -> None:
    shown = [r for r in results if r.status == "ok"]
    print(f"{'round':>5} " + " ".join(f"{r.name + ' acc%':>13} {'s':>6}" for r in shown))
    for i in range(rounds):
        cells = []
        for r in shown:
            acc = 100 * r.accuracies[i] if i < len(r.accuracies) else None
            sec = r.round_s[i] if i < len(r.round_s) else None
            cells.append(f"{_fmt(acc, '.2f', 13)} {_fmt(sec, '.3f', 6)}")
        print(f"{i + 1:>5} " + " ".join(cells))


BREAKDOWN_ORDER = (
    ("nodes", "training"),
    ("nodes", "serialise + hash update"),
    ("nodes", "sign upload (EIP-712)"),
    ("nodes", "chain: transactions"),
    ("nodes", "chain: reads"),
    ("nodes", "HTTP: model download"),
    ("nodes", "HTTP: upload (incl. verification)"),
    ("nodes", "HTTP: polling"),
    ("coordinator", "upload check: headers, chain"),
    ("coordinator", "upload check: body, store"),
    ("coordinator", "chain: transactions"),
    ("coordinator", "chain: reads"),
    ("coordinator", "chain: commit-order log query"),
    ("coordinator", "round close (all)"),
    ("coordinator", "pricing (screen, value, aggregate)"),
    ("coordinator", "Shapley valuation"),
    ("coordinator", "aggregation"),
    ("coordinator", "evaluation"),
    ("coordinator", "store writes"),
)


def print_breakdown(results: Sequence[VariantResult]) -> None:
    shown = [r for r in results if r.status == "ok" and r.name in ("embedded", "anvil")]
    if not shown:
        return
    print(
        "fedledger's time by component, seconds and calls per round over rounds 2..R: nodes summed\n"
        "over all nodes (they work in parallel), the coordinator over its threads. Rows overlap:\n"
        "a node's upload holds the coordinator's verification of it, which holds chain reads;\n"
        "round close holds pricing, which holds Shapley valuation and aggregation.\n"
    )
    header = f"{'role':<12} {'component':<36}" + "".join(
        f"{r.name + ' s/round':>18} {'calls':>7}" for r in shown
    )
    print(header)
    print("-" * len(header))
    for role, part in BREAKDOWN_ORDER:
        cells = []
        for r in shown:
            cells.append(
                f"{_fmt(r.breakdown.get(role, {}).get(part), '.4f', 18)} "
                f"{_fmt(r.calls.get(role, {}).get(part), '.1f', 7)}"
            )
        print(f"{role:<12} {part:<36}" + "".join(cells))
    for r in results:
        if r.status == "ok" and r.name in ("floor", "flwr"):
            parts = next(iter(r.breakdown.values()), {})
            print(
                f"{r.name}: training {parts.get('training', 0.0):.4f} s/round (summed over clients)"
                + (
                    f", aggregation {parts['aggregation']:.4f} s/round"
                    if "aggregation" in parts
                    else ""
                )
            )


def check_targets(results: Sequence[VariantResult]) -> list[str]:
    """The issue's targets: accuracy within 1 point of the floor; anvil no slower than Flower."""
    by_name = {r.name: r for r in results if r.status == "ok"}
    lines = []
    floor = by_name.get("floor")
    for name in ("embedded", "anvil"):
        r = by_name.get(name)
        if floor is None or r is None or r.final_accuracy is None or floor.final_accuracy is None:
            lines.append(f"accuracy within 1 point of the floor ({name}): not measured")
            continue
        gap = 100 * (r.final_accuracy - floor.final_accuracy)
        verdict = "met" if abs(gap) <= 1.0 else "MISSED"
        lines.append(
            f"accuracy within 1 point of the floor ({name}): {verdict} "
            f"({100 * r.final_accuracy:.2f}% vs {100 * floor.final_accuracy:.2f}%, {gap:+.2f})"
        )
    anvil, flwr = by_name.get("anvil"), by_name.get("flwr")
    if anvil is None or flwr is None or anvil.steady_round_s is None or flwr.steady_round_s is None:
        missing = "flwr not installed" if flwr is None else "not measured"
        lines.append(f"anvil no slower per round than Flower: not measured ({missing})")
    else:
        verdict = "met" if anvil.steady_round_s <= flwr.steady_round_s else "MISSED"
        lines.append(
            f"anvil no slower per round than Flower: {verdict} ({anvil.steady_round_s:.3f} s vs "
            f"{flwr.steady_round_s:.3f} s, {anvil.steady_round_s / flwr.steady_round_s:.1f}x)"
        )
    return lines


def plot(results: Sequence[VariantResult], path: Path) -> str:
    """Accuracy per round of every variant, as a PNG; says where, or why not."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib not installed: no plot (pip install -e '.[bench]')"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"floor": ("k", "--", 2.5), "flwr": ("C1", "-", 1.2)}  # they overlap exactly
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.status == "ok" and r.accuracies:
            rounds = range(1, len(r.accuracies) + 1)
            color, line, width = styles.get(r.name, (None, "-", 1.2))
            ax.plot(
                rounds,
                [100 * a for a in r.accuracies],
                color=color,
                linestyle=line,
                linewidth=width,
                marker=".",
                label=r.name,
            )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits-10: FedAvg, 10 clients, 1 local epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["--role"]:
        return role_main(argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 rounds, 3 clients (the fewest a round publishes a model from, "
        "min_aggregated), floor and embedded inside this process",
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fedledger-bench" / "digits10-accuracy.png",
        help="where to write the accuracy curves (PNG)",
    )
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument(
        "--logs", type=Path, help="keep every process's log and timings here (default: discard)"
    )
    args = parser.parse_args(argv)
    rounds, clients = (2, 3) if args.quick else (args.rounds, args.clients)
    print("command: python bench/digits10.py " + " ".join(shlex.quote(a) for a in argv))
    print(
        f"digits-10, {clients} clients (Dirichlet {ALPHA}, seed {SEED}), MLP 64-32-10, SGD lr {LR}, "
        f"batch {BATCH_SIZE}, {EPOCHS} local epoch, {rounds} rounds, all clients every round; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 torch thread a process\n"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="fedledger-bench-") as tmp:
        workdir = args.logs or Path(tmp)
        for name in args.variants:
            started = time.perf_counter()
            result = run_variant(name, rounds, clients, workdir, in_process=args.quick)
            status = "ok" if result.status == "ok" else result.status
            print(f"{name}: {status} ({time.perf_counter() - started:.1f} s)", flush=True)
            results.append(result)
    print()
    print_summary(results)
    print()
    print_curves(results, rounds)
    print()
    print_breakdown(results)
    print()
    targets = check_targets(results)
    for line in targets:
        print("target: " + line)
    print(plot(results, args.plot))
    if args.json:
        args.json.write_text(
            json.dumps({"results": [asdict(r) for r in results], "targets": targets}, indent=2)
        )
    return 0 if all(r.status == "ok" or "not installed" in r.status for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

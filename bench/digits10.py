"""digits-10 end to end: the plain-PyTorch floor, Flower and fedledger, side by side.

The digits-10 split (sklearn's digits, a stratified 20% test set, the rest over 10 clients by a
Dirichlet(0.5) label partition, seed 0), the MLP 64-32-10 initialised from seed 0, and in
every round all clients train one local epoch of SGD (lr 0.05, batch 32) from the global model.
Client k shuffles its batches in round r with seed k * 1_000_003 + r, as fedledger's nodes do,
so every variant starts from the same updates. Variants:

- ``floor``: FedAvg in one process, plain PyTorch, no framework;
- ``flwr``: Flower's FedAvg, its (legacy, gRPC) server in one process and one process per
  client on loopback, the server evaluating the global model after each round (no Ray);
- ``flwr-deploy``: Flower's FedAvg on its deployment runtime: ``flower-superlink`` and one
  ``flower-supernode`` per client (insecure, on loopback), the Flower App written at run time
  (its ServerApp and ClientApp are this script's ``flwr_server_app``, ``flwr_client_app``) and
  submitted with ``flwr run``; the ServerApp evaluates after each round. Flower starts a
  ClientApp process for every client every round;
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

Usage: python bench/digits10.py [--quick] [--rounds 30]
       [--variants floor flwr flwr-deploy embedded anvil]
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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedledger.tasks import DigitsTask

SCRIPT = Path(__file__).resolve()
VARIANTS = ("floor", "flwr", "flwr-deploy", "embedded", "anvil")
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
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # no request off this machine for a newer flwr
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
    role: str,
    args: Sequence[str],
    log: Path,
    timings: Path | None = None,
    *,
    key: str | None = None,
) -> subprocess.Popen[bytes]:
    """``ARGS`` as ``role``; a devnet ``key`` to sign with goes in its environment
    (FEDLEDGER_KEY), never on a command line that every user of the machine can read."""
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
            env={**os.environ, **CHILD_ENV, **({} if key is None else {"FEDLEDGER_KEY": key})},
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
                "--data-dir", str(workdir / "coordinator"),
                "--spec", str(SPEC),
                "--port", str(port),
                "--rounds", str(rounds),
            ],
            coordinator_log,
            coordinator_timings,
            key=coordinator_key,
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
                        "--spec", str(SPEC),
                        "--data", f"{k}/{clients}",
                        "--seed", str(SEED * 1000 + k),
                    ],
                    log,
                    workdir / f"node{k}.json",
                    key=org.private_key,
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


# ------------------------------------------------------------ Flower: deployment runtime

FLWR_COMMANDS = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr",
    "flwr-serverapp",
    "flwr-clientapp",
)
"""Flower's commands the deployment runtime runs (the SuperLink and SuperNodes start the last
three themselves, by name, from PATH)."""
FLWR_CONNECTION = "bench"  # the SuperLink connection in the run's own FLWR_HOME/config.toml
FLWR_APP_MODULE = "digits10_flwr_app"
FLWR_SERVER_REPORT = "serverapp.json"  # what the ServerApp measured, in the run's folder
FLWR_ROUND_TIMEOUT_S = 600.0  # how long the ServerApp waits for a round's replies
FLWR_START_TIMEOUT_S = 120.0  # SuperLink and SuperNodes up, and `flwr run` answered
FLWR_STARTUP_PART = "ClientApp process start-up"  # process start to the ClientApp's call
FLWR_CONFIG_TOML = """\
[superlink]
default = "{name}"

[superlink.{name}]
address = "127.0.0.1:{port}"
insecure = true
"""
FLWR_APP_PYPROJECT = """\
[project]
name = "digits10-bench"
version = "1.0.0"
description = "digits-10 FedAvg for fedledger's benchmark against Flower's deployment runtime"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<2"]

[tool.flwr.app]
publisher = "fedledger"

[tool.flwr.app.components]
serverapp = "{module}:server_app"
clientapp = "{module}:client_app"

[tool.flwr.app.config]
rounds = {rounds}
clients = {clients}
workdir = {workdir}
"""
FLWR_APP_SOURCE = '''\
"""digits-10's Flower App, written by bench/digits10.py for its flwr-deploy variant.

The ServerApp and the ClientApp are the benchmark's own (flwr_server_app, flwr_client_app in
the copy of the script beside this file, in the same Flower App Bundle), so they train,
average and evaluate with the helpers every other variant uses.
"""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    {name!r}, Path(__file__).with_name({script!r})
)
assert _spec is not None and _spec.loader is not None
_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _bench  # dataclasses look their module up while the script loads
_spec.loader.exec_module(_bench)

server_app = _bench.flwr_server_app()
client_app = _bench.flwr_client_app()
'''


def _write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` by a rename, so that a reader never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc/self/stat)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def flwr_server_app() -> Any:
    """The flwr-deploy variant's ServerApp: Flower's FedAvg (the Message API's) over every
    SuperNode for ``rounds`` rounds from the seed-0 model, evaluating the global model on the
    test set before round 1 and after each round, as the legacy variant's server does.

    What it measures (the time of each evaluation, the accuracies, the replies averaged each
    round, its peak RSS, or why it failed) goes to ``workdir/serverapp.json`` after every round.
    """
    from flwr.app import ArrayRecord, Context, Message, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    class CountingFedAvg(FedAvg):
        """Flower's FedAvg, counting the training replies it averages each round."""

        def __init__(self, replies: list[int], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.replies = replies

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            self.replies.append(sum(1 for m in replies if not m.has_error()))
            return super().aggregate_train(server_round, replies)

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        rounds, clients = int(config["rounds"]), int(config["clients"])
        out = Path(str(config["workdir"])) / FLWR_SERVER_REPORT
        marks: list[float] = []  # unix time of each evaluation: round 0 (initial model), 1, ...
        accuracies: list[float] = []
        replies: list[int] = []
        report: dict[str, Any] = {"marks": marks, "accuracies": accuracies, "replies": replies}
        try:
            torch.set_num_threads(1)
            task = DigitsTask()
            model = task.build_model(seed=SEED)
            x_test, y_test = task.validation_data(seed=SEED)

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                marks.append(time.time())
                model.load_state_dict(arrays.to_torch_state_dict())
                acc = accuracy(model, x_test, y_test)
                if server_round > 0:
                    accuracies.append(acc)
                _write_json_atomic(out, {**report, "done": False, "peak_rss_mib": peak_rss_mib()})
                return MetricRecord({"accuracy": acc})

            strategy = CountingFedAvg(
                replies,
                fraction_train=1.0,
                fraction_evaluate=0.0,  # the server evaluates, as in the legacy variant
                min_train_nodes=clients,
                min_available_nodes=clients,
            )
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=rounds,
                timeout=FLWR_ROUND_TIMEOUT_S,
                evaluate_fn=evaluate,
            )
        except BaseException:
            report["error"] = traceback.format_exc()
            raise
        finally:
            _write_json_atomic(out, {**report, "done": True, "peak_rss_mib": peak_rss_mib()})

    return app


def flwr_client_app() -> Any:
    """The flwr-deploy variant's ClientApp: client ``partition-id`` of ``num-partitions`` (its
    SuperNode's node config) trains one round from the global model, as the legacy client
    does, shuffling with seed index * ROUND_SEED_STRIDE + round.

    The deployment runtime starts a ClientApp process for every message, so each call loads
    the data and builds the model anew; it appends its timings (training, and the process's
    start-up before it was called) and peak RSS to ``workdir/client<index>.jsonl``.
    """
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        called_unix, age = time.time(), _process_age_s()
        index = int(context.node_config["partition-id"])
        clients = int(context.node_config["num-partitions"])
        round_id = int(cast(int, msg.content.config_records["config"]["server-round"]))
        torch.set_num_threads(1)
        task = DigitsTask()
        model = task.build_model(seed=SEED)
        x, y = task.partition(index, clients, alpha=ALPHA, seed=SEED)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        start_unix, started = time.time(), time.perf_counter()
        local_sgd(model, x, y, seed=index * ROUND_SEED_STRIDE + round_id)
        records = [("clients/training", start_unix, time.perf_counter() - started)]
        if age is not None:
            records.append((f"clients/{FLWR_STARTUP_PART}", called_unix - age, age))
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": int(y.shape[0])}),
            }
        )
        line = {"round": round_id, "pid": os.getpid(), "records": records}
        line["peak_rss_mib"] = peak_rss_mib()
        log = Path(str(context.run_config["workdir"])) / f"client{index}.jsonl"
        with log.open("a") as out:
            out.write(json.dumps(line) + "\n")
        return Message(content, reply_to=msg)

    return app


@dataclass
class _Watched:
    """One process seen in the watched trees."""

    pid: int
    parent: tuple[int, int] | None  # (pid, start time) of its parent when first seen
    command: str  # the Flower command it runs (flower-superlink, flwr-clientapp, ...)
    peak_mib: float = 0.0  # VmHWM, as last read
    alive: bool = True


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """Every process: pid -> (parent pid, start time in clock ticks, state), from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[19]), fields[0])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return table


def _memory_mib(pid: int) -> tuple[float, float] | None:
    """(VmHWM, VmRSS) of ``pid`` in MiB; None for a zombie or a process gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                values[line[:5]] = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    if "VmHWM" not in values or "VmRSS" not in values:
        return None
    return values["VmHWM"], values["VmRSS"]


def _command_of(pid: int) -> str:
    """The Flower command ``pid`` runs (``python .../flwr-clientapp ...`` -> flwr-clientapp)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    names = [Path(a.decode(errors="replace")).name for a in argv if a]
    flower = [n for n in names if n.startswith(("flower-", "flwr"))]
    return flower[0] if flower else (names[0] if names else "?")


class _TreeWatch:
    """The process trees under some root processes, sampled from /proc on a thread: what ran,
    the peak RSS (VmHWM) of each process, the most alive at once and their largest summed RSS.

    A process is known by its pid and start time (a reused pid is another process), and one
    seen once is still followed when its parent exits before it: ``stop_all`` can then stop
    everything the roots started, however deep.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.roots: set[tuple[int, int]] = set()
        self.seen: dict[tuple[int, int], _Watched] = {}
        self.most_at_once = 0
        self.most_rss_mib = 0.0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-watch", daemon=True)

    def __enter__(self) -> _TreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def add_root(self, pid: int) -> None:
        start = _proc_table().get(pid)
        if start is not None:
            with self._lock:
                self.roots.add((pid, start[1]))
        self.sample()

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.sample()

    def sample(self) -> list[tuple[int, int]]:
        """Read /proc once; return the processes of the trees alive now (zombies left out)."""
        table = _proc_table()
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _, _) in table.items():
            children[ppid].append(pid)
        with self._lock:
            frontier = [
                key
                for key in self.roots | set(self.seen)
                if table.get(key[0], (0, -1))[1] == key[1]
            ]
            live: set[tuple[int, int]] = set()
            while frontier:
                key = frontier.pop()
                if key in live:
                    continue
                live.add(key)
                frontier.extend((c, table[c][1]) for c in children.get(key[0], ()) if c in table)
            alive, rss = [], 0.0
            for key in live:
                memory = None if table[key[0]][2] == "Z" else _memory_mib(key[0])
                if memory is None:
                    continue
                watched = self.seen.get(key)
                if watched is None:
                    ppid = table[key[0]][0]
                    parent = (ppid, table[ppid][1]) if ppid in table else None
                    watched = _Watched(key[0], parent, _command_of(key[0]))
                    self.seen[key] = watched
                watched.peak_mib = max(watched.peak_mib, memory[0])
                alive.append(key)
                rss += memory[1]
            for key, watched in self.seen.items():
                watched.alive = key in alive
            self.most_at_once = max(self.most_at_once, len(alive))
            self.most_rss_mib = max(self.most_rss_mib, rss)
            return alive

    def ended(self, command: str) -> bool:
        """Whether a process running ``command`` was seen and none is alive any more."""
        with self._lock:
            runs = [w for w in self.seen.values() if w.command == command]
            return bool(runs) and not any(w.alive for w in runs)

    def label(self, watched: _Watched) -> str:
        """The process's part: a SuperExec is the SuperLink's or a SuperNode's."""
        if watched.command == "flower-superexec":
            parent = self.seen.get(watched.parent) if watched.parent else None
            owner = parent.command if parent else "?"
            return "superlink's superexec" if owner == "flower-superlink" else "superexec"
        return watched.command.removeprefix("flower-").removeprefix("flwr-")

    def stop_all(self, roots: Sequence[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
        """SIGTERM the roots, then whatever is left of their trees; SIGKILL what outlives
        ``grace_s`` at each step; reap the roots."""
        self.sample()
        for proc in roots:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in roots:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.sample()
            for pid, _ in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace_s
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = self.sample()
            if not left:
                break
        for proc in roots:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit (in the main thread), so cleanups run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _flwr_bin() -> Path | None:
    """The folder that holds Flower's commands: this Python's, else the one on PATH."""
    found = shutil.which("flower-superlink")
    for folder in (Path(sys.executable).parent, *([Path(found).parent] if found else [])):
        if all((folder / c).exists() for c in FLWR_COMMANDS):
            return folder
    return None


def _start(cmd: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )


def _wait_until(
    ready: Callable[[], bool],
    what: str,
    procs: Sequence[tuple[str, subprocess.Popen[bytes], Path]],
    deadline: float,
) -> None:
    """Poll ``ready`` until it holds; raise, with the log, if a process exits or time runs out."""
    while not ready():
        for name, proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"{name}:\n{_tail(log)}" for name, _, log in procs)
            raise RuntimeError(f"{what}: not in time\n{logs}")
        time.sleep(0.1)


def _http_ok(url: str) -> Callable[[], bool]:
    import httpx

    def ok() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    return ok


def _log_has(log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text(errors="replace")


def run_flwr_deploy(rounds: int, clients: int, workdir: Path) -> VariantResult:
    """Flower's deployment runtime: a SuperLink and one SuperNode per client (``--insecure``, on
    loopback, ports chosen now), the Flower App (``flwr_server_app`` and ``flwr_client_app``)
    submitted with ``flwr run``; Flower's FedAvg over every client each round, the ServerApp
    evaluating after each round. Every process started, theirs included, is stopped on the way
    out."""
    from fedledger.devnet.anvil import free_port

    bin_dir = _flwr_bin()
    if bin_dir is None:
        return VariantResult(
            "flwr-deploy",
            status=f"flwr's commands ({', '.join(FLWR_COMMANDS)}) not installed beside "
            f"{sys.executable} nor on PATH",
        )
    started, start_unix = time.perf_counter(), time.time()
    workdir = workdir.resolve()
    home, app_dir = workdir / "flwr-home", workdir / "app"
    home.mkdir(parents=True, exist_ok=True)
    app_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(FLWR_CONFIG_TOML.format(name=FLWR_CONNECTION, port=port))
    (app_dir / "pyproject.toml").write_text(
        FLWR_APP_PYPROJECT.format(
            module=FLWR_APP_MODULE, rounds=rounds, clients=clients, workdir=json.dumps(str(workdir))
        )
    )
    # The bundle carries a copy of this script: a ClientApp process starts every round and
    # loads it, so an edit to bench/ while the run goes on does not reach the run.
    shutil.copyfile(SCRIPT, app_dir / SCRIPT.name)
    (app_dir / f"{FLWR_APP_MODULE}.py").write_text(
        FLWR_APP_SOURCE.format(name="fedledger_bench_digits10", script=SCRIPT.name)
    )
    report_file = workdir / FLWR_SERVER_REPORT
    env = {
        **os.environ,
        **CHILD_ENV,
        "FLWR_HOME": str(home),
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
    }
    superlink_cmd = [
        str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    marks: dict[str, float] = {}
    with _terminate_raises(), _TreeWatch() as watch:
        try:
            superlink_log = workdir / "superlink.log"
            superlink = _start(superlink_cmd, superlink_log, env)
            procs.append(superlink)
            watch.add_root(superlink.pid)
            deadline = time.monotonic() + FLWR_START_TIMEOUT_S
            core = [("the SuperLink", superlink, superlink_log)]
            _wait_until(_http_ok(f"http://127.0.0.1:{port}/health"), "SuperLink", core, deadline)
            marks["superlink"] = time.time()
            nodes = []
            for k in range(clients):
                log = workdir / f"supernode{k}.log"
                node = _start(
                    [
                        str(bin_dir / "flower-supernode"), "--insecure",
                        "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(free_port()),
                        "--node-config", f"partition-id={k} num-partitions={clients}",
                    ],
                    log,
                    env,
                )  # fmt: skip
                procs.append(node)
                watch.add_root(node.pid)
                nodes.append((f"SuperNode {k}", node, log))
            core += nodes
            for name, _, log in nodes:  # each has registered with the SuperLink
                _wait_until(_log_has(log, "SuperNode ID:"), name, core, deadline)
            marks["supernodes"] = time.time()
            cli_log = workdir / "flwr-run.log"
            cli = _start(
                [str(bin_dir / "flwr"), "run", str(app_dir), FLWR_CONNECTION, "--format", "json"],
                cli_log,
                env,
            )
            procs.append(cli)
            watch.add_root(cli.pid)
            try:
                code = cli.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"flwr run did not answer in time:\n{_tail(cli_log)}") from None
            if code != 0:
                raise RuntimeError(f"flwr run exited with {code}:\n{_tail(cli_log)}")
            marks["submitted"] = time.time()
            progress = {"evaluations": 0, "since": time.monotonic()}

            def finished() -> bool:
                """The ServerApp is done; raise if it exited, or stalled, before that."""
                ended = watch.ended("flwr-serverapp")  # before reading: it writes, then exits
                report = _load_timings(report_file) or {}
                if report.get("done"):
                    return True
                if ended:
                    raise RuntimeError(
                        f"the ServerApp exited before the run ended:\n{_tail(superlink_log)}"
                    )
                evaluations = len(report.get("marks", []))
                if evaluations > progress["evaluations"]:
                    progress.update(evaluations=evaluations, since=time.monotonic())
                # The first evaluation comes at start-up, each next one a round later.
                limit = FLWR_ROUND_TIMEOUT_S + 60 if evaluations else FLWR_START_TIMEOUT_S
                if time.monotonic() - progress["since"] > limit:
                    raise RuntimeError(
                        f"the ServerApp made no progress in {limit:.0f} s (evaluations: "
                        f"{evaluations}):\n{_tail(superlink_log)}"
                    )
                return False

            # Bounded by finished() as well: no round may take longer than the ServerApp
            # waits for replies.
            _wait_until(finished, "the run", core, time.monotonic() + 120 + 660 * rounds)
        finally:
            watch.stop_all(procs)

    report = _load_timings(report_file) or {}
    if report.get("error"):
        raise RuntimeError(f"the ServerApp failed:\n{report['error']}")
    evaluations = [float(t) for t in report.get("marks", [])]
    result = VariantResult("flwr-deploy", accuracies=[float(a) for a in report["accuracies"]])
    # Round 1 from the first process's start, as start-up is in the other variants' round 1.
    bounds = [start_unix, *evaluations[1 : rounds + 1]]
    result.round_s = [b - a for a, b in itertools.pairwise(bounds)]
    result.total_s = evaluations[-1] - start_unix if evaluations else time.perf_counter() - started
    if evaluations:
        result.notes.append(
            "start-up before the ServerApp's first evaluation: "
            + ", ".join(
                f"{what} {t - start_unix:.1f} s"
                for what, t in (
                    ("SuperLink up", marks["superlink"]),
                    (f"{clients} SuperNodes connected", marks["supernodes"]),
                    ("flwr run answered", marks["submitted"]),
                    ("ServerApp evaluated the initial model", evaluations[0]),
                )
            )
        )
    short = [r for r, n in enumerate(report.get("replies", []), 1) if n < clients]
    if short:
        result.notes.append(f"round(s) {short} averaged fewer than {clients} replies")
    records: list[Sequence[Any]] = []
    client_peaks: list[float] = []
    for k in range(clients):
        timings = workdir / f"client{k}.jsonl"
        lines = timings.read_text().splitlines() if timings.exists() else []
        if not lines:
            result.notes.append(f"no timings from client {k}")
        for line in lines:
            part = json.loads(line)
            records.extend(part["records"])
            client_peaks.append(float(part["peak_rss_mib"]))
    since, steady_rounds = (
        (evaluations[1], rounds - 1) if rounds > 1 and len(evaluations) > 1 else (0.0, 1)
    )
    result.breakdown, result.calls = per_round(records, since=since, rounds=steady_rounds)
    by_label: dict[str, list[float]] = defaultdict(list)
    for watched in watch.seen.values():
        by_label[watch.label(watched)].append(watched.peak_mib)
    by_label["clientapp"] += client_peaks  # each ClientApp's own ru_maxrss, however short-lived
    if "peak_rss_mib" in report:
        by_label["serverapp"].append(float(report["peak_rss_mib"]))
    peaks = {
        "superlink": max(by_label["superlink"], default=0.0),
        "superlink's superexec": max(by_label["superlink's superexec"], default=0.0),
        "serverapp": max(by_label["serverapp"], default=0.0),
        "supernode (max)": max(by_label["supernode"], default=0.0),
        "supernodes (sum)": sum(by_label["supernode"]),
        "superexecs (sum)": sum(by_label["superexec"]),
        "clientapp (max)": max(by_label["clientapp"], default=0.0),
    }
    # One ClientApp a SuperNode at a time: the sum counts each SuperNode's largest once.
    peaks["all processes (sum)"] = (
        peaks["superlink"]
        + peaks["superlink's superexec"]
        + peaks["serverapp"]
        + peaks["supernodes (sum)"]
        + peaks["superexecs (sum)"]
        + clients * peaks["clientapp (max)"]
    )
    peaks["all processes at once (sampled)"] = watch.most_rss_mib
    peaks["flwr run"] = max(by_label["flwr"], default=0.0)
    peaks["driver"] = peak_rss_mib()
    result.peak_rss_mib = {k: v for k, v in peaks.items() if v > 0}
    result.processes = watch.most_at_once
    counts = Counter(watch.label(w) for w in watch.seen.values())
    counts["clientapp"] = max(counts["clientapp"], len(client_peaks))  # some too short to see
    result.notes.append(
        f"processes: {watch.most_at_once} at most at once, {counts.total()} started in all ("
        + ", ".join(f"{n} {label}" for label, n in sorted(counts.items()) if n)
        + "): a ClientApp process for every client every round; "
        "peak RSS 'all processes (sum)' counts one ClientApp per SuperNode, the driver not"
    )
    return result


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
        "flwr-deploy": lambda: run_flwr_deploy(rounds, clients, workdir),
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
    if name.startswith("flwr") and importlib.util.find_spec("flwr") is None:
        return VariantResult(name, status="flwr not installed (pip install -e '.[bench]')")
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
        f"{'variant':<11} {'final acc':>9} {'Δ floor':>8} {'s/round':>8} {'median':>7} "
        f"{'total s':>8} {'procs':>5} {'peak RSS MiB':>13}  status"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.status != "ok":
            print(
                f"{r.name:<11} {'-':>9} {'-':>8} {'-':>8} {'-':>7} {'-':>8} {'-':>5} {'-':>13}  {r.status.splitlines()[0]}"
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
            f"{r.name:<11} {_fmt(100 * r.final_accuracy if r.final_accuracy is not None else None, '.2f', 8)}%"
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
    widths = [max(13, len(r.name) + 5) for r in shown]
    print(
        f"{'round':>5} "
        + " ".join(f"{r.name + ' acc%':>{w}} {'s':>6}" for r, w in zip(shown, widths, strict=True))
    )
    for i in range(rounds):
        cells = []
        for r, width in zip(shown, widths, strict=True):
            acc = 100 * r.accuracies[i] if i < len(r.accuracies) else None
            sec = r.round_s[i] if i < len(r.round_s) else None
            cells.append(f"{_fmt(acc, '.2f', width)} {_fmt(sec, '.3f', 6)}")
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


def print_training(results: Sequence[VariantResult]) -> None:
    """The floor's and Flower's time per round in training (and aggregation, start-up)."""
    for r in results:
        if r.status == "ok" and r.name in ("floor", "flwr", "flwr-deploy"):
            parts = next(iter(r.breakdown.values()), {})
            print(
                f"{r.name}: training {parts.get('training', 0.0):.4f} s/round (summed over clients)"
                + (
                    f", aggregation {parts['aggregation']:.4f} s/round"
                    if "aggregation" in parts
                    else ""
                )
                + (
                    f", ClientApp process start-up {parts[FLWR_STARTUP_PART]:.4f} s/round "
                    "(summed over clients)"
                    if FLWR_STARTUP_PART in parts
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
    anvil = by_name.get("anvil")
    for name, runtime in (("flwr", "legacy gRPC runtime"), ("flwr-deploy", "deployment runtime")):
        flwr = by_name.get(name)
        target = f"anvil no slower per round than Flower, {runtime} ({name})"
        missing = [
            next((r.status.splitlines()[0] for r in results if r.name == n), f"{n} not run")
            for n, r in (("anvil", anvil), (name, flwr))
            if r is None or not r.steady_round_s
        ]
        if anvil is None or flwr is None or not anvil.steady_round_s or not flwr.steady_round_s:
            lines.append(f"{target}: not measured ({'; '.join(missing)})")
            continue
        verdict = "met" if anvil.steady_round_s <= flwr.steady_round_s else "MISSED"
        lines.append(
            f"{target}: {verdict} ({anvil.steady_round_s:.3f} s vs "
            f"{flwr.steady_round_s:.3f} s, {anvil.steady_round_s / flwr.steady_round_s:.3g}x)"
        )
    return lines


def check_curves(results: Sequence[VariantResult]) -> list[str]:
    """Flower's curves against the floor's, round by round: the same updates and the same
    average give the same test accuracy after every round (to a test sample, 1/360); any
    round that differs is listed."""
    by_name = {r.name: r for r in results if r.status == "ok"}
    floor = by_name.get("floor")
    lines = []
    for name in ("flwr", "flwr-deploy"):
        r = by_name.get(name)
        if floor is None or r is None:
            why = [
                next((x.status.splitlines()[0] for x in results if x.name == n), f"{n} not run")
                for n, x in ((name, r), ("floor", floor))
                if x is None
            ]
            lines.append(f"{name} against the floor: not compared ({'; '.join(why)})")
            continue
        rounds = max(len(r.accuracies), len(floor.accuracies))
        differ = [
            f"round {i + 1}: {_fmt(100 * a if a is not None else None, '.2f', 0)}% vs "
            f"{_fmt(100 * b if b is not None else None, '.2f', 0)}%"
            for i, (a, b) in enumerate(
                itertools.zip_longest(r.accuracies, floor.accuracies, fillvalue=None)
            )
            if a is None or b is None or abs(a - b) > 1e-9
        ]
        if differ:
            lines.append(
                f"{name} against the floor: DIFFERS in {len(differ)} of {rounds} rounds ("
                + "; ".join(differ)
                + ")"
            )
        else:
            lines.append(f"{name} against the floor: the same accuracy after all {rounds} rounds")
    return lines


def plot(results: Sequence[VariantResult], path: Path) -> str:
    """Accuracy per round of every variant, as a PNG; says where, or why not."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib not installed: no plot (pip install -e '.[bench]')"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # floor, flwr and flwr-deploy overlap exactly: wide to narrow, so that all three show
    styles = {
        "floor": ("k", "--", 3.5),
        "flwr": ("C1", "-", 2.0),
        "flwr-deploy": ("C4", ":", 1.2),
        "embedded": ("C0", "-", 1.2),
        "anvil": ("C2", "-", 1.2),
    }
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
    print_training(results)
    print()
    curves = check_curves(results)
    for line in curves:
        print("curve: " + line)
    targets = check_targets(results)
    for line in targets:
        print("target: " + line)
    print(plot(results, args.plot))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"results": [asdict(r) for r in results], "curves": curves, "targets": targets},
                indent=2,
            )
        )
    return 0 if all(r.status == "ok" or "not installed" in r.status for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

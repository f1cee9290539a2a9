"""One round at scale through the real coordinator: K organisations, a ~1e6-parameter model.

anvil with K registered organisations; ``fedledger coordinator serve`` in its own process, on a
task that is digits with a wide MLP (64-H-10, H = 13,333 gives 999,985 parameters); then, in
this process, K organisations each run fedledger's own node code for one round
(``NodeRunner.take_part``: download and verify the model, train one epoch, commit the update's
hash on-chain, upload it signed over HTTP). The coordinator verifies every upload against its
signature and commitment, then closes the round: screens, values (Shapley), aggregates (FedAvg),
settles on-chain. Reported: wall time of each phase, the coordinator's own time by part, and the
coordinator process's peak memory (VmHWM).

The wide model is a task plug-in (``WideDigitsTask`` below), named by the spec the benchmark
writes and loaded by the coordinator and the nodes like any consortium's. With more
organisations than ``max_exact_players`` (14) the coordinator values the round by sampling
(``fedledger.incentive.sampling.StratifiedKernelShapley``, stopped early once its own error is
small beside the validation set's: ``valuation_stop_ratio``).

Usage: python bench/scale.py [--quick] [--orgs 100] [--hidden 13333] [--books-process auto|on|off]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedledger.coordinator.policy import PricingPolicy
from fedledger.tasks import DigitsTask, TaskSpec, load_spec, load_task

SCRIPT = Path(__file__).resolve()
FULL_ORGS, FULL_HIDDEN = 100, 13_333  # 64 * H + H + 10 * H + 10 = 999,985 parameters
QUICK_ORGS, QUICK_HIDDEN = 4, 256
ALPHA = 0.5
SEED = 0
TASK_NAME = "digits-wide"
CHILD_ENV = {"PYTHONUNBUFFERED": "1"}
BOOKS_TIMINGS_ENV = "SCALE_BOOKS_TIMINGS"
"""Where the coordinator's books process (``--books-process``) writes its own parts' times: it
is spawned from this file as ``__mp_main__``, which then times it as ``coordinator_main`` times
the coordinator."""
"""The coordinator keeps torch's default threads (every core), as a deployment would: while
organisations train in this process it shares the cores with them, at the close it is alone."""


class WideDigitsTask(DigitsTask):
    """The digits task (same data and split) with a 64-H-10 MLP: a task plug-in, named by the
    spec ``write_spec`` writes (``[task.options] hidden = H``)."""

    OPTIONS = DigitsTask.OPTIONS | {"hidden"}

    def __init__(self, spec: TaskSpec | None = None) -> None:
        super().__init__(spec)
        self.hidden = int(self.spec.task.options.get("hidden", 32))

    def build_model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))


def num_params(hidden: int) -> int:
    return 64 * hidden + hidden + hidden * 10 + 10


def write_spec(workdir: Path, hidden: int) -> Path:
    """The benchmark's task spec: the wide digits task, one local epoch a round."""
    path = workdir / "spec.toml"
    path.write_text(
        f"""version = 1

[task]
name = "{TASK_NAME}"
kind = "classification"
plugin = "scale:WideDigitsTask"
plugin_dir = "{SCRIPT.parent}"

[task.options]
alpha = {ALPHA}
seed = {SEED}
hidden = {hidden}

[training]
lr = 0.05
epochs = 1
batch_size = 32
"""
    )
    return path


def valuator_blocker(num_orgs: int) -> str | None:
    """Why the coordinator cannot value a round of ``num_orgs`` organisations, or None."""
    from fedledger.coordinator.policy import PricingPolicy
    from fedledger.incentive.sampling import choose_valuator

    max_exact = PricingPolicy().max_exact_players
    try:
        choose_valuator(num_orgs, max_exact=max_exact)
    except ValueError as exc:
        sampling = importlib.util.find_spec("fedledger.incentive.sampling") is not None
        return (
            f"incentive.sampling.choose_valuator({num_orgs}, max_exact={max_exact}) raises "
            f"ValueError: {exc}; fedledger.incentive.sampling "
            + ("exists but is not used by choose_valuator" if sampling else "does not exist yet")
        )
    return None


# ------------------------------------------------------------------- coordinator process

_TIMES: dict[str, float] = {}
_CALLS: dict[str, int] = {}
_LOCK = threading.Lock()


def _wrap(owner: Any, attr: str, part: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            with _LOCK:
                _TIMES[part] = _TIMES.get(part, 0.0) + time.perf_counter() - started
                _CALLS[part] = _CALLS.get(part, 0) + 1

    setattr(owner, attr, timed)


def _wrap_books_parts() -> None:
    """Time the parts of closing a round's books, wherever this process closes them."""
    from fedledger.coordinator import books, rounds
    from fedledger.incentive import sampling
    from fedledger.incentive.shapley import ExactShapley

    _wrap(rounds, "close_books", "pricing: screen, value, aggregate")
    _wrap(books, "aggregate", "aggregation (FedAvg)")
    _wrap(books, "screen", "screens (copies, replays, noise)")
    _wrap(books, "coalition_game", "coalition game set-up")
    _wrap(ExactShapley, "value", "Shapley valuation")
    _wrap(books, "evaluate_params", "evaluation")
    for name in dir(sampling):
        candidate = getattr(sampling, name)
        if isinstance(candidate, type) and callable(getattr(candidate, "value", None)):
            _wrap(candidate, "value", f"Shapley valuation ({name})")


def _report(path: Path) -> None:
    with _LOCK:
        report = {
            "times": dict(_TIMES),
            "calls": dict(_CALLS),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    path.write_text(json.dumps(report))


def books_process_main(timings: Path) -> None:
    """In the coordinator's books process: time the books' parts, report after each round."""
    from fedledger.coordinator import books_process

    _wrap_books_parts()
    _wrap(books_process, "close_books", "pricing: screen, value, aggregate")
    _wrap(books_process, "load_round_inputs", "round inputs loaded from the store")
    answer = books_process._books

    @functools.wraps(answer)
    def reported(*args: Any, **kwargs: Any) -> Any:
        try:
            return answer(*args, **kwargs)
        finally:
            _report(timings)

    books_process._books = reported


def coordinator_main(argv: Sequence[str]) -> int:
    """The coordinator's process: time its parts, serve."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--timings", type=Path, required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    opts = parser.parse_args(list(argv))
    rest = opts.rest[1:] if opts.rest[:1] == ["--"] else opts.rest
    import typer

    from fedledger.cli import app
    from fedledger.coordinator.books_process import BooksProcess
    from fedledger.coordinator.rounds import RoundMachine
    from fedledger.coordinator.service import RoundService
    from fedledger.coordinator.settlement import Settler
    from fedledger.incentive.ledger import LedgerClient

    _wrap(RoundService, "admit_upload", "upload verification (each)")  # headers, chain
    _wrap(RoundService, "store_upload", "upload body check and store (each)")
    _wrap(RoundMachine, "close", "round close (all)")
    _wrap(BooksProcess, "close_books", "books process: a round asked and answered")
    _wrap(Settler, "settle", "settlement transaction")
    _wrap(LedgerClient, "_view", "chain reads")
    _wrap_books_parts()
    os.environ[BOOKS_TIMINGS_ENV] = str(books_timings(opts.timings))
    # uvicorn re-raises SIGTERM on the handler it found: let that one return normally.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        typer.main.get_command(app).main(args=rest, prog_name="fedledger", standalone_mode=False)
    finally:
        _report(opts.timings)
    return 0


def books_timings(timings: Path) -> Path:
    return timings.with_suffix(".books.json")


# ------------------------------------------------------------------------------ driver


@dataclass
class ScaleResult:
    num_orgs: int
    num_params: int
    status: str = "ok"  # "ok", or what stopped the round
    blocker: str | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    coordinator_s: dict[str, float] = field(default_factory=dict)
    coordinator_calls: dict[str, int] = field(default_factory=dict)
    node_s: dict[str, float] = field(default_factory=dict)  # summed over organisations
    memory_mib: dict[str, float] = field(default_factory=dict)
    round: dict[str, Any] = field(default_factory=dict)


def _proc_status(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, *, key: str) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd``, signing with the devnet ``key`` from its environment (FEDLEDGER_KEY), never
    from a command line that every user of the machine can read."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV, "FEDLEDGER_KEY": key},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def run(
    num_orgs: int,
    hidden: int,
    workdir: Path,
    *,
    close_timeout_s: float,
    books_process: str = "auto",
) -> ScaleResult:
    """One round of ``num_orgs`` organisations on a 64-``hidden``-10 MLP; see the module doc."""
    import httpx

    from fedledger import wire
    from fedledger.devnet.anvil import free_port, start_anvil
    from fedledger.devnet.deploy import deploy_devnet
    from fedledger.incentive.chain import connect, devnet_account
    from fedledger.incentive.ledger import LedgerClient
    from fedledger.node.client import CoordinatorClient
    from fedledger.node.runner import NodeRunner
    from fedledger.tasks import base as task_base

    result = ScaleResult(num_orgs, num_params(hidden))
    result.blocker = valuator_blocker(num_orgs)
    spec_file = write_spec(workdir, hidden)
    task = load_task(load_spec(spec_file), "node")

    started = time.perf_counter()
    anvil = start_anvil(accounts=num_orgs + 2)
    try:
        w3 = connect(anvil.rpc_url)
        deployment = deploy_devnet(w3, num_orgs, rpc_url=anvil.rpc_url, task_spec=task.spec.hash)
        deployment_file = workdir / "deployment.json"
        deployment.save(deployment_file)
        assert deployment.accounts is not None and deployment.accounts.coordinator.private_key
        result.phases_s["anvil + deploy + register"] = time.perf_counter() - started
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        timings = workdir / "coordinator.json"
        log = workdir / "coordinator.log"
        cmd = [
            sys.executable, str(SCRIPT), "--role", "coordinator",
            "--timings", str(timings), "--",
            "coordinator", "serve",
            "--deployment", str(deployment_file),
            "--data-dir", str(workdir / "coordinator"),
            "--port", str(port),
            "--rounds", "1",
            "--spec", str(spec_file),
            "--round-timeout", str(max(300.0, 3.0 * num_orgs)),
            "--books-process", books_process,
        ]  # fmt: skip
        key = deployment.accounts.coordinator.private_key
        assert key is not None
        with _process(cmd, log, key=key) as coordinator:
            phase = time.perf_counter()
            client = CoordinatorClient(url, timeout_s=300)
            deadline = time.monotonic() + 120
            while True:
                if coordinator.poll() is not None:
                    raise RuntimeError(f"the coordinator exited:\n{_tail(log)}")
                with contextlib.suppress(httpx.TransportError, OSError):
                    if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the coordinator did not answer:\n{_tail(log)}")
                time.sleep(0.1)
            result.phases_s["coordinator start-up (round 1 open)"] = time.perf_counter() - phase
            result.memory_mib["coordinator RSS, idle"] = _proc_status(coordinator.pid, "VmRSS") or 0

            node_times: dict[str, float] = {}
            original_train = task_base.train_local

            def timed_train(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return original_train(*args, **kwargs)
                finally:
                    node_times["training"] = node_times.get("training", 0.0) + (
                        time.perf_counter() - t0
                    )

            task_base.train_local = timed_train  # type: ignore[assignment]
            torch.set_num_threads(1)
            phase = time.perf_counter()
            try:
                current = client.current_round()
                runners = [
                    NodeRunner(
                        client,
                        LedgerClient(w3, deployment.ledger, devnet_account(2 + k)),
                        task,
                        task.load_data(f"{k}/{num_orgs}"),
                        seed=k,
                    )
                    for k in range(num_orgs)
                ]
                # Concurrently: each node uploads only once every organisation has committed.
                with ThreadPoolExecutor(num_orgs) as pool:
                    outcomes = list(pool.map(lambda runner: runner.take_part(current), runners))
                for k, outcome in enumerate(outcomes):
                    if outcome is None:
                        raise RuntimeError(f"organisation {k} could not take part:\n{_tail(log)}")
            finally:
                task_base.train_local = original_train
            result.node_s = node_times
            result.phases_s[f"{num_orgs} organisations: train, commit, upload (concurrent)"] = (
                time.perf_counter() - phase
            )
            result.memory_mib["coordinator RSS, all uploads stored"] = (
                _proc_status(coordinator.pid, "VmRSS") or 0
            )

            phase = time.perf_counter()
            deadline = time.monotonic() + close_timeout_s
            outcome: dict[str, Any] = {}
            while time.monotonic() < deadline:
                outcome = client.round_result(1).model_dump(mode="json")
                if outcome["status"] in (wire.RoundStatus.FINALIZED, wire.RoundStatus.FAILED):
                    break
                if "Traceback" in _tail(log, 200):
                    result.status = "round close crashed in the coordinator:\n" + _tail(log)
                    break
                time.sleep(0.2)
            else:
                result.status = f"round not closed within {close_timeout_s:.0f} s:\n{_tail(log)}"
            closed = "settled" if result.status == "ok" else "it stopped"
            result.phases_s[f"round close (last upload to {closed})"] = time.perf_counter() - phase
            result.memory_mib["coordinator peak (VmHWM)"] = (
                _proc_status(coordinator.pid, "VmHWM") or 0
            )
            client.close()
            result.round = {
                k: outcome.get(k)
                for k in (
                    "status",
                    "validation_accuracy",
                    "valuation_method",
                    "evaluations",
                    "settlement",
                    "reason",
                )
            }
            if outcome.get("status") == wire.RoundStatus.FAILED:
                result.status = f"round failed: {outcome.get('reason')}"
        report = json.loads(timings.read_text()) if timings.exists() else {}
        result.coordinator_s = report.get("times", {})
        result.coordinator_calls = report.get("calls", {})
        if "peak_rss_mib" in report:
            result.memory_mib["coordinator peak (ru_maxrss)"] = report["peak_rss_mib"]
        child = books_timings(timings)
        if child.exists():  # the books were closed in a process of their own
            report = json.loads(child.read_text())
            for part, seconds in report["times"].items():
                result.coordinator_s[f"books process: {part}"] = seconds
                result.coordinator_calls[f"books process: {part}"] = report["calls"][part]
            peak = report["peak_rss_mib"]
            result.memory_mib["books process peak (ru_maxrss)"] = peak
            result.memory_mib["coordinator + books process peaks"] = (
                result.memory_mib["coordinator peak (VmHWM)"] + peak
            )
    finally:
        anvil.stop()
    result.phases_s["total"] = time.perf_counter() - started
    return result


def print_result(r: ScaleResult) -> None:
    print(f"K = {r.num_orgs} organisations, P = {r.num_params:,} parameters")
    if r.blocker:
        print(f"BLOCKED: {r.blocker}")
    print()
    print(f"{'phase':<58} {'seconds':>9}")
    for name, seconds in r.phases_s.items():
        print(f"{name:<58} {seconds:>9.2f}")
    print()
    print(f"{'coordinator part':<58} {'seconds':>9} {'calls':>6}")
    for name, seconds in sorted(r.coordinator_s.items(), key=lambda kv: -kv[1]):
        print(f"{name:<58} {seconds:>9.2f} {r.coordinator_calls.get(name, 0):>6}")
    for name, seconds in r.node_s.items():
        print(f"{'organisations (this process): ' + name:<58} {seconds:>9.2f}")
    print()
    for name, mib in r.memory_mib.items():
        print(f"{name:<58} {mib:>9.0f} MiB")
    print()
    print("round: " + ", ".join(f"{k} {v}" for k, v in r.round.items() if v is not None))
    print(f"status: {r.status}")


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["--role"]:
        if argv[1:2] != ["coordinator"]:
            raise SystemExit(f"unknown role {argv[1:2]}")
        return coordinator_main(argv[2:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 organisations, P ~ 19k")
    parser.add_argument("--orgs", type=int, default=FULL_ORGS)
    parser.add_argument("--hidden", type=int, default=FULL_HIDDEN)
    parser.add_argument("--close-timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--books-process",
        choices=("auto", "on", "off"),
        default="auto",
        help="the coordinator's --books-process (auto: on for the full model on 2+ cores)",
    )
    args = parser.parse_args(argv)
    num_orgs, hidden = (QUICK_ORGS, QUICK_HIDDEN) if args.quick else (args.orgs, args.hidden)
    print("command: python bench/scale.py " + " ".join(shlex.quote(a) for a in argv))
    policy = PricingPolicy()
    print(
        f"anvil; coordinator process (defaults: exact Shapley up to {policy.max_exact_players} "
        f"organisations, early stopping at {policy.valuation_stop_ratio}, Merkle claims above "
        f"{policy.claims_above}; torch threads: every core); organisations in this process, "
        f"concurrently, 1 torch thread; torch {torch.__version__}, {os.cpu_count()} cores\n"
    )
    with tempfile.TemporaryDirectory(prefix="fedledger-scale-") as tmp:
        result = run(
            num_orgs,
            hidden,
            Path(tmp),
            close_timeout_s=args.close_timeout,
            books_process=args.books_process,
        )
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2, default=str))
    return 0 if result.status == "ok" or result.blocker else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
elif __name__ == "__mp_main__" and os.environ.get(BOOKS_TIMINGS_ENV):
    books_process_main(Path(os.environ[BOOKS_TIMINGS_ENV]))

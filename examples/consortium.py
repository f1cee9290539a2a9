"""Run a consortium on a local devnet, as separate processes, with the `fedledger` command only.

    python examples/consortium.py SPEC --validation VAL.csv --data A.csv --data B.csv ...

starts anvil with the contracts deployed and the spec's hash recorded (`fedledger devnet up`),
the coordinator holding the validation set (`fedledger coordinator serve`), one node process per
data file (`fedledger node run`, each with its own key, given through FEDLEDGER_KEY and never on
a command line), waits for the rounds, then prints the rewards read from the contract
(`fedledger rewards`) and audits the last round (`fedledger audit`). Everything it does is a
command a consortium member could type; each process's output is prefixed with its name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def fedledger(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedledger", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start a process whose output goes to ``log`` and, prefixed with ``name``, to stdout."""
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )

    def relay() -> None:
        assert process.stdout is not None
        with log.open("w") as handle:
            for line in process.stdout:
                handle.write(line)
                handle.flush()
                print(f"[{name}] {line}", end="", flush=True)

    threading.Thread(target=relay, daemon=True).start()
    return process


def wait_http(url: str, process: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the coordinator exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no answer from {url} within {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="the consortium's task spec file")
    parser.add_argument("--validation", required=True, help="the coordinator's validation data")
    parser.add_argument(
        "--data", action="append", required=True, help="one organisation's data (repeat)"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="a pricing knob for the coordinator (repeat), as `coordinator serve --set` takes it",
    )
    parser.add_argument("--work-dir", type=Path, default=Path(".fedledger-consortium"))
    args = parser.parse_args()

    work: Path = args.work_dir.resolve()
    if (work / "devnet" / "anvil.pid").exists():
        raise SystemExit(f"{work} holds a running devnet; remove it or pass another --work-dir")
    for previous in ("coordinator", "outbox", "logs", "devnet"):  # a fresh chain each run
        shutil.rmtree(work / previous, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    spec, count = str(args.spec.resolve()), len(args.data)
    devnet = work / "devnet"
    subprocess.run(
        fedledger(
            "devnet", "up",
            "--organisations", str(count),
            "--spec", spec,
            "--state-dir", str(devnet),
            "--port", str(free_port()),
        ),
        check=True,
    )  # fmt: skip
    deployment = devnet / "deployment.json"
    accounts = json.loads(deployment.read_text())["accounts"]
    processes: list[subprocess.Popen[str]] = []
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        coordinator = start(
            "coordinator",
            fedledger(
                "coordinator", "serve",
                "--deployment", str(deployment),
                "--data-dir", str(work / "coordinator"),
                "--spec", spec,
                "--validation", str(Path(args.validation).resolve()),
                "--rounds", str(args.rounds),
                "--quorum", str(count),
                "--round-timeout", "120",
                "--port", str(port),
                *(f"--set={knob}" for knob in args.set),
            ),
            logs / "coordinator.log",
            {**env, "FEDLEDGER_KEY": accounts["coordinator"]["private_key"]},
        )  # fmt: skip
        processes.append(coordinator)
        wait_http(f"{url}/v1/health", coordinator, 60)
        nodes = []
        stems = [Path(data).stem for data in args.data]
        for k, (data, org) in enumerate(zip(args.data, accounts["organisations"], strict=True)):
            name = stems[k] if stems.count(stems[k]) == 1 else f"{stems[k]}-{k}"  # unique
            nodes.append(
                start(
                    name,
                    fedledger(
                        "node", "run",
                        "--coordinator", url,
                        "--deployment", str(deployment),
                        "--spec", spec,
                        "--data", str(Path(data).resolve()),
                        "--outbox", str(work / "outbox" / name),
                    ),
                    logs / f"{name}.log",
                    {**env, "FEDLEDGER_KEY": org["private_key"]},
                )
            )  # fmt: skip
        processes.extend(nodes)
        failed = [n for n in nodes if n.wait() != 0]
        if failed:
            print(f"{len(failed)} node(s) failed; logs in {logs}", file=sys.stderr)
            return 1
        common = ["--deployment", str(deployment)]
        subprocess.run(fedledger("rewards", *common), check=True, env=env)
        audit = fedledger(
            "audit", "--round", str(args.rounds), "--data-dir", str(work / "coordinator"), *common
        )
        return subprocess.run(audit, env=env).returncode
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        subprocess.run(fedledger("devnet", "down", "--state-dir", str(devnet)), check=False)


if __name__ == "__main__":
    raise SystemExit(main())

"""Start and stop a local anvil devnet (the native binary from devnet/node_modules, by PID)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedledger.errors import ChainError, DevnetError
from fedledger.incentive.chain import DEVNET_MNEMONIC, connect, wait_for_rpc

DEVNET_DIR = Path(__file__).resolve().parent
ANVIL_CHAIN_ID = 31337


def find_anvil() -> Path:
    """The native anvil binary: $FEDLEDGER_ANVIL, devnet/node_modules, then PATH."""
    env = os.environ.get("FEDLEDGER_ANVIL")
    candidates = [Path(env)] if env else []
    candidates.append(
        DEVNET_DIR / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
    )
    on_path = shutil.which("anvil")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise DevnetError("anvil not found: run `npm install` in devnet/ or set FEDLEDGER_ANVIL")


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``: a bind test, as anvil would bind
    (``SO_REUSEADDR``, so a closed connection's TIME_WAIT does not count, a listener does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise DevnetError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return False


def is_anvil(pid: int) -> bool:
    """Whether ``pid`` is a running anvil (not a process that inherited a stale pid file's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not our devnet
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:  # exited meanwhile
        return False
    except OSError:  # no /proc here: trust the pid
        return True
    program = cmdline.split(b"\0", 1)[0]
    return "anvil" in Path(os.fsdecode(program)).name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class AnvilProcess:
    """A running anvil; ``stop()`` ends it with SIGTERM (it exits cleanly and dumps --state)."""

    pid: int
    rpc_url: str
    process: subprocess.Popen[bytes] | None = None

    def stop(self, timeout_s: float = 5.0) -> None:
        stop_pid(self.pid, timeout_s=timeout_s)
        if self.process is not None:
            self.process.wait(timeout=timeout_s)


def start_anvil(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    accounts: int = 10,
    chain_id: int = ANVIL_CHAIN_ID,
    state_file: Path | None = None,
    detach: bool = False,
    timeout_s: float = 10.0,
) -> AnvilProcess:
    """Start anvil on loopback with the devnet mnemonic and wait until it answers RPC.

    With ``state_file`` the chain is loaded from it when it exists and written to it every
    second and on exit (SIGTERM). Raises ``DevnetError`` if anvil exits before it answers
    (a port taken meanwhile, a state file it cannot load).
    """
    port = port or free_port(host)
    cmd = [
        str(find_anvil()),
        "--host",
        host,
        "--port",
        str(port),
        "--mnemonic",
        DEVNET_MNEMONIC,
        "--chain-id",
        str(chain_id),
        "--accounts",
        str(accounts),
        "--quiet",
    ]
    if state_file is not None:
        cmd += ["--state", str(state_file), "--state-interval", "1"]
    process = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=detach,
    )
    rpc_url = f"http://{host}:{port}"
    try:
        _wait_ready(process, rpc_url, timeout_s=timeout_s)
    except DevnetError:
        process.kill()
        process.wait(timeout=5)
        raise
    return AnvilProcess(pid=process.pid, rpc_url=rpc_url, process=None if detach else process)


def _wait_ready(process: subprocess.Popen[bytes], rpc_url: str, *, timeout_s: float) -> None:
    """Wait until ``process`` answers RPC at ``rpc_url``; fail as soon as it exits instead."""
    w3 = connect(rpc_url, timeout_s=2)
    deadline = time.monotonic() + timeout_s
    while True:
        if (status := process.poll()) is not None:
            raise DevnetError(
                f"anvil exited with status {status} before answering on {rpc_url} (is the "
                "port taken, or its state file unreadable?)"
            )
        try:
            wait_for_rpc(w3, timeout_s=0.2)
        except ChainError as exc:
            if time.monotonic() > deadline:
                raise DevnetError(f"anvil did not start on {rpc_url}: {exc}") from exc
            continue
        if process.poll() is None:  # the answer was anvil's, not another listener's
            return


def stop_pid(pid: int, *, timeout_s: float = 5.0) -> bool:
    """SIGTERM ``pid`` and wait for it to go (SIGKILL after ``timeout_s``). False if it was not running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return True
        except ChildProcessError:  # not our child: poll for existence
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True

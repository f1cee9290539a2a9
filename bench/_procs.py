"""What the benchmarks share for the processes they start: their environment, a context that
ends them, their logs' last lines and their /proc status.

Imported by name from the scripts beside it (``python bench/NAME.py`` puts this folder on the
path; ``bench/run.py`` and the smoke tests add it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
"""One thread a process: the benchmarks start several on two cores."""


@contextlib.contextmanager
def process(cmd: list[str], log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` running with its output in ``log`` and ``env`` added; ended (SIGTERM, then
    SIGKILL after 30 s) when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV, **env},
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def proc_status(pid: int, key: str) -> float | None:
    """A field of ``/proc/PID/status`` as its number (kB for memory, a count for ``Threads``),
    or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None

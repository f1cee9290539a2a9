"""Close a round's books in a process of its own.

A large model's valuation is minutes of small matrix products, each an OpenMP parallel region.
In the coordinator's process they run on the round-driver thread while the event loop and the
request threads use OpenMP too; GNU OpenMP then keeps more pool threads than there are cores
and lets idle workers spin only briefly, so every region pays its workers' wake-up
(docs/benchmarks.md section 4: 0.06-0.1 ms a region, the screens and the valuation of a
1e6-parameter model at K = 100 a quarter slower than on a process's only OpenMP thread). A
child process, started with the coordinator and kept, is its own only OpenMP user.

The child reads the round's inputs from the data directory itself (``load_round_inputs``, read
only, as ``fedledger audit`` does) and closes them with ``close_books``: the same inputs and the
same deterministic code as in the coordinator's process, so the books are the same bit for bit.
The ledger's commit order is read by the coordinator and sent with the request. Messages are
pickled over a pipe to this process's own child: nothing that crossed a network is unpickled.

If the child dies (killed for memory, say), the request fails with ``books_process_failed`` and
the next one starts a fresh child: the round driver retries a failed close.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

import torch

from fedledger.coordinator.books import Books, close_books
from fedledger.coordinator.inputs import load_round_inputs
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.store import Store
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.failpoints import BOOKS_BEFORE_ANSWER, failpoint
from fedledger.incentive.compression import Codec

log = logging.getLogger("fedledger.coordinator")

BooksProcessSetting = Literal["auto", "on", "off"]

MIN_PARAMS = 100_000
"""``auto`` closes the books in a process of their own for models of at least this many
parameters (on a CPU of more than one thread): below it a round's books take well under a
second, and the child would only cost its memory (~300 MB for torch) and its start (2-3 s)."""

START_TIMEOUT_S = 120.0
"""How long the coordinator waits for a new child to import torch and answer that it is ready."""


@dataclass(frozen=True)
class BooksSetup:
    """What every round's books are closed against, sent to the child once."""

    data_dir: Path
    model: torch.nn.Module
    x_val: torch.Tensor
    y_val: torch.Tensor
    codec: Codec
    policy: PricingPolicy
    device: str
    threads: int


def wanted(setting: BooksProcessSetting, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the books go to a process of their own: ``on``, ``off``, or ``auto`` (a model of
    ``MIN_PARAMS`` or more, valued on a CPU with more than one thread)."""
    if setting != "auto":
        return setting == "on"
    num_params = sum(p.numel() for p in model.parameters())
    return device.type == "cpu" and torch.get_num_threads() > 1 and num_params >= MIN_PARAMS


class BooksProcess:
    """A child process that closes rounds' books (``close_books``) for the round driver.

    ``start`` spawns it and sends the setup, ``wait_ready`` waits until the child has it (the
    coordinator's start-up does its own work in between); ``close_books`` sends a round and
    waits for its books, passing the valuation's progress on, starting a fresh child first if
    the last one died; ``stop`` ends it, at once if a round is in progress (that round's close
    is redone, as after a crash). One request at a time.
    """

    def __init__(self, setup: BooksSetup) -> None:
        self.setup = setup
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._starting = False  # spawned and sent the setup; its answer not read yet
        self._stopped = False

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Spawn the child, if none runs, and send it the setup; do not wait."""
        with self._lock:
            self._spawn()

    def wait_ready(self) -> None:
        """Wait until the child has the setup (spawning one if none runs); raises
        ``books_process_failed`` if it cannot start, or the child's error with the setup."""
        with self._lock:
            self._ensure_started()

    def close_books(
        self,
        round_id: int,
        commit_order: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> Books:
        """Round ``round_id``'s books, closed by the child (``close_books``'s ``progress``)."""
        with self._lock:
            self._ensure_started()
            conn = self._conn
            assert conn is not None
            self._send(conn, ("books", round_id, list(commit_order)), f"round {round_id}")
            while True:
                message = self._receive(conn, f"round {round_id}")
                if message[0] == "progress":
                    if progress is not None:
                        progress(message[1], message[2])
                elif message[0] == "books":
                    books: Books = message[1]
                    return books
                else:
                    raise message[1]

    def stop(self) -> None:
        """End the child: asked to exit, else terminated (it holds nothing to save)."""
        self._stopped = True
        process, conn = self._process, self._conn
        if process is None:
            return
        if conn is not None:
            with suppress(OSError):  # gone already
                conn.send_bytes(pickle.dumps(None))
        process.join(timeout=2)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()

    # ------------------------------------------------------------------ the pipe

    def _spawn(self) -> None:
        if self._stopped:
            raise CoordinatorError(
                ErrorCode.BOOKS_PROCESS_FAILED, "the books process was stopped with the service"
            )
        if self._process is not None and self._process.is_alive():
            return
        self._discard()
        context = multiprocessing.get_context("spawn")  # fork would copy threads and locks
        parent, child = context.Pipe(duplex=True)
        process = context.Process(target=_serve, args=(child,), name="fedledger-books", daemon=True)
        process.start()
        child.close()  # this end is the child's: its exit is then seen as an end of file
        self._process, self._conn = process, parent
        self._starting = True
        self._send(parent, ("setup", self.setup), "its start")

    def _ensure_started(self) -> None:
        self._spawn()
        if not self._starting:
            return
        parent, process = self._conn, self._process
        assert parent is not None and process is not None
        if not parent.poll(START_TIMEOUT_S):
            self._discard()
            raise CoordinatorError(
                ErrorCode.BOOKS_PROCESS_FAILED,
                f"the books process did not start within {START_TIMEOUT_S:.0f} s",
            )
        message = self._receive(parent, "its start")
        if message[0] != "ready":
            self._discard()
            raise message[1]
        self._starting = False
        log.info("books process %d ready (%d threads)", process.pid, self.setup.threads)

    def _discard(self) -> None:
        """Forget a child that died or failed, killing it if it still runs."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
        self._starting = False

    def _send(self, conn: Connection, message: tuple[Any, ...], what: str) -> None:
        try:
            conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise self._died(what) from exc

    def _receive(self, conn: Connection, what: str) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise self._died(what) from exc
        return message

    def _died(self, what: str) -> CoordinatorError:
        process = self._process
        if process is not None:
            process.join(timeout=5)
        code = None if process is None else process.exitcode
        self._discard()
        how = (
            "was stopped with the service"
            if self._stopped
            else f"exited (code {code}{_signal_name(code)})"
        )
        return CoordinatorError(
            ErrorCode.BOOKS_PROCESS_FAILED,
            f"the books process {how} during {what}; a fresh one is started for the next try",
            exit_code=code,
        )


def _signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return ""
    try:
        return f": {signal.Signals(-code).name}"
    except ValueError:
        return ""


# ------------------------------------------------------------------ the child


def _serve(conn: Connection) -> None:
    """The child's loop: take the setup, then close each round asked for, until told to stop or
    the coordinator's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    setup: BooksSetup | None = None

    def send(message: tuple[Any, ...]) -> None:
        conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            if message[0] == "setup":
                setup = message[1]
                torch.set_num_threads(setup.threads)
                send(("ready",))
                continue
            assert setup is not None, "a round before the setup"
            _, round_id, commit_order = message
            books = _books(setup, round_id, commit_order, lambda d, t: send(("progress", d, t)))
            failpoint(BOOKS_BEFORE_ANSWER)
            send(("books", books))
        except Exception as exc:  # every failure goes back to the coordinator
            send(("error", _portable(exc)))


def _books(
    setup: BooksSetup,
    round_id: int,
    commit_order: list[str],
    progress: Callable[[int, int], None],
) -> Books:
    with closing(Store(setup.data_dir, read_only=True)) as store:
        inputs = load_round_inputs(
            store, round_id, commit_order, setup.model, setup.x_val, setup.y_val, setup.codec
        )
    return close_books(inputs, setup.policy, device=torch.device(setup.device), progress=progress)


def _portable(exc: Exception) -> Exception:
    """``exc`` with the child's traceback as a note, or a ``RuntimeError`` in its words when it
    does not survive pickling."""
    exc.add_note(f"in the books process {os.getpid()}:\n{traceback.format_exc()}")
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any exception type may refuse to pickle
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    return exc

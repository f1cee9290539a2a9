"""Long polls that hold no thread, and caps on what clients hold at once: the round's state as
the driver last saw it and waits for it to change; how many waits one client address (and
everyone) may hold; how many upload bodies are received at once.

A long poll used to block a worker thread for up to 30 s; forty of them stalled every other
request. Here an async wait is a future on the event loop, resolved from the driver's thread
when the round moves on, and a thread-blocking wait (for code that runs outside the loop) is a
condition variable notified at the same moment.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from fedledger import wire
from fedledger.errors import CoordinatorError, ErrorCode

RoundState = tuple[int, wire.RoundStatus, bool] | None
"""The latest round's id, status and whether its commit phase is over (None before the first
round opens)."""

Known = tuple[int, wire.RoundStatus, bool | None]
"""What a long poll knows of the round: its id, status and, when the poller waits for the end
of the commit phase, whether it is over (None: that part is not waited on)."""


def differs(state: RoundState, known: Known) -> bool:
    """Whether ``state`` is news to a poller that knows ``known``."""
    if state is None:
        return False
    round_id, status, closed = known
    return state[:2] != (round_id, status) or (closed is not None and state[2] != closed)


class RoundWatch:
    """The latest round's ``RoundState``, set by whoever moves the round on, and waits for it to
    differ from what a caller knows (``differs``). Thread-safe; ``wait`` blocks a thread,
    ``wait_async`` only a coroutine."""

    def __init__(self) -> None:
        self._state: RoundState = None
        self._closed = False
        self._changed = threading.Condition()
        self._futures: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    @property
    def state(self) -> RoundState:
        return self._state

    @property
    def waiting(self) -> int:
        """Async waits held now (the API's long polls)."""
        with self._changed:
            return len(self._futures)

    def set(self, state: RoundState) -> None:
        """Record the round's state; every wait for a change is answered if it changed."""
        with self._changed:
            if state == self._state:
                return
            self._state = state
            self._release()

    def close(self) -> None:
        """Answer every wait now, and every later one at once (the service is stopping)."""
        with self._changed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        self._changed.notify_all()
        for loop, future in self._futures:
            loop.call_soon_threadsafe(_resolve, future)
        self._futures.clear()

    def _settled(self, known: Known) -> bool:
        return self._closed or differs(self._state, known)

    def news(self, known: Known) -> bool:
        """Whether the state already differs from ``known`` (a poll is answered at once)."""
        with self._changed:
            return self._settled(known)

    def wait(self, known: Known, timeout_s: float) -> None:
        """Block until the state differs from ``known`` (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._settled(known) and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)

    async def wait_async(self, known: Known, timeout_s: float) -> None:
        """``wait`` without holding a thread: the coroutine sleeps on a future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._changed:
            if self._settled(known):
                return
            self._futures.add((loop, future))
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            with self._changed:
                self._futures.discard((loop, future))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class WaitLimiter:
    """At most ``per_client`` long polls held for one client address, ``total`` in all.

    Used from the event loop only (no lock): a client over its share is answered 429
    ``too_many_waits`` at once instead of being held."""

    RETRY_AFTER_S = 1

    def __init__(self, *, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.held = 0
        self._held: Counter[str] = Counter()

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        if self._held[client] >= self.per_client or self.held >= self.total:
            raise CoordinatorError(
                ErrorCode.TOO_MANY_WAITS,
                f"{self._held[client]} long polls are held for {client} already (at most "
                f"{self.per_client} a client, {self.total} in all); poll without wait_s or "
                "hold one at a time",
                retry_after_s=self.RETRY_AFTER_S,
                per_client=self.per_client,
            )
        self._held[client] += 1
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
            self._held[client] -= 1
            if not self._held[client]:
                del self._held[client]


class UploadSlots:
    """At most ``total`` upload bodies received at once, one per organisation.

    Taken only once an upload's headers passed every check (so only registered organisations
    with a commitment hold one), and for as long as the body takes to arrive and be stored.
    Used from the event loop only."""

    RETRY_AFTER_S = 1

    def __init__(self, total: int) -> None:
        self.total = total
        self._receiving: set[str] = set()

    @property
    def held(self) -> int:
        return len(self._receiving)

    @contextmanager
    def hold(self, organisation: str) -> Iterator[None]:
        if organisation in self._receiving:
            raise CoordinatorError(
                ErrorCode.UPLOAD_IN_PROGRESS,
                f"an upload from {organisation} is being received on another connection; "
                "wait for its answer",
            )
        if len(self._receiving) >= self.total:
            raise CoordinatorError(
                ErrorCode.BUSY,
                f"{self.total} uploads are being received already; retry in a moment",
                retry_after_s=self.RETRY_AFTER_S,
                max_concurrent_uploads=self.total,
            )
        self._receiving.add(organisation)
        try:
            yield
        finally:
            self._receiving.discard(organisation)

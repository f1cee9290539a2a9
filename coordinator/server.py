"""The coordinator's HTTP server: uvicorn with limits that keep any one client from holding it.

uvicorn bounds what it buffers of a request's headers (h11's incomplete-event limit) and closes
an idle keep-alive connection, but waits for ever on a connection that sends part of a request
line, or nothing at all. ``GuardedH11Protocol`` gives every request ``header_timeout_s`` from its
first byte (or from the connection's opening) to complete its headers, then closes the
connection; the body's own deadlines are the API's (``read_limited_body``). ``limit_concurrency``
caps open connections and requests in progress (uvicorn answers 503 beyond it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedledger.coordinator.config import CoordinatorSettings

log = logging.getLogger("fedledger.coordinator.server")

KEEP_ALIVE_S = 5
"""How long an idle keep-alive connection stays open between requests."""


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take too long."""

    header_timeout_s = 10.0  # set per server by ``guarded_protocol``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()  # a connection that never sends a byte is closed too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers are all in
            self._cancel_header_timer()
        elif self.conn.trailing_data[0]:  # part of the next request: its headers are timed
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info(
            "closed the connection from %s: no complete request within %g s",
            client,
            self.header_timeout_s,
        )
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """``GuardedH11Protocol`` with this server's header timeout (uvicorn builds the protocol
    from its class, so the setting travels on a subclass)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})


def server_config(app: FastAPI, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """The uvicorn config for the coordinator ``app`` (from ``create_app``), its limits taken
    from the service's settings; ``options`` are uvicorn's own (TLS, logging)."""
    settings: CoordinatorSettings = app.state.service.settings
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=KEEP_ALIVE_S,
        **options,
    )

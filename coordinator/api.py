"""The coordinator's HTTP API (FastAPI): rounds, models, uploads, results and health.

Domain errors map to an HTTP status and a stable ``code`` here and nowhere else. An upload's
headers are verified before its body is read; the body is then read with a hard size limit and
deadlines, so nobody makes the coordinator buffer or wait for what it would refuse. Long polls
wait on the event loop, holding no thread (``waits``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BeforeValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fedledger import wire
from fedledger.coordinator.dashboard import router as dashboard_router
from fedledger.coordinator.metrics import metrics_router
from fedledger.coordinator.results import for_non_members
from fedledger.coordinator.service import RoundService
from fedledger.coordinator.waits import UploadSlots, WaitLimiter
from fedledger.errors import ChainError, ChainUnavailable, CodedError, CoordinatorError, ErrorCode
from fedledger.incentive.onchain import hex32

log = logging.getLogger("fedledger.coordinator.api")


MAX_MESSAGE_CHARS = 2000
"""The longest message an error answer carries; a longer one is cut, saying how much was."""
MAX_DETAIL_CHARS = 200
MAX_DETAIL_ITEMS = 20


def clip(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _clip_detail(value: object) -> object:
    """A detail value bounded in size: strings cut, lists and maps to their first items."""
    if isinstance(value, str):
        return clip(value, MAX_DETAIL_CHARS)
    if isinstance(value, list | tuple):
        kept = [_clip_detail(v) for v in value[:MAX_DETAIL_ITEMS]]
        more = len(value) - MAX_DETAIL_ITEMS
        return [*kept, f"... ({more} more)"] if more > 0 else kept
    if isinstance(value, dict):
        return {clip(str(k), MAX_DETAIL_CHARS): _clip_detail(v) for k, v in value.items()}
    return value


def _error(status: int, code: str, message: str, **details: object) -> JSONResponse:
    """An error answer, bounded in size whatever the refused input made of its message."""
    body = wire.ErrorBody(
        code=code,
        message=clip(message, MAX_MESSAGE_CHARS),
        details={k: _clip_detail(v) for k, v in list(details.items())[:MAX_DETAIL_ITEMS]},
    )
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"))


def check_declared_length(request: Request, limit_bytes: int) -> None:
    """Refuse a declared Content-Length that is not an integer or is over ``limit_bytes``."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not (declared.isascii() and declared.isdigit()):
        raise CoordinatorError(ErrorCode.BAD_CONTENT_LENGTH, "Content-Length is not an integer")
    if int(declared) > limit_bytes:
        raise CoordinatorError(
            ErrorCode.TOO_LARGE,
            f"the body of {int(declared)} bytes exceeds the limit of {limit_bytes} bytes",
            limit_bytes=limit_bytes,
        )


async def read_limited_body(
    request: Request,
    limit_bytes: int,
    *,
    idle_timeout_s: float,
    total_timeout_s: float,
    check_head: Callable[[bytes], int | None] | None = None,
) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed ``limit_bytes``, and
    (408) once it pauses longer than ``idle_timeout_s`` or takes longer than ``total_timeout_s``.

    Bytes are counted while streaming, so a missing, lying or chunked length cannot make us
    buffer more; a client that sends nothing cannot hold the request. A client that goes away
    raises starlette's ``ClientDisconnect``. ``check_head`` is given the body's first bytes
    until it returns the body's exact length (or refuses them): an upload's safetensors header
    is judged as soon as it is in, and nothing past the length it implies is read.
    """
    check_declared_length(request, limit_bytes)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_timeout_s
    chunks: list[bytes] = []
    received = 0
    head = b""  # the first bytes, while check_head still wants more
    expected: int | None = None  # the body's length, once check_head knows it
    stream = request.stream()
    while True:
        wait_s = min(idle_timeout_s, deadline - loop.time())
        try:
            chunk = await asyncio.wait_for(anext(stream), max(wait_s, 0.0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            paused = wait_s >= idle_timeout_s
            raise CoordinatorError(
                ErrorCode.BODY_TIMEOUT,
                f"the body stopped arriving for {idle_timeout_s:g} s after {received} bytes"
                if paused
                else f"the body took longer than {total_timeout_s:g} s ({received} bytes arrived)",
                received=received,
            ) from None
        received += len(chunk)
        if received > limit_bytes:
            raise CoordinatorError(
                ErrorCode.TOO_LARGE,
                f"the body exceeds the limit of {limit_bytes} bytes",
                limit_bytes=limit_bytes,
            )
        chunks.append(chunk)
        if check_head is not None and expected is None:
            head += chunk
            expected = check_head(head)
        if expected is not None and received > expected:
            raise CoordinatorError(
                ErrorCode.TOO_LARGE,
                f"the body goes on past the {expected} bytes its safetensors header describes",
                limit_bytes=expected,
            )


def get_service(request: Request) -> RoundService:
    """The RoundService behind this app (a dependency, so tests can override it)."""
    service: RoundService = request.app.state.service
    return service


Service = Annotated[RoundService, Depends(get_service)]

MAX_ID = 2**63 - 1
"""The largest round id the coordinator stores (SQLite's INTEGER); the ledger's are 1, 2, ..."""


def _decimal(value: object) -> object:
    """Digits only: ``1.0``, ``+1``, `` 1`` and ``1_0`` are not round ids, though int() and
    lax parsing would take them for 1."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a decimal integer (digits only)")
    return value


RoundId = Annotated[
    int, BeforeValidator(_decimal), Path(ge=1, le=MAX_ID, description="a round id: 1, 2, ...")
]


def create_app(
    service: RoundService, *, manage_service: bool = False, members_only: bool = False
) -> FastAPI:
    """The FastAPI app over a RoundService; with ``manage_service`` it starts and stops it.
    ``members_only``: the transport admits members alone (mutual TLS with the consortium's
    CA), so every reader is one; otherwise only a signed read request is."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_service:
            await run_in_threadpool(service.start)
        try:
            yield
        finally:
            if manage_service:
                await run_in_threadpool(service.stop)

    app = FastAPIOffline(  # /docs and /redoc with their files bundled, not from a CDN
        title="fedledger coordinator",
        version="1",
        description="Verifies organisations' model updates against their on-chain commitments, "
        "aggregates them, prices each contribution by Shapley value and settles rewards on-chain.",
        lifespan=lifespan,
    )

    app.state.service = service
    app.include_router(dashboard_router)
    app.include_router(metrics_router(service.metrics))

    @app.exception_handler(CodedError)
    async def on_coded_error(_: Request, exc: CodedError) -> JSONResponse:
        response = _error(exc.status, exc.code, exc.message, **exc.details)
        if isinstance(exc, CoordinatorError):
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ChainError)
    async def on_chain_error(request: Request, exc: ChainError) -> JSONResponse:
        return await on_coded_error(request, ChainUnavailable(f"the chain is unavailable: {exc}"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the input back (it may be large or not UTF-8): locations and messages only.
        fields = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
            for err in exc.errors()
        ]
        code = ErrorCode.INVALID_REQUEST
        return _error(code.status, code, "the request is malformed", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
        code = codes.get(exc.status_code, ErrorCode.HTTP_ERROR)
        return _error(exc.status_code, code, str(exc.detail))

    prefix = wire.API_PREFIX

    @app.get(f"{prefix}/health", response_model=wire.Health)
    def health(svc: Service) -> wire.Health:
        current = svc.current()
        return wire.Health(
            status="ok" if svc.last_error is None else f"degraded: {svc.last_error}",
            chain_id=svc.ledger.chain_id(),
            ledger=svc.ledger.address,
            round_id=current.round_id,
            training=current.training,
        )

    settings = service.settings
    waits = WaitLimiter(per_client=settings.max_waits_per_client, total=settings.max_waits)
    slots = UploadSlots(settings.max_concurrent_uploads)
    app.state.waits, app.state.uploads = waits, slots  # what clients hold now

    @app.get(
        f"{prefix}/rounds/current",
        response_model=wire.CurrentRound,
        responses={429: {"model": wire.ErrorBody}},
    )
    async def current_round(
        request: Request,
        svc: Service,
        after_round: Annotated[
            int | None, BeforeValidator(_decimal), Query(ge=0, le=MAX_ID)
        ] = None,
        after_status: wire.RoundStatus | None = None,
        after_commits_closed: bool | None = None,
        wait_s: Annotated[float, Query(ge=0, allow_inf_nan=False)] = 0.0,
    ) -> wire.CurrentRound:
        """The current round. With ``after_round``, ``after_status`` and ``wait_s``, a long
        poll: answers once the round or its status differs from those (or, with
        ``after_commits_closed``, whether its commit phase is over), or after ``wait_s``
        seconds (at most 30). A client address holds at most ``max_waits_per_client`` polls
        at once (429 ``too_many_waits`` beyond)."""
        if after_round is not None and after_status is not None and wait_s > 0:
            known = (after_round, after_status, after_commits_closed)
            if not svc.watch.news(known):
                client = request.client.host if request.client else "unknown"
                with waits.hold(client):
                    if after_commits_closed is False:
                        svc.hint_commits()  # a node that committed: the phase may be over
                    await svc.wait_for_change(known, wait_s)
        return await run_in_threadpool(svc.current)

    @app.get(f"{prefix}/rounds/{{round_id}}", response_model=wire.RoundResult)
    def round_result(round_id: RoundId, request: Request, svc: Service) -> wire.RoundResult:
        """A round's result; sample counts, norms and who was aggregated to members only."""
        member = members_only or svc.read_member(request.headers) is not None
        result = svc.round_result(round_id)
        return result if member else for_non_members(result)

    @app.get(
        f"{prefix}/rounds/{{round_id}}/claims/{{organisation}}",
        response_model=wire.ClaimTicket,
        responses={404: {"model": wire.ErrorBody}},
    )
    def claim_ticket(
        round_id: RoundId, organisation: Annotated[str, Path(max_length=42)], svc: Service
    ) -> wire.ClaimTicket:
        """An organisation's leaf and Merkle proof in a round settled by claims."""
        return svc.claim_ticket(round_id, organisation)

    @app.get(
        f"{prefix}/task",
        response_class=Response,
        responses={200: {"content": {"application/toml": {}}}},
    )
    def task_spec(svc: Service) -> Response:
        """The task spec file the coordinator runs, byte for byte (its keccak256 is the
        ledger's ``taskSpec()``)."""
        spec = svc.spec
        if spec is None:
            raise CoordinatorError(ErrorCode.NO_ROUND, "the coordinator has not started yet")
        return Response(
            content=spec.raw,
            media_type="application/toml",
            headers={wire.H_SPEC_HASH: hex32(spec.hash)},
        )

    @app.get(
        f"{prefix}/models/{{model_hash}}",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def model(model_hash: Annotated[str, Path(max_length=66)], svc: Service) -> Response:
        """The canonical safetensors bytes of a global model, by its keccak256 hash."""
        data = svc.model_bytes(model_hash)
        return Response(
            content=data,
            media_type="application/octet-stream",
            headers={wire.H_MODEL_HASH: model_hash.lower()},
        )

    @app.post(
        f"{prefix}/rounds/{{round_id}}/updates",
        response_model=wire.UploadReceipt,
        status_code=201,
        responses={
            200: {"model": wire.UploadReceipt, "description": "identical re-upload"},
            401: {"model": wire.ErrorBody},
            403: {"model": wire.ErrorBody},
            409: {"model": wire.ErrorBody},
            413: {"model": wire.ErrorBody},
            422: {"model": wire.ErrorBody},
            503: {"model": wire.ErrorBody},
        },
    )
    async def upload(
        round_id: RoundId, request: Request, response: Response, svc: Service
    ) -> wire.UploadReceipt | Response:
        """Upload a model update (canonical safetensors bytes) signed with EIP-712 headers.

        Acknowledged (201) only once the update is durably stored; an identical re-upload
        answers 200 with the original receipt.
        """
        limits = svc.settings
        read = False  # once the body is read, the connection can serve the next request
        try:
            check_declared_length(request, limits.max_upload_bytes)
            admitted = await run_in_threadpool(svc.admit_upload, round_id, request.headers)
            with slots.hold(admitted.organisation):
                try:
                    body = await read_limited_body(
                        request,
                        limits.max_upload_bytes,
                        idle_timeout_s=limits.body_idle_timeout_s,
                        total_timeout_s=limits.body_timeout_s,
                        check_head=svc.check_head,
                    )
                except CoordinatorError as exc:
                    svc.refuse_upload(exc.code, admitted.started)
                    raise
                read = True
                receipt, created = await run_in_threadpool(svc.store_upload, admitted, body)
        except CoordinatorError as exc:
            if not read:  # what is left of the body is not worth reading: close after answering
                exc.headers["Connection"] = "close"
            raise
        except ClientDisconnect:
            client = request.client.host if request.client else "a client"
            log.info("upload for round %d: %s disconnected before its body ended", round_id, client)
            return Response(status_code=400)  # nobody reads it
        response.status_code = 201 if created else 200
        return receipt

    return app

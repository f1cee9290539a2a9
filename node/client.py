"""HTTP client for the coordinator API (the node's only way to reach the coordinator)."""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from fedledger import wire
from fedledger.errors import (
    CoordinatorRejected,
    CoordinatorUnavailable,
    ErrorCode,
    ReceiptError,
    SetupError,
)

_CERTIFICATE_ALERTS = ("CERTIFICATE_VERIFY_FAILED", "CERTIFICATE_REQUIRED", "BAD_CERTIFICATE",
                       "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")  # fmt: skip


def _tls_failure(exc: BaseException) -> bool:
    """Whether a transport error is a failed TLS handshake over certificates (either side's)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or any(
            alert in str(seen) for alert in _CERTIFICATE_ALERTS
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str, *, insecure: bool = False) -> None:
    """Refuse plain HTTP to a coordinator on another host unless ``insecure``: updates, sample
    counts and signatures would cross the network in clear text."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SetupError(
            ErrorCode.INSECURE_TRANSPORT, f"{url!r} is not an http(s) URL of a coordinator"
        )
    if parts.scheme == "http" and not is_loopback(url) and not insecure:
        raise SetupError(
            ErrorCode.INSECURE_TRANSPORT,
            f"refusing plain HTTP to {parts.hostname}: use https:// (with --ca-cert for the "
            "consortium CA), or --insecure to send updates in clear text",
        )


class CoordinatorClient:
    """Thin typed wrapper over the coordinator's ``/v1`` endpoints; takes an injectable transport."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + wire.API_PREFIX,
            timeout=timeout_s,
            transport=transport,
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            if _tls_failure(exc):  # not transient: retrying cannot fix a certificate
                raise SetupError(
                    ErrorCode.TLS_REFUSED,
                    f"TLS with the coordinator at {self.base_url} failed ({exc}): its "
                    "certificate does not verify against the CA given (--ca-cert), or it "
                    "refused this node's client certificate (--client-cert, --client-key)",
                ) from exc
            raise CoordinatorUnavailable(f"coordinator unreachable: {exc}") from exc
        if response.status_code >= 500 or response.status_code == 429:  # try again later
            retry = response.headers.get("retry-after")
            raise CoordinatorUnavailable(
                f"coordinator answered {response.status_code}: {response.text[:300]}",
                retry_after_s=float(retry) if retry and retry.isdigit() else None,
            )
        if response.status_code >= 400:
            try:
                body = wire.ErrorBody.model_validate(response.json())
            except ValueError:
                body = wire.ErrorBody(code="http_error", message=response.text[:300])
            raise CoordinatorRejected(response.status_code, body.code, body.message, body.details)
        return response

    def health(self) -> wire.Health:
        return wire.Health.model_validate(self._request("GET", "/health").json())

    def current_round(
        self,
        *,
        after: wire.CurrentRound | None = None,
        wait_s: float = 0.0,
        commit_phase: bool = False,
    ) -> wire.CurrentRound:
        """The current round; with ``after``, wait up to ``wait_s`` for its round or status to
        change from that (``commit_phase``: or the end of its commit phase)."""
        params: dict[str, str | float] = {}
        if after is not None and wait_s > 0:
            params = {
                "after_round": after.round_id,
                "after_status": after.status.value,
                "wait_s": wait_s,
            }
            if commit_phase:
                params["after_commits_closed"] = "true" if after.commits_closed else "false"
        response = self._request("GET", "/rounds/current", params=params)
        return wire.CurrentRound.model_validate(response.json())

    def round_result(self, round_id: int) -> wire.RoundResult:
        return wire.RoundResult.model_validate(self._request("GET", f"/rounds/{round_id}").json())

    def claim_ticket(self, round_id: int, organisation: str) -> wire.ClaimTicket:
        path = f"/rounds/{round_id}/claims/{organisation}"
        return wire.ClaimTicket.model_validate(self._request("GET", path).json())

    def task_spec(self) -> bytes:
        """The task spec file the coordinator runs, byte for byte."""
        return self._request("GET", "/task").content

    def model(self, model_hash: str) -> bytes:
        return self._request("GET", f"/models/{model_hash}").content

    def upload(self, round_id: int, body: bytes, headers: dict[str, str]) -> wire.UploadReceipt:
        """POST an update; the coordinator's receipt as sent (``bad_receipt`` if it is not one:
        unsigned, say). The caller checks its signature and fields (``fedledger.receipts``)."""
        response = self._request(
            "POST",
            f"/rounds/{round_id}/updates",
            content=body,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        try:
            return wire.UploadReceipt.model_validate_json(response.content)
        except ValidationError as exc:
            fields = ", ".join(".".join(map(str, e["loc"])) or "(body)" for e in exc.errors())
            raise ReceiptError(
                ErrorCode.BAD_RECEIPT,
                f"the coordinator at {self.base_url} acknowledged the upload of round {round_id} "
                f"with no valid signed receipt (check {fields}): nothing proves it was stored",
            ) from exc

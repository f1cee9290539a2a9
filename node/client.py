"""HTTP client for the coordinator API (the node's only way to reach the coordinator)."""

from __future__ import annotations

from typing import Any

import httpx

from fedledger import wire
from fedledger.errors import CoordinatorRejected, CoordinatorUnavailable


class CoordinatorClient:
    """Thin typed wrapper over the coordinator's ``/v1`` endpoints; takes an injectable transport."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + wire.API_PREFIX, timeout=timeout_s, transport=transport
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
            raise CoordinatorUnavailable(f"coordinator unreachable: {exc}") from exc
        if response.status_code >= 500:
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
        self, *, after: wire.CurrentRound | None = None, wait_s: float = 0.0
    ) -> wire.CurrentRound:
        """The current round; with ``after``, wait up to ``wait_s`` for it to change from that."""
        params: dict[str, str | float] = {}
        if after is not None and wait_s > 0:
            params = {
                "after_round": after.round_id,
                "after_status": after.status.value,
                "wait_s": wait_s,
            }
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
        response = self._request(
            "POST",
            f"/rounds/{round_id}/updates",
            content=body,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        return wire.UploadReceipt.model_validate(response.json())

"""The coordinator's error root; each error carries its HTTP status and a stable code."""

from __future__ import annotations

from typing import Any


class CoordinatorError(Exception):
    """A request the coordinator refuses, or a failure it reports; mapped to HTTP in one place."""

    status: int = 400

    def __init__(
        self, code: str, message: str, *, status: int | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status
        self.details = details
        self.headers: dict[str, str] = {}


class Unauthorized(CoordinatorError):
    """The request is not signed by a registered organisation (401)."""

    status = 401


class Forbidden(CoordinatorError):
    """Signed by a registered organisation, but not allowed to do this (403)."""

    status = 403


class NotFound(CoordinatorError):
    status = 404


class Conflict(CoordinatorError):
    """The request does not fit the current state (wrong round, already submitted, ...) (409)."""

    status = 409


class TooLarge(CoordinatorError):
    status = 413


class Unprocessable(CoordinatorError):
    """The update's content is wrong (tensors, values) (422)."""

    status = 422


class ChainUnavailable(CoordinatorError):
    """The chain could not be read, so nothing can be verified now; retry later (503)."""

    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__("chain_unavailable", message)
        self.headers = {"Retry-After": str(retry_after_s)}

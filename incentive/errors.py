"""The exception root of ``fedledger.incentive`` and its domain errors."""

from __future__ import annotations


class IncentiveError(Exception):
    """Root of every error raised by ``fedledger.incentive``."""


class CommitmentError(IncentiveError):
    """Bytes that are not a well-formed canonical update (not safetensors, wrong tensors, non-finite)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SignatureError(IncentiveError):
    """A signed request that does not verify."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ChainError(IncentiveError):
    """The chain could not be reached or answered something unexpected."""


class ContractRevert(ChainError):
    """A contract call reverted; ``error`` is the custom error's name and ``args`` its arguments."""

    def __init__(self, error: str, args: tuple[object, ...] = (), raw: str = "") -> None:
        shown = f"{error}({', '.join(map(str, args))})" if error else raw or "reverted"
        super().__init__(f"contract reverted: {shown}")
        self.error = error
        self.error_args = args
        self.raw = raw

"""How fedledger's numbers are written on the ledger: flag bits, fixed-point scores, token units,
round states and the valuation's method name.

Pure Python (no torch, no web3), so that ``fedledger rewards``, an auditor's script or any other
reader of the chain decodes what the contract holds without the training stack. docs/architecture.md
gives the same table for readers using other Ethereum tools.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, get_args

TOKEN_UNIT = 10**18
"""Token units in one reward token (FLR): the ERC-20 has 18 decimals."""

DEFAULT_ROUND_BUDGET = 1000 * TOKEN_UNIT
"""The most a round may pay unless the deployment says otherwise (``setRoundBudget``); also the
coordinator's default ``reward_per_round``."""

ZERO_HASH = b"\x00" * 32
"""The zero bytes32: an unset hash, root or method on the ledger."""

FIXED_POINT_ONE = 10**18
"""The integer that stands for 1.0 in a score (``scoreOf``, ``ContributionRecorded``)."""


class RoundState(enum.IntEnum):
    """Mirror of ``FedLedger.RoundState``."""

    NONE = 0
    OPEN = 1
    FINALIZED = 2


class Flag(enum.IntFlag):
    """Why the coordinator flagged an update; recorded on-chain as a bit set (``flagsOf``)."""

    NORM_CLIPPED = 1  # norm above the round's bound: clipped (model-replacement attempt)
    ZERO_UPDATE = 2  # no change at all: a free-rider
    DUPLICATE_UPDATE = 4  # byte-identical to an update committed earlier by another organisation
    COPIED_UPDATE = 8  # a rescaled copy of an earlier organisation's update
    NEGATIVE_CONTRIBUTION = 16  # made the model worse on the validation set (sign flip, noise)
    UNALIGNED_UPDATE = 32  # no more aligned with the others' updates than random noise is


FORFEITING = (
    Flag.NORM_CLIPPED
    | Flag.ZERO_UPDATE
    | Flag.DUPLICATE_UPDATE
    | Flag.COPIED_UPDATE
    | Flag.NEGATIVE_CONTRIBUTION
    | Flag.UNALIGNED_UPDATE
)
"""Flags that cost an organisation the round's reward."""


def flag_names(flags: int) -> list[str]:
    """The names of the bits set in ``flags``, lower case, lowest bit first."""
    return [f.name.lower() for f in Flag if f.name is not None and flags & f]


def to_fixed_point(value: float) -> int:
    """round(value * 10**18) computed exactly (ties to even): the signed score stored on-chain."""
    if not math.isfinite(value):
        raise ValueError(f"cannot encode non-finite value {value} as fixed point")
    return round(Fraction(value) * FIXED_POINT_ONE)


def from_fixed_point(score: int) -> float:
    """The float nearest score / 10**18 (the inverse of ``to_fixed_point`` up to float rounding)."""
    return float(Fraction(score, FIXED_POINT_ONE))


Metric = Literal["neg_log_loss", "neg_brier", "accuracy", "neg_mse"]
"""The validation metrics a round can be valued by; the recorded method name ends in one
(``valuationOf(r).method``, e.g. ``exact:neg_log_loss``). Minus the mean cross-entropy and minus
the mean Brier score are proper scoring rules: they move with every sample's predicted
probabilities, while accuracy moves in steps of one validation sample. ``neg_mse`` (minus the
mean squared error) is the regression tasks' metric."""

CompressionScheme = Literal["none", "int8", "topk"]
"""How nodes encode an update (the task spec's ``compression.scheme``): its keccak commitment
is over the encoded bytes (``fedledger.incentive.compression``)."""

METRICS: tuple[Metric, ...] = get_args(Metric)


def hex32(digest: bytes) -> str:
    """A 32-byte hash as the ledger's tools print it: ``0x`` and 64 lower-case hex digits."""
    return "0x" + bytes(digest).hex()


def encode_method(method: str) -> bytes:
    """A valuation method name as the ``bytes32`` the ledger stores: ASCII, right-padded with 0."""
    raw = method.encode("ascii")
    if not raw or len(raw) > 32:
        raise ValueError(f"valuation method must be 1 to 32 ASCII bytes, got {method!r}")
    return raw.ljust(32, b"\x00")


def decode_method(raw: bytes) -> str:
    """The inverse of ``encode_method`` ('' for the zero word: no valuation recorded)."""
    return bytes(raw).rstrip(b"\x00").decode("ascii")


@dataclass(frozen=True)
class ValuationRecord:
    """How a round's scores were computed: recorded on-chain next to them (``valuationOf``)."""

    method: str  # ASCII, at most 32 bytes, e.g. "exact:accuracy"
    seed: int = 0
    validation_hash: bytes = ZERO_HASH

    def __post_init__(self) -> None:
        encode_method(self.method)  # refuses what does not fit a bytes32
        if not 0 <= self.seed < 2**256:
            raise ValueError(f"valuation seed must be a uint256, got {self.seed}")
        if len(self.validation_hash) != 32:
            raise ValueError("validation_hash must be 32 bytes")

    def as_abi(self) -> tuple[bytes, int, bytes]:
        return (encode_method(self.method), self.seed, self.validation_hash)

    @classmethod
    def from_abi(cls, raw: Sequence[Any]) -> ValuationRecord | None:
        method, seed, validation_hash = raw
        if bytes(method) == ZERO_HASH:
            return None
        return cls(
            method=decode_method(bytes(method)),
            seed=int(seed),
            validation_hash=bytes(validation_hash),
        )


NO_VALUATION = ValuationRecord("none")
"""Recorded for a round closed without scores (one that failed its quorum)."""

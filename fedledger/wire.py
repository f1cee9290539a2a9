"""Wire schemas shared by the coordinator's HTTP API and the organisation node (nothing else is shared)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from web3 import Web3

from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.incentive.signing import UploadAcknowledgement, UploadAuthorization

API_PREFIX = "/v1"

# Headers of an update upload: the EIP-712 authorisation, field by field, and its signature.
H_ORGANISATION = "X-Fedledger-Organisation"
H_ROUND = "X-Fedledger-Round"
H_UPDATE_HASH = "X-Fedledger-Update-Hash"
H_NUM_SAMPLES = "X-Fedledger-Num-Samples"
H_NONCE = "X-Fedledger-Nonce"
H_EXPIRY = "X-Fedledger-Expiry"
H_SIGNATURE = "X-Fedledger-Signature"
H_READER = "X-Fedledger-Reader"
H_READER_EXPIRY = "X-Fedledger-Reader-Expiry"
H_READER_SIGNATURE = "X-Fedledger-Reader-Signature"
READ_HEADERS = (H_READER, H_READER_EXPIRY, H_READER_SIGNATURE)
H_SPEC_HASH = "X-Fedledger-Spec-Hash"
H_MODEL_HASH = "X-Fedledger-Model-Hash"

UPLOAD_HEADERS = (
    H_ORGANISATION,
    H_ROUND,
    H_UPDATE_HASH,
    H_NUM_SAMPLES,
    H_NONCE,
    H_EXPIRY,
    H_SIGNATURE,
)


@dataclass(frozen=True)
class SignedUpload:
    """An upload's EIP-712 authorisation and its signature, as carried in the headers."""

    auth: UploadAuthorization
    signature: str


def upload_headers(auth: UploadAuthorization, signature: str) -> dict[str, str]:
    """The headers that carry ``auth`` and its ``signature`` with an upload."""
    return {
        H_ORGANISATION: auth.organisation,
        H_ROUND: str(auth.round_id),
        H_UPDATE_HASH: "0x" + auth.update_hash.hex(),
        H_NUM_SAMPLES: str(auth.num_samples),
        H_NONCE: str(auth.nonce),
        H_EXPIRY: str(auth.expiry),
        H_SIGNATURE: signature,
    }


@dataclass(frozen=True)
class SignedRead:
    """A member's signed request to read what only members see."""

    reader: str
    expiry: int
    signature: str


def read_request_headers(signed: SignedRead) -> dict[str, str]:
    """The headers that carry a member's signed read request."""
    return {
        H_READER: signed.reader,
        H_READER_EXPIRY: str(signed.expiry),
        H_READER_SIGNATURE: signed.signature,
    }


def read_read_headers(headers: Mapping[str, str]) -> SignedRead | None:
    """The inverse of ``read_request_headers``: None when the request carries none (an
    anonymous reader), ``malformed_authorization`` when some are missing or do not parse."""
    present = [h for h in READ_HEADERS if headers.get(h)]
    if not present:
        return None
    if len(present) != len(READ_HEADERS):
        missing = [h for h in READ_HEADERS if h not in present]
        raise CoordinatorError(
            ErrorCode.MALFORMED_AUTHORIZATION,
            f"a signed read request needs {', '.join(READ_HEADERS)}; missing {', '.join(missing)}",
        )
    try:
        reader = Web3.to_checksum_address(headers[H_READER])
        expiry = _uint(headers[H_READER_EXPIRY], H_READER_EXPIRY)
    except ValueError as exc:
        raise CoordinatorError(ErrorCode.MALFORMED_AUTHORIZATION, str(exc)) from None
    return SignedRead(reader, expiry, headers[H_READER_SIGNATURE])


def _uint(text: str, name: str) -> int:
    # Digits only: int() would also take "+1", " 1", "1_0" and "٣" for the same number.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{name} must be a decimal integer, got {text[:40]!r}")
    return int(text)


def read_upload_headers(headers: Mapping[str, str]) -> SignedUpload:
    """The inverse of ``upload_headers``: ``unsigned`` when a header is missing,
    ``malformed_authorization`` when one does not parse."""
    missing = [h for h in UPLOAD_HEADERS if not headers.get(h)]
    if missing:
        raise CoordinatorError(
            ErrorCode.UNSIGNED,
            f"the upload is not signed: missing header(s) {', '.join(missing)}",
            missing=missing,
        )
    try:
        return _parse_upload_headers(headers)
    except ValueError as exc:
        raise CoordinatorError(
            ErrorCode.MALFORMED_AUTHORIZATION, f"an upload header is malformed: {exc}"
        ) from exc


def _parse_upload_headers(headers: Mapping[str, str]) -> SignedUpload:
    digest = headers[H_UPDATE_HASH]
    raw = bytes.fromhex(digest[2:] if digest.startswith("0x") else digest)
    if len(raw) != 32:
        raise ValueError(f"{H_UPDATE_HASH} must be a 32-byte hash, got {len(raw)} bytes")
    auth = UploadAuthorization(
        organisation=Web3.to_checksum_address(headers[H_ORGANISATION]),
        round_id=_uint(headers[H_ROUND], H_ROUND),
        update_hash=raw,
        num_samples=_uint(headers[H_NUM_SAMPLES], H_NUM_SAMPLES),
        nonce=_uint(headers[H_NONCE], H_NONCE),
        expiry=_uint(headers[H_EXPIRY], H_EXPIRY),
    )
    return SignedUpload(auth=auth, signature=headers[H_SIGNATURE])


class _Schema(BaseModel):
    model_config = ConfigDict(frozen=True)


class RoundStatus(StrEnum):
    OPEN = "open"  # taking uploads
    CLOSING = "closing"  # aggregating, scoring and settling on-chain
    FINALIZED = "finalized"  # settled; the next round is (or will be) open
    FAILED = "failed"  # closed without aggregation (quorum not met); nothing paid


class TrainingStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"


class UploadStatus(StrEnum):
    ACCEPTED = "accepted"
    MISSING = "missing"
    RETIRED = "retired"  # stopped training for good (its privacy budget is spent): not missing


class CurrentRound(_Schema):
    """``GET /v1/rounds/current``: what a node needs to take part in the current round."""

    training: TrainingStatus
    round_id: int
    status: RoundStatus
    # The commit phase is over, as far as the coordinator has seen on-chain: uploads are taken.
    # A node confirms it on-chain before it uploads; the coordinator's word is not enough.
    commits_closed: bool = False
    model_hash: str  # 0x-hex keccak256 of the global model's canonical bytes
    deadline: int  # unix seconds: commitments on-chain and uploads close then
    total_rounds: int
    task: str
    organisations_expected: int
    uploads_received: int


class UploadReceipt(_Schema):
    """The coordinator's acknowledgement that the update is durably stored, signed with its key
    (EIP-712 ``Receipt``, ``incentive/signing.py``) so that the organisation can prove it later.

    Every field but ``duplicate`` is exactly what was signed, or the domain and signer it was
    signed with; ``fedledger.receipts`` checks it against the ledger."""

    round_id: int
    organisation: str
    update_hash: str  # 0x-hex keccak256 of the update's bytes
    num_samples: int
    received_at: int  # unix seconds, as signed
    chain_id: int  # the EIP-712 domain: the chain and the ledger the receipt is valid for
    ledger: str
    coordinator: str  # the account that signed: it must hold COORDINATOR_ROLE on the ledger
    signature: str  # 0x-hex, 65 bytes
    duplicate: bool = False  # not signed: this answers an identical re-upload

    def acknowledgement(self) -> UploadAcknowledgement:
        """The signed message; ValueError when a field is not an address or a 32-byte hash."""
        digest = bytes.fromhex(self.update_hash.removeprefix("0x"))
        if len(digest) != 32:
            raise ValueError(f"update_hash must be a 32-byte hash, got {len(digest)} bytes")
        return UploadAcknowledgement(
            round_id=self.round_id,
            organisation=Web3.to_checksum_address(self.organisation),
            update_hash=digest,
            num_samples=self.num_samples,
            received_at=self.received_at,
        )


class OrganisationResult(_Schema):
    organisation: str
    status: UploadStatus
    update_hash: str | None = None
    num_samples: int | None = 0  # None: withheld from a reader who is not a member
    value: float = 0.0  # Shapley value of the validation metric
    value_stderr: float = 0.0  # its standard error over the validation samples
    score: str = "0"  # the value as the on-chain score (scoreOf): fixed point, 1e18 = 1.0
    reward: str = "0"  # token units, as a decimal string
    flags: int = 0  # bit set recorded on-chain (flagsOf); see flag_reasons
    flag_reasons: list[str] = Field(default_factory=list)  # e.g. ["norm_clipped"]
    note: str | None = None  # why it was flagged, in words
    norm: float | None = None  # the update's L2 norm
    aggregated: bool | None = False  # whether the update is part of the new global model
    epsilon: float | None = None  # DP-SGD: epsilon spent so far, as committed on-chain


class RoundResult(_Schema):
    """``GET /v1/rounds/{round_id}``: a round's outcome as the coordinator recorded it."""

    round_id: int
    status: RoundStatus
    model_hash: str
    new_model_hash: str | None = None
    deadline: int
    validation_accuracy: float | None = None
    validation_utility: float | None = None  # the new model's valuation metric (see pricing)
    validation_gain: float | None = None  # its rise over the old model: what the round paid for
    validation_metrics: dict[str, float] = Field(
        default_factory=dict
    )  # the new model's metrics on the validation set (the task spec's metric and report)
    reason: str | None = None
    finalize_tx: str | None = None
    valuation_method: str | None = (
        None  # as recorded on-chain (valuationOf), e.g. "exact:neg_log_loss"
    )
    valuation_seed: int | None = None
    validation_hash: str | None = None
    evaluations: int | None = None  # coalition utilities the valuation cost
    norm_bound: float | None = None  # updates above it were clipped
    settlement: Literal["direct", "claims"] | None = None  # paid at once, or claimed with proofs
    rewards_root: str | None = None  # the Merkle root a "claims" settlement posted
    pricing: dict[str, Any] | None = None  # the settings the round was priced with (audits)
    organisations: list[OrganisationResult] = Field(default_factory=list)


class ClaimTicket(_Schema):
    """``GET /v1/rounds/{round_id}/claims/{organisation}``: what to send to ``claimReward``."""

    round_id: int
    organisation: str
    score: str
    reward: str
    flags: int
    proof: list[str]  # 0x-hex sibling hashes, leaf to root
    root: str


class Health(_Schema):
    status: str
    chain_id: int
    ledger: str
    round_id: int
    training: TrainingStatus


class ErrorBody(_Schema):
    """Every rejection: a stable machine-readable ``code`` and a message a user can act on."""

    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class RoundSummary(_Schema):
    """One round of ``GET /v1/rounds``: its status, deadline, the new model's metrics and
    totals, as any reader may see them."""

    round_id: int
    status: RoundStatus
    deadline: int  # unix seconds: commitments on-chain and uploads close then
    validation_metrics: dict[str, float] = Field(default_factory=dict)  # the new model's
    validation_gain: float | None = None  # the rise of the valuation metric the round paid for
    reason: str | None = None  # why a failed round failed
    uploads: int = 0  # updates accepted (so far, while the round is open)
    flagged: int = 0  # organisations flagged in the round
    total_reward: str = "0"  # token units the round paid in all, as a decimal string
    settlement: Literal["direct", "claims"] | None = None


class DashboardRound(RoundSummary):
    """A round on the dashboard: its summary and each organisation's public result."""

    organisations: list[OrganisationResult] = Field(default_factory=list)  # as anonymous readers


class OrganisationTotal(_Schema):
    """An organisation over every settled round, as the dashboard sums it."""

    organisation: str
    value: float = 0.0  # Shapley values summed
    score: str = "0"  # on-chain scores summed: fixed point, 1e18 = 1.0
    reward: str = "0"  # token units summed (rounds settled by claims: what it may claim)
    rounds_flagged: int = 0
    flag_reasons: list[str] = Field(default_factory=list)  # each reason once, first seen first
    epsilon: float | None = None  # DP-SGD: the most epsilon it has reported spending
    retired: bool = False  # stopped training for good (its privacy budget is spent)


class Dashboard(_Schema):
    """``GET /v1/dashboard``: what the page at ``/dashboard`` shows but health, public only."""

    task: str
    metric: str  # the validation metric rounds are valued by (the chart's default)
    total_rounds: int
    training: TrainingStatus
    epsilon_budget: float | None = None  # DP-SGD: each organisation's budget (None: no DP)
    rounds: list[DashboardRound] = Field(default_factory=list)  # oldest first
    organisations: list[OrganisationTotal] = Field(default_factory=list)

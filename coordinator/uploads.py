"""Upload verification: who signed it, whether the round takes it, whether the chain committed it,
whether its tensors fit the model. One small check per rule, run in the order docs/errors.md
lists them; the service stores what passes.

Everything but the body's own checks runs on the headers alone: the signed authorisation names
the update's hash and sample count, so who may upload what is settled before a byte of the body
is read (an unsigned or uncommitted request is refused without buffering it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from fedledger import wire
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.store import StoredRound, StoredUpdate
from fedledger.errors import (
    ChainError,
    ChainUnavailable,
    CodedError,
    CoordinatorError,
    ErrorCode,
    SignatureError,
)
from fedledger.incentive.commitment import (
    TensorSpec,
    buffer_bytes,
    header_bound,
    header_end,
    keccak,
)
from fedledger.incentive.compression import Codec
from fedledger.incentive.ledger import CommitmentRecord, LedgerClient
from fedledger.incentive.onchain import hex32
from fedledger.incentive.signing import UploadAuthorization, recover_reader, recover_signer
from fedledger.incentive.tensors import l2_norm


@dataclass(frozen=True)
class AuthenticatedUpload:
    """An upload whose signature and signer check out; not yet admitted to a round, its body
    not yet read (it must hash to ``update_hash``: ``check_body_hash``)."""

    auth: UploadAuthorization
    signer: str  # checksummed; equals auth.organisation
    update_hash: str  # 0x-hex, as signed (and, once admitted, as committed on-chain)


MAX_STORED_SAMPLES = 2**63 - 1
"""The largest sample count the store holds (SQLite's INTEGER); the ledger takes any uint256."""


def read_authorization(headers: Mapping[str, str], path_round_id: int) -> wire.SignedUpload:
    """The EIP-712 authorisation from the upload headers (``unsigned``/``malformed_authorization``)."""
    signed = wire.read_upload_headers(headers)
    auth = signed.auth
    if auth.round_id != path_round_id:
        raise CoordinatorError(
            ErrorCode.MALFORMED_AUTHORIZATION,
            f"the signed round {auth.round_id} differs from the URL's round {path_round_id}",
        )
    if auth.num_samples <= 0 or auth.nonce < 0 or auth.expiry < 0:
        raise CoordinatorError(
            ErrorCode.MALFORMED_AUTHORIZATION, "sample count, nonce and expiry must be positive"
        )
    return signed


class UploadVerifier:
    """The coordinator's checks on an upload, each a method that raises a ``CoordinatorError``."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        ledger: LedgerClient,
        *,
        chain_id: int,
        specs: Mapping[str, TensorSpec],
        clock: Callable[[], float],
        codec: Codec | None = None,
        commits_closed: set[int] | None = None,
        members: Callable[[int], Collection[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.chain_id = chain_id
        self.specs = specs
        self.clock = clock
        self.codec = codec or Codec()  # the task spec's [compression]
        layout = self.codec.layout(specs)  # what an upload's safetensors header must list
        self._header_bound, self._buffer_bytes = header_bound(layout), buffer_bytes(layout)
        # Rounds whose commit phase the chain ended (the round driver's set, when given).
        self._commits_closed = commits_closed if commits_closed is not None else set()
        # The organisations registered when a round opened, by lower-case address (the round
        # driver's record, read once a round); anyone else is looked up on-chain. A revocation
        # takes effect from the next round.
        self._members = members
        # The current round's commitments, by lower-case address: once its commit phase is
        # over, every member's is read in one JSON-RPC batch (a commitment never changes once
        # made; a chain that takes no batches is read upload by upload); an organisation
        # without one there is read again on its upload.
        self._commitments: dict[str, CommitmentRecord] = {}
        self._commitments_round = 0
        self._commitments_batched = False
        self._commitments_lock = threading.Lock()

    # -------------------------------------------------- before the round is looked at

    def authenticate(self, headers: Mapping[str, str], path_round_id: int) -> AuthenticatedUpload:
        """Signature, signer's registration, expiry and sample count: the headers' own checks."""
        signed = read_authorization(headers, path_round_id)
        signer = self.recover(signed)
        self.check_signer(signer, signed.auth.organisation, round_id=signed.auth.round_id)
        self.check_expiry(signed.auth)
        self.check_sample_count(signed.auth)
        return AuthenticatedUpload(signed.auth, signer, hex32(signed.auth.update_hash))

    def recover(self, signed: wire.SignedUpload) -> str:
        try:
            return recover_signer(
                signed.auth, signed.signature, chain_id=self.chain_id, ledger=self.ledger.address
            )
        except SignatureError as exc:
            raise CoordinatorError(exc.code, exc.message) from exc

    def check_signer(self, signer: str, organisation: str, *, round_id: int = 0) -> None:
        """The signer is the organisation signed for, and registered on the ledger: among those
        registered when round ``round_id`` opened, or else read on-chain now."""
        known = self._members(round_id) if self._members is not None and round_id else ()
        try:
            registered = signer.lower() in known or self.ledger.is_organisation(signer)
        except ChainError as exc:
            raise ChainUnavailable(f"cannot verify the signer on-chain: {exc}") from exc
        if signer != organisation:
            if registered:
                raise CoordinatorError(
                    ErrorCode.IMPERSONATION,
                    f"organisation {signer} signed an upload on behalf of {organisation}",
                    signer=signer,
                )
            raise CoordinatorError(
                ErrorCode.BAD_SIGNATURE,
                "the signature does not match the upload (wrong key, chain id, ledger or field)",
            )
        if not registered:
            raise CoordinatorError(
                ErrorCode.UNREGISTERED_SIGNER,
                f"{signer} is not a registered organisation on ledger {self.ledger.address}",
            )

    def check_expiry(self, auth: UploadAuthorization) -> None:
        now = self.clock()
        if auth.expiry < now:
            raise CoordinatorError(
                ErrorCode.EXPIRED, f"the upload authorisation expired at {auth.expiry}"
            )
        if auth.expiry > now + self.settings.max_expiry_s:
            raise CoordinatorError(
                ErrorCode.EXPIRY_TOO_FAR,
                f"the authorisation must expire within {self.settings.max_expiry_s} s",
            )

    def read_member(self, headers: Mapping[str, str]) -> str | None:
        """The registered organisation a signed read request comes from (None: anonymous).

        Checked as an upload's signature is: the EIP-712 ``Read`` message bound to this chain
        and ledger, not expired nor expiring further off than ``max_expiry_s``, signed by the
        reader it names, who must be registered on the ledger."""
        signed = wire.read_read_headers(headers)
        if signed is None:
            return None
        now = self.clock()
        if signed.expiry < now:
            raise CoordinatorError(
                ErrorCode.EXPIRED, f"the read request expired at {signed.expiry}"
            )
        if signed.expiry > now + self.settings.max_expiry_s:
            raise CoordinatorError(
                ErrorCode.EXPIRY_TOO_FAR,
                f"a read request must expire within {self.settings.max_expiry_s} s",
            )
        try:
            signer = recover_reader(
                signed.reader,
                signed.expiry,
                signed.signature,
                chain_id=self.chain_id,
                ledger=self.ledger.address,
            )
        except SignatureError as exc:
            raise CoordinatorError(exc.code, exc.message) from exc
        if signer != signed.reader:
            raise CoordinatorError(
                ErrorCode.BAD_SIGNATURE,
                f"the read request is not signed by its reader {signed.reader} (wrong key, "
                "chain id or ledger)",
            )
        try:
            registered = self.ledger.is_organisation(signer)
        except ChainError as exc:
            raise ChainUnavailable(f"cannot verify the reader on-chain: {exc}") from exc
        if not registered:
            raise CoordinatorError(
                ErrorCode.UNREGISTERED_SIGNER,
                f"{signer} is not a registered organisation on ledger {self.ledger.address}",
            )
        return signer

    def check_sample_count(self, auth: UploadAuthorization) -> None:
        """A declared count steers FedAvg (within its weight cap): the consortium's cap on it,
        and the store's (a signed integer of 64 bits)."""
        if auth.num_samples > MAX_STORED_SAMPLES:
            raise CoordinatorError(
                ErrorCode.TOO_MANY_SAMPLES,
                f"the declared sample count {auth.num_samples} is above {MAX_STORED_SAMPLES}, "
                "the most the coordinator records",
                max_samples=MAX_STORED_SAMPLES,
            )
        cap = self.settings.pricing.max_samples
        if cap is not None and auth.num_samples > cap:
            raise CoordinatorError(
                ErrorCode.TOO_MANY_SAMPLES,
                f"the declared sample count {auth.num_samples} is above the consortium's cap of "
                f"{cap} (max_samples)",
                max_samples=cap,
            )

    @staticmethod
    def check_body_hash(upload: AuthenticatedUpload, body: bytes) -> None:
        body_hash = hex32(keccak(body))
        if body_hash != upload.update_hash:
            raise CoordinatorError(
                ErrorCode.BODY_HASH_MISMATCH,
                f"the body hashes to {body_hash}, the signed hash is {upload.update_hash}",
            )

    # -------------------------------------------------- against the round (under the lock)

    def check_round(self, upload: AuthenticatedUpload, current: StoredRound | None) -> StoredRound:
        """The upload is for the current round (``wrong_round``); returns that round."""
        if current is None or upload.auth.round_id != current.round_id:
            raise CoordinatorError(
                ErrorCode.WRONG_ROUND,
                f"update for round {upload.auth.round_id} rejected: round "
                f"{current.round_id if current else 0} is current",
                current_round=current.round_id if current else 0,
            )
        return current

    def check_open(self, current: StoredRound) -> None:
        """The current round still takes uploads (``round_closed``, ``deadline_passed``)."""
        if current.status != wire.RoundStatus.OPEN:
            raise CoordinatorError(
                ErrorCode.ROUND_CLOSED,
                f"round {current.round_id} is {current.status} and takes no more uploads",
                current_round=current.round_id,
            )
        if self.clock() > current.deadline + self.settings.upload_grace_s:
            raise CoordinatorError(
                ErrorCode.DEADLINE_PASSED,
                f"round {current.round_id} closed for uploads at {current.deadline}",
                current_round=current.round_id,
            )

    @staticmethod
    def check_nonce(upload: AuthenticatedUpload, used: bool) -> None:
        if used:
            raise CoordinatorError(
                ErrorCode.REPLAYED,
                f"nonce {upload.auth.nonce} was already used by {upload.signer}",
            )

    @staticmethod
    def check_same_bytes(existing: StoredUpdate, update_hash: str) -> None:
        """A second upload for an organisation and round must be the accepted bytes again."""
        if existing.update_hash != update_hash:
            raise CoordinatorError(
                ErrorCode.ALREADY_SUBMITTED,
                f"{existing.organisation} already submitted {existing.update_hash} for round "
                f"{existing.round_id}; an update is final",
                update_hash=existing.update_hash,
            )

    # -------------------------------------------------- against the chain and the model

    def commitment_of(self, round_id: int, org: str) -> CommitmentRecord | None:
        """``org``'s on-chain commitment in ``round_id``: from the round's batch once its
        commit phase is over (all its members' commitments read at once, on the first upload
        after), else read now."""
        key = org.lower()
        with self._commitments_lock:
            if self._commitments_round != round_id:
                self._commitments, self._commitments_round = {}, round_id
                self._commitments_batched = False
            known = self._commitments.get(key)
            if (
                known is None
                and not self._commitments_batched
                and round_id in self._commits_closed
                and self._members is not None
                and self.ledger.batches
            ):
                read = self.ledger.commitments_of(round_id, sorted(self._members(round_id)))
                self._commitments.update({o.lower(): c for o, c in read.items() if c})
                self._commitments_batched = True
                known = self._commitments.get(key)
        if known is not None:
            return known
        commitment = self.ledger.commitment_of(round_id, org)
        if commitment is not None:
            with self._commitments_lock:
                if self._commitments_round == round_id:
                    self._commitments[key] = commitment
        return commitment

    def check_commitment(self, upload: AuthenticatedUpload) -> None:
        auth, signer = upload.auth, upload.signer
        try:
            commitment = self.commitment_of(auth.round_id, signer)
        except ChainError as exc:
            raise ChainUnavailable(f"cannot read the on-chain commitment: {exc}") from exc
        if commitment is None:
            raise CoordinatorError(
                ErrorCode.NOT_COMMITTED,
                f"{signer} has not committed an update for round {auth.round_id} on-chain; "
                "call commitUpdate first",
            )
        if hex32(commitment.update_hash) != upload.update_hash:
            raise CoordinatorError(
                ErrorCode.COMMITMENT_MISMATCH,
                f"the signed update hash is {upload.update_hash} but {signer} committed "
                f"{hex32(commitment.update_hash)} for round {auth.round_id}",
            )
        if commitment.num_samples != auth.num_samples:
            raise CoordinatorError(
                ErrorCode.SAMPLES_MISMATCH,
                f"signed sample count {auth.num_samples} differs from the committed "
                f"{commitment.num_samples}",
            )

    def check_commits_closed(self, current: StoredRound) -> None:
        """No upload is taken while the round still takes commitments (``commitments_open``):
        an update seen before the commit phase ends could be copied into a later commitment."""
        if current.round_id in self._commits_closed:
            return
        try:
            closed = self.ledger.commits_closed(current.round_id, now=self.clock())
        except ChainError as exc:
            raise ChainUnavailable(f"cannot read the round's commit phase: {exc}") from exc
        if not closed:
            raise CoordinatorError(
                ErrorCode.COMMITMENTS_OPEN,
                f"round {current.round_id} takes commitments until {current.deadline} or until "
                "every active organisation has committed; upload after that",
                current_round=current.round_id,
                deadline=current.deadline,
            )
        self._commits_closed.add(current.round_id)  # closed for good while the round lasts

    def check_head(self, prefix: bytes) -> int | None:
        """The exact length of a body starting with ``prefix``, once its safetensors header is
        in and lists the model's tensors (None while more of the header is to come).

        Run as the body streams, so a header naming other tensors, or thousands of them, is
        refused after its first bytes, and no more is read than the model's update takes."""
        end = header_end(prefix)
        if end is None:
            return None
        if end - 8 > self._header_bound or len(prefix) >= end:  # refuse now, or check it whole
            try:
                self.codec.check_header(prefix, self.specs)
            except CodedError as exc:
                raise CoordinatorError(exc.code, exc.message) from exc
            return end + self._buffer_bytes
        return None

    def check_content(self, body: bytes) -> dict[str, torch.Tensor]:
        """The body decodes to the model's tensors, all finite, within the norm bound."""
        try:
            tensors = self.codec.decode(body, self.specs)
        except CodedError as exc:
            raise CoordinatorError(exc.code, exc.message) from exc
        bound = self.settings.max_update_norm
        if bound is not None:
            norm = l2_norm(tensors)
            if norm > bound:
                raise CoordinatorError(
                    ErrorCode.NORM_EXCEEDED,
                    f"update L2 norm {norm:.4g} exceeds the bound {bound:.4g}",
                    norm=norm,
                )
        return tensors

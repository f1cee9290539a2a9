"""The round state machine: open on-chain, verify and store uploads, close, price, settle, repeat.

Every transition is recorded in the store after the chain confirms it, and on start-up the
service reconciles the store with the chain, so a restarted coordinator resumes where it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from web3 import Web3

from fedledger import wire
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.errors import (
    ChainUnavailable,
    Conflict,
    CoordinatorError,
    Forbidden,
    NotFound,
    Unauthorized,
    Unprocessable,
)
from fedledger.coordinator.pricing import RoundPricing, flag_names, price_round
from fedledger.coordinator.store import Store, StoredRound, StoredUpdate
from fedledger.failpoints import (
    CLOSE_AFTER_AGGREGATE,
    CLOSE_AFTER_FINALIZE_TX,
    OPEN_AFTER_TX,
    UPLOAD_AFTER_BLOB,
    failpoint,
)
from fedledger.incentive.commitment import (
    canonical_bytes,
    commitment_of,
    decode_tensors,
    decode_update,
    keccak,
    l2_norm,
    specs_of,
)
from fedledger.incentive.errors import ChainError, CommitmentError, SignatureError
from fedledger.incentive.ledger import NO_VALUATION, LedgerClient, RoundState, Valuation, as_bytes32
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree
from fedledger.incentive.signing import UploadAuthorization, recover_signer
from fedledger.incentive.valuation import evaluate_params
from fedledger.tasks import Task, get_task

log = logging.getLogger("fedledger.coordinator")


def hex32(raw: bytes) -> str:
    return "0x" + raw.hex()


MAX_LONG_POLL_S = 30.0
"""The longest ``GET /v1/rounds/current`` holds a request waiting for a change."""


@dataclass(frozen=True)
class Books:
    """A round's close, computed from its stored inputs: what the coordinator settles on-chain."""

    uploads: list[StoredUpdate]  # in on-chain commit order
    priced: RoundPricing
    new_bytes: bytes  # the new global model's canonical bytes
    new_hash: str
    valuation: Valuation
    tree: SettlementTree | None  # the Merkle settlement, when the round settles by claims


def close_books(
    round_id: int,
    store: Store,
    commit_order: list[str],
    model: torch.nn.Module,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    settings: CoordinatorSettings,
    *,
    device: torch.device,
) -> Books:
    """Price round ``round_id`` from the updates in ``store``: deterministic, so the coordinator
    (closing the round, or redoing it after a crash) and an auditor get the same books.

    Reads ``store`` only. ``commit_order`` is the chain's order of the
    round's commitments: it decides who is the original of a copied update.
    """
    stored = store.get_round(round_id)
    if stored is None:
        raise CoordinatorError("unknown_round", f"round {round_id} is not in the store")
    order = {org.lower(): i for i, org in enumerate(commit_order)}
    uploads = sorted(
        store.updates_for(round_id), key=lambda u: order.get(u.organisation.lower(), len(order))
    )

    def load(digest_hex: str) -> dict[str, torch.Tensor]:
        data = store.get_blob(digest_hex)
        if data is None:
            raise CoordinatorError("missing_blob", f"stored tensors {digest_hex} are missing")
        return decode_tensors(data)

    def previous(org: str) -> dict[str, torch.Tensor] | None:
        earlier = store.get_update(round_id - 1, org) if round_id > 1 else None
        return None if earlier is None else load(earlier.update_hash)

    priced = price_round(
        model,
        load(stored.model_hash),
        [load(u.update_hash) for u in uploads],
        [u.num_samples for u in uploads],
        [u.update_hash for u in uploads],
        x_val,
        y_val,
        policy=settings.pricing_policy(),
        budget=settings.reward_per_round,
        previous=[previous(u.organisation) for u in uploads],
        seed=round_id,
        device=device,
    )
    new_bytes = canonical_bytes(priced.params)
    new_hash = hex32(keccak(new_bytes))
    valuation = Valuation(
        method=f"{priced.method}:{settings.metric}",
        seed=round_id,
        validation_hash=keccak(canonical_bytes({"x": x_val, "y": y_val})),
    )
    tree = None
    if len(uploads) > settings.claims_above:
        tree = SettlementTree.build(
            [
                SettlementLeaf(round_id, u.organisation, score, reward, flags)
                for u, score, reward, flags in zip(
                    uploads, priced.scores, priced.rewards, priced.flags, strict=True
                )
            ]
        )
    return Books(uploads, priced, new_bytes, new_hash, valuation, tree)


def settlement_tree(result: wire.RoundResult) -> SettlementTree:
    """The Merkle tree of a round's settlement, rebuilt from its recorded result."""
    return SettlementTree.build(
        [
            SettlementLeaf(
                result.round_id, o.organisation, int(o.score_fixed), int(o.reward), o.flags
            )
            for o in result.organisations
            if o.status == wire.UploadStatus.ACCEPTED
        ]
    )


@dataclass(frozen=True)
class SignedUpload:
    """An upload's authorisation as parsed from its headers, with the signature."""

    auth: UploadAuthorization
    signature: str


def parse_upload_headers(headers: Mapping[str, str], path_round_id: int) -> SignedUpload:
    """Read the EIP-712 authorisation from the upload headers (401 when absent or malformed)."""
    missing = [h for h in wire.UPLOAD_HEADERS if not headers.get(h)]
    if missing:
        raise Unauthorized(
            "unsigned",
            f"the upload is not signed: missing header(s) {', '.join(missing)}",
            missing=missing,
        )
    try:
        organisation = Web3.to_checksum_address(headers[wire.H_ORGANISATION])
        auth = UploadAuthorization(
            organisation=organisation,
            round_id=int(headers[wire.H_ROUND]),
            update_hash=as_bytes32(headers[wire.H_UPDATE_HASH]),
            num_samples=int(headers[wire.H_NUM_SAMPLES]),
            nonce=int(headers[wire.H_NONCE]),
            expiry=int(headers[wire.H_EXPIRY]),
        )
    except ValueError as exc:
        raise Unauthorized(
            "malformed_authorization", f"an upload header is malformed: {exc}"
        ) from exc
    if auth.round_id != path_round_id:
        raise Unauthorized(
            "malformed_authorization",
            f"the signed round {auth.round_id} differs from the URL's round {path_round_id}",
        )
    if auth.num_samples <= 0 or auth.nonce < 0 or auth.expiry < 0:
        raise Unauthorized(
            "malformed_authorization", "sample count, nonce and expiry must be positive"
        )
    return SignedUpload(auth=auth, signature=headers[wire.H_SIGNATURE])


class RoundService:
    """Runs the federation for one ledger from one data directory."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        ledger: LedgerClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ledger.account is None:
            raise ValueError("the coordinator's ledger client needs the coordinator's key")
        self.settings = settings
        self.ledger = ledger
        self.clock = clock
        self.store = Store(settings.data_dir)
        self.task: Task = get_task(settings.task)
        self.device = torch.device(
            settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self._model = self.task.build_model(seed=settings.model_seed)
        self._specs = specs_of(self._model.state_dict())
        self._x_val, self._y_val = self.task.validation_data()
        self._chain_id = ledger.chain_id()
        self._lock = threading.RLock()  # guards upload acceptance against round transitions
        self._wake = threading.Event()
        self._changed = threading.Condition()  # notified when the latest round's state changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._expected: dict[int, list[str]] = {}
        self.last_error: str | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self, *, background: bool = True) -> None:
        """Check roles and data directory, reconcile with the chain, open round 1 if needed."""
        assert self.ledger.account is not None
        if not self.ledger.has_coordinator_role(self.ledger.account.address):
            raise CoordinatorError(
                "not_coordinator",
                f"{self.ledger.account.address} lacks COORDINATOR_ROLE on ledger {self.ledger.address}",
            )
        bound = self.store.get_meta("ledger")
        if bound is None:
            self.store.set_meta("ledger", self.ledger.address)
        elif bound.lower() != self.ledger.address.lower():
            raise CoordinatorError(
                "wrong_data_dir",
                f"data directory {self.settings.data_dir} belongs to ledger {bound}, "
                f"not {self.ledger.address}; use another --data-dir",
            )
        self._reconcile()
        if background:
            self.start_driver()

    def start_driver(self) -> None:
        """Run the round state machine in a background thread (polls, and wakes on uploads)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="round-driver", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.store.close()

    def _run(self) -> None:
        backoff_s = 1.0
        while not self._stop.is_set():
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()
            try:
                if self.step():
                    self._wake.set()  # take the next transition at once (open after close)
                self.last_error = None
                backoff_s = 1.0
            except (ChainError, CoordinatorError) as exc:
                self.last_error = str(exc)
                log.warning("round driver: %s (retrying)", exc)
                self._stop.wait(1.0)
            except Exception as exc:  # a bug must not kill the driver while /health says ok
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("round driver failed; retrying in %.0f s", backoff_s)
                self._stop.wait(backoff_s)
                backoff_s = min(2 * backoff_s, 60.0)

    def _reconcile(self) -> None:
        removed = self.store.collect_garbage()
        if removed:
            log.info("removed %d unreferenced file(s) left by an interrupted write", removed)
        latest = self.store.latest_round()
        chain_rounds = self.ledger.round_count()
        if latest is None:
            data, digest = commitment_of(self._model.state_dict())
            # Round 1 may already be open on-chain if we crashed right after opening it.
            if chain_rounds > 1 or (
                chain_rounds == 1 and self.ledger.get_round(1).model_hash != digest
            ):
                raise CoordinatorError(
                    "wrong_data_dir",
                    f"the ledger already has {chain_rounds} round(s) but {self.settings.data_dir} "
                    "has no state; start the coordinator on the data directory that ran them",
                )
            self.store.put_blob(hex32(digest), data)
            self._open_round(1, hex32(digest))
            return
        if chain_rounds > latest.round_id:  # opened on-chain, crashed before recording it
            record = self.ledger.get_round(chain_rounds)
            self.store.add_round(chain_rounds, hex32(record.model_hash), record.deadline)
        elif latest.status == wire.RoundStatus.OPEN:  # an extension may be on-chain only
            record = self.ledger.get_round(latest.round_id)
            if record.deadline != latest.deadline:
                self.store.set_deadline(
                    latest.round_id, record.deadline, extensions=latest.extensions + 1
                )

    # ------------------------------------------------------------------ rounds

    def _deadline(self) -> int:
        """round_timeout_s from now, by the later of our clock and the chain's: a chain whose
        blocks run ahead of the wall clock (the in-process EVM adds a second a block) must
        not see the deadline early and refuse commitments the round still waits for."""
        now = max(self.clock(), float(self.ledger.block_timestamp()))
        return int(now + self.settings.round_timeout_s)

    def _open_round(self, round_id: int, model_hash: str) -> None:
        if self.ledger.round_count() < round_id:
            deadline = self._deadline()
            self.ledger.open_round(round_id, as_bytes32(model_hash), deadline)
            failpoint(OPEN_AFTER_TX)
        record = self.ledger.get_round(round_id)
        if hex32(record.model_hash) != model_hash:
            raise CoordinatorError(
                "chain_mismatch",
                f"round {round_id} on-chain has model {hex32(record.model_hash)}, expected {model_hash}",
            )
        self.store.add_round(round_id, model_hash, record.deadline)
        self._expected[round_id] = self.ledger.organisations()
        log.info("round %d open until %d on model %s", round_id, record.deadline, model_hash)

    def expected_organisations(self, round_id: int) -> list[str]:
        if round_id not in self._expected:
            self._expected[round_id] = self.ledger.organisations()
        return self._expected[round_id]

    def step(self) -> bool:
        """Advance the round state machine by at most one transition; whether it made one.

        Requests long-polling the current round are answered as soon as it changes.
        """
        before = self._round_state()
        try:
            self._step()
        finally:
            changed = self._round_state() != before
            if changed:
                with self._changed:
                    self._changed.notify_all()
        return changed

    def _step(self) -> None:
        current = self.store.latest_round()
        if current is None:
            return
        if current.status == wire.RoundStatus.OPEN:
            uploads = self.store.updates_for(current.round_id)
            submitted = {u.organisation.lower() for u in uploads}
            expected = {o.lower() for o in self.expected_organisations(current.round_id)}
            all_in = bool(expected) and expected <= submitted
            past = self.clock() > current.deadline + self.settings.upload_grace_s
            if past and not all_in and self._extend_if_short(current, len(uploads)):
                return
            if all_in or past:
                with self._lock:
                    self.store.set_round_status(current.round_id, wire.RoundStatus.CLOSING)
                self._close(current.round_id)
        elif current.status == wire.RoundStatus.CLOSING:
            self._close(current.round_id)
        elif current.round_id < self.settings.total_rounds:
            next_model = current.new_model_hash or current.model_hash
            self._open_round(current.round_id + 1, next_model)

    def _extend_if_short(self, current: StoredRound, num_uploads: int) -> bool:
        """Under the ``extend`` policy, give a round short of its quorum more time on-chain."""
        if (
            num_uploads >= self.settings.quorum
            or self.settings.quorum_policy != "extend"
            or current.extensions >= self.settings.max_extensions
        ):
            return False
        deadline = self._deadline()
        if self.ledger.get_round(current.round_id).deadline < deadline:
            self.ledger.extend_round(current.round_id, deadline)
        record = self.ledger.get_round(current.round_id)
        self.store.set_deadline(
            current.round_id, record.deadline, extensions=current.extensions + 1
        )
        log.warning(
            "round %d: %d of %d required uploads at the deadline; extended to %d",
            current.round_id,
            num_uploads,
            self.settings.quorum,
            record.deadline,
        )
        return True

    def training_status(self) -> wire.TrainingStatus:
        current = self.store.latest_round()
        if (
            current is not None
            and current.round_id >= self.settings.total_rounds
            and current.status in (wire.RoundStatus.FINALIZED, wire.RoundStatus.FAILED)
        ):
            return wire.TrainingStatus.DONE
        return wire.TrainingStatus.RUNNING

    def _close(self, round_id: int) -> None:
        """Aggregate, price and settle a round; safe to redo after a crash (deterministic)."""
        stored = self.store.get_round(round_id)
        assert stored is not None
        uploads = self.store.updates_for(round_id)
        expected = self.expected_organisations(round_id)
        if len(uploads) < self.settings.quorum:
            reason = (
                f"quorum not met: {len(uploads)} of {self.settings.quorum} required uploads "
                "by the deadline; the model is unchanged and nothing is paid"
            )
            tx = self._settle(round_id, stored.model_hash, [], None, NO_VALUATION)
            result = wire.RoundResult(
                round_id=round_id,
                status=wire.RoundStatus.FAILED,
                model_hash=stored.model_hash,
                new_model_hash=stored.model_hash,
                deadline=stored.deadline,
                reason=reason,
                finalize_tx=tx,
                organisations=[
                    wire.OrganisationResult(organisation=o, status=wire.UploadStatus.MISSING)
                    for o in expected
                ],
            )
            self.store.set_round_status(
                round_id,
                wire.RoundStatus.FAILED,
                new_model_hash=stored.model_hash,
                result=result.model_dump(mode="json"),
            )
            log.warning("round %d failed: %s", round_id, reason)
            return

        books = close_books(
            round_id,
            self.store,
            self.ledger.commit_order(round_id),
            self._model,
            self._x_val,
            self._y_val,
            self.settings,
            device=self.device,
        )
        priced, uploads, new_hash = books.priced, books.uploads, books.new_hash
        valuation, tree, claims = books.valuation, books.tree, books.tree is not None
        self.store.put_blob(new_hash, books.new_bytes)
        failpoint(CLOSE_AFTER_AGGREGATE)
        orgs = [u.organisation for u in uploads]
        tx = self._settle(round_id, new_hash, orgs, priced, valuation, tree)
        accuracy = evaluate_params(self._model, priced.params, self._x_val, self._y_val, "accuracy")
        by_org = {org.lower(): i for i, org in enumerate(orgs)}
        results: list[wire.OrganisationResult] = []
        for org in sorted(set(expected) | set(orgs), key=str.lower):
            i = by_org.get(org.lower())
            if i is None:
                results.append(
                    wire.OrganisationResult(organisation=org, status=wire.UploadStatus.MISSING)
                )
                continue
            results.append(
                wire.OrganisationResult(
                    organisation=uploads[i].organisation,
                    status=wire.UploadStatus.ACCEPTED,
                    update_hash=uploads[i].update_hash,
                    num_samples=uploads[i].num_samples,
                    score=priced.values[i],
                    score_fixed=str(priced.scores[i]),
                    reward=str(priced.rewards[i]),
                    flags=priced.flags[i],
                    flag_reasons=flag_names(priced.flags[i]),
                    note=priced.notes.get(i),
                    norm=priced.norms[i],
                    aggregated=i in priced.aggregated,
                )
            )
        for i, flags in enumerate(priced.flags):
            if flags:
                log.warning(
                    "round %d: flagged %s (%s): %s",
                    round_id,
                    orgs[i],
                    ", ".join(flag_names(flags)),
                    priced.notes.get(i, ""),
                )
        result = wire.RoundResult(
            round_id=round_id,
            status=wire.RoundStatus.FINALIZED,
            model_hash=stored.model_hash,
            new_model_hash=new_hash,
            deadline=stored.deadline,
            validation_accuracy=accuracy,
            finalize_tx=tx,
            valuation_method=valuation.method,
            valuation_seed=valuation.seed,
            validation_hash=hex32(valuation.validation_hash),
            evaluations=priced.evaluations,
            norm_bound=priced.norm_bound,
            settlement="claims" if claims else "direct",
            rewards_root=hex32(tree.root) if tree is not None else None,
            pricing=self.settings.pricing_record(),
            organisations=results,
        )
        self.store.set_round_status(
            round_id,
            wire.RoundStatus.FINALIZED,
            new_model_hash=new_hash,
            result=result.model_dump(mode="json"),
        )
        log.info("round %d finalized: accuracy %.4f, model %s", round_id, accuracy, new_hash)

    def _settle(
        self,
        round_id: int,
        new_model_hash: str,
        orgs: list[str],
        priced: RoundPricing | None,
        valuation: Valuation,
        tree: SettlementTree | None = None,
    ) -> str | None:
        """Send the finalize transaction unless the chain already has it (a crash after sending)."""
        if self.ledger.get_round(round_id).state == RoundState.FINALIZED:
            log.info("round %d already finalized on-chain; recording it", round_id)
            return None
        if priced is None:
            receipt = self.ledger.finalize_round(
                round_id, as_bytes32(new_model_hash), [], [], [], valuation=valuation
            )
        elif tree is not None:
            receipt = self.ledger.finalize_round_with_root(
                round_id,
                as_bytes32(new_model_hash),
                tree.root,
                tree.total_reward,
                len(orgs),
                flagged={o: f for o, f in zip(orgs, priced.flags, strict=True) if f},
                valuation=valuation,
            )
        else:
            receipt = self.ledger.finalize_round(
                round_id,
                as_bytes32(new_model_hash),
                orgs,
                priced.scores,
                priced.rewards,
                flags=priced.flags,
                valuation=valuation,
            )
        failpoint(CLOSE_AFTER_FINALIZE_TX)
        return hex32(bytes(receipt["transactionHash"]))

    def claim_ticket(self, round_id: int, organisation: str) -> wire.ClaimTicket:
        """What ``organisation`` sends to ``claimReward`` for a round settled by claims."""
        result = self.round_result(round_id)
        if result.settlement != "claims":
            raise NotFound(
                "not_claimable",
                f"round {round_id} was not settled by claims"
                + (" (it paid everyone directly)" if result.settlement == "direct" else ""),
            )
        tree = settlement_tree(result)
        try:
            leaf = tree.leaf_of(organisation)
        except KeyError as exc:
            raise NotFound(
                "no_claim", f"{organisation} has nothing to claim in round {round_id}"
            ) from exc
        return wire.ClaimTicket(
            round_id=round_id,
            organisation=leaf.organisation,
            score_fixed=str(leaf.score),
            reward=str(leaf.reward),
            flags=leaf.flags,
            proof=[hex32(p) for p in tree.proof(organisation)],
            root=hex32(tree.root),
        )

    # ------------------------------------------------------------------ reads

    def _round_state(self) -> tuple[int, str] | None:
        latest = self.store.latest_round()
        return None if latest is None else (latest.round_id, latest.status)

    def current_after(self, known: tuple[int, str] | None, wait_s: float) -> wire.CurrentRound:
        """The current round once its (round, status) differs from ``known``, or after
        ``wait_s`` seconds: a long poll, so that nodes learn of a new round at once."""
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_LONG_POLL_S)
        with self._changed:
            while (
                known is not None
                and self._round_state() == known
                and not self._stop.is_set()
                and (left := deadline - time.monotonic()) > 0
            ):
                self._changed.wait(left)
        return self.current()

    def current(self) -> wire.CurrentRound:
        current = self.store.latest_round()
        if current is None:
            raise NotFound("no_round", "no round has been opened yet")
        return wire.CurrentRound(
            training=self.training_status(),
            round_id=current.round_id,
            status=wire.RoundStatus(current.status),
            model_hash=current.model_hash,
            deadline=current.deadline,
            total_rounds=self.settings.total_rounds,
            task=self.settings.task,
            organisations_expected=len(self.expected_organisations(current.round_id)),
            uploads_received=len(self.store.updates_for(current.round_id)),
        )

    def round_result(self, round_id: int) -> wire.RoundResult:
        stored = self.store.get_round(round_id)
        if stored is None:
            raise NotFound("unknown_round", f"round {round_id} does not exist")
        if stored.result is not None:
            return wire.RoundResult.model_validate(stored.result)
        uploads = self.store.updates_for(round_id)
        return wire.RoundResult(
            round_id=round_id,
            status=wire.RoundStatus(stored.status),
            model_hash=stored.model_hash,
            deadline=stored.deadline,
            organisations=[
                wire.OrganisationResult(
                    organisation=u.organisation,
                    status=wire.UploadStatus.ACCEPTED,
                    update_hash=u.update_hash,
                    num_samples=u.num_samples,
                )
                for u in uploads
            ],
        )

    def model_bytes(self, model_hash: str) -> bytes:
        try:
            digest = hex32(as_bytes32(model_hash))
        except ValueError as exc:
            raise NotFound("unknown_model", f"{model_hash!r} is not a 32-byte hash") from exc
        # Only global models: individual updates are for the coordinator's eyes (and its
        # auditors', from its data directory), never served to other members.
        data = self.store.get_blob(digest) if self.store.is_global_model(digest) else None
        if data is None:
            raise NotFound("unknown_model", f"no global model with hash {digest}")
        return data

    # ----------------------------------------------------------------- uploads

    def accept_upload(
        self, path_round_id: int, headers: Mapping[str, str], body: bytes
    ) -> tuple[wire.UploadReceipt, bool]:
        """Verify an upload against its signature and on-chain commitment, then store it durably.

        Returns the receipt and whether it was newly stored (False for an identical re-upload).
        """
        signed = parse_upload_headers(headers, path_round_id)
        auth = signed.auth
        try:
            signer = recover_signer(
                auth, signed.signature, chain_id=self._chain_id, ledger=self.ledger.address
            )
        except SignatureError as exc:
            raise Unauthorized(exc.code, exc.message) from exc
        try:
            signer_registered = self.ledger.is_organisation(signer)
        except ChainError as exc:
            raise ChainUnavailable(f"cannot verify the signer on-chain: {exc}") from exc
        if signer != auth.organisation:
            if signer_registered:
                raise Forbidden(
                    "impersonation",
                    f"organisation {signer} signed an upload on behalf of {auth.organisation}",
                    signer=signer,
                )
            raise Unauthorized(
                "bad_signature",
                "the signature does not match the upload (wrong key, chain id, ledger or field)",
            )
        if not signer_registered:
            raise Unauthorized(
                "unregistered_signer",
                f"{signer} is not a registered organisation on ledger {self.ledger.address}",
            )
        now = self.clock()
        if auth.expiry < now:
            raise Unauthorized("expired", f"the upload authorisation expired at {auth.expiry}")
        if auth.expiry > now + self.settings.max_expiry_s:
            raise Unauthorized(
                "expiry_too_far",
                f"the authorisation must expire within {self.settings.max_expiry_s} s",
            )
        body_hash = hex32(keccak(body))
        if body_hash != hex32(auth.update_hash):
            raise Unauthorized(
                "body_hash_mismatch",
                f"the body hashes to {body_hash}, the signed hash is {hex32(auth.update_hash)}",
            )

        with self._lock:
            current = self.store.latest_round()
            if current is None or auth.round_id != current.round_id:
                raise Conflict(
                    "wrong_round",
                    f"update for round {auth.round_id} rejected: round "
                    f"{current.round_id if current else 0} is current",
                    current_round=current.round_id if current else 0,
                )
            existing = self.store.get_update(auth.round_id, signer)
            if existing is not None:
                return self._duplicate(existing, body_hash)
            if current.status != wire.RoundStatus.OPEN:
                raise Conflict(
                    "round_closed",
                    f"round {current.round_id} is {current.status} and takes no more uploads",
                    current_round=current.round_id,
                )
            if now > current.deadline + self.settings.upload_grace_s:
                raise Conflict(
                    "deadline_passed",
                    f"round {current.round_id} closed for uploads at {current.deadline}",
                    current_round=current.round_id,
                )
            if self.store.nonce_used(signer, str(auth.nonce)):
                raise Unauthorized("replayed", f"nonce {auth.nonce} was already used by {signer}")

        try:
            commitment = self.ledger.commitment_of(auth.round_id, signer)
        except ChainError as exc:
            raise ChainUnavailable(f"cannot read the on-chain commitment: {exc}") from exc
        if commitment is None:
            raise Conflict(
                "not_committed",
                f"{signer} has not committed an update for round {auth.round_id} on-chain; "
                "call commitUpdate first",
            )
        if hex32(commitment.update_hash) != body_hash:
            raise Conflict(
                "commitment_mismatch",
                f"the body hashes to {body_hash} but {signer} committed "
                f"{hex32(commitment.update_hash)} for round {auth.round_id}",
            )
        if commitment.num_samples != auth.num_samples:
            raise Conflict(
                "samples_mismatch",
                f"signed sample count {auth.num_samples} differs from the committed "
                f"{commitment.num_samples}",
            )
        try:
            tensors = decode_update(body, self._specs)
        except CommitmentError as exc:
            raise Unprocessable(exc.code, exc.message) from exc
        if self.settings.max_update_norm is not None:
            norm = l2_norm(tensors)
            if norm > self.settings.max_update_norm:
                raise Unprocessable(
                    "norm_exceeded",
                    f"update L2 norm {norm:.4g} exceeds the bound {self.settings.max_update_norm:.4g}",
                    norm=norm,
                )

        self.store.put_blob(body_hash, body)
        failpoint(UPLOAD_AFTER_BLOB)
        with self._lock:
            current = self.store.latest_round()
            if current is None or current.round_id != auth.round_id or current.status != "open":
                raise Conflict(
                    "round_closed",
                    f"round {auth.round_id} closed while the upload was verified",
                    current_round=current.round_id if current else 0,
                )
            stored, created = self.store.insert_update(
                StoredUpdate(
                    round_id=auth.round_id,
                    organisation=signer,
                    update_hash=body_hash,
                    num_samples=auth.num_samples,
                    nonce=str(auth.nonce),
                    received_at=self.clock(),
                )
            )
        if not created:  # a concurrent request for the same organisation and round won
            return self._duplicate(stored, body_hash)
        self._wake.set()
        return self._receipt(stored), True

    def _duplicate(self, existing: StoredUpdate, body_hash: str) -> tuple[wire.UploadReceipt, bool]:
        if existing.update_hash != body_hash:
            raise Conflict(
                "already_submitted",
                f"{existing.organisation} already submitted {existing.update_hash} for round "
                f"{existing.round_id}; an update is final",
                update_hash=existing.update_hash,
            )
        return self._receipt(existing, duplicate=True), False

    @staticmethod
    def _receipt(update: StoredUpdate, *, duplicate: bool = False) -> wire.UploadReceipt:
        return wire.UploadReceipt(
            round_id=update.round_id,
            organisation=update.organisation,
            update_hash=update.update_hash,
            num_samples=update.num_samples,
            received_at=update.received_at,
            duplicate=duplicate,
        )

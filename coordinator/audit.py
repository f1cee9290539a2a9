"""Recompute a finished round from the coordinator's stored inputs and check it against the chain.

Any consortium member holding a copy of the coordinator's data directory (or the operator,
on the live one: it is opened read-only) runs ``fedledger audit --round R``. Every figure the
ledger records for the round is recomputed with the same code the coordinator closed it with
(``close_books``), from inputs that are themselves checked against on-chain hashes:

- each stored update hashes to the organisation's on-chain commitment, with its sample count;
- the round's start model hashes to the on-chain model hash;
- the task spec hashes to the ledger's ``taskSpec()`` and to the one the round was priced with;
- the validation set hashes to the ``validationHash`` recorded with the scores;
- the recomputed aggregate hashes to the on-chain new model hash;
- the recomputed scores, rewards and flags equal the on-chain settlement (each organisation's
  records, or the Merkle root and total of a round settled by claims);
- every organisation that committed on-chain (``committersOf``) has its upload in the store.

A member who uploaded holds the coordinator's signed receipt (``fedledger.receipts``); given
to the audit (``--receipt FILE``), it is checked against the ledger's coordinator role, and an
acknowledged update missing from the store or from the round's settlement is reported as a
dropped upload, with the coordinator's own signature as the proof.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedledger import wire
from fedledger.coordinator.books import Books, close_books
from fedledger.coordinator.inputs import load_round_inputs
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.store import Store
from fedledger.errors import ReceiptError
from fedledger.incentive.commitment import decode_tensors, keccak
from fedledger.incentive.compression import Codec
from fedledger.incentive.ledger import LedgerClient, RoundRecord
from fedledger.incentive.onchain import RoundState, hex32
from fedledger.receipts import verify_receipt
from fedledger.tasks import TaskSpec, load_spec, load_task, load_validation, parse_spec


def _spec(store: Store, policy: PricingPolicy, spec_file: Path | None) -> TaskSpec:
    """The spec file given, else the one the coordinator kept for the round (else the built-in
    digits task's, for rounds priced before specs were recorded)."""
    if spec_file is not None or policy.task_spec is None:
        return load_spec(spec_file)
    kept = store.task_spec(policy.task_spec)
    if kept is None:
        return load_spec(None)
    text, path = kept
    return parse_spec(text.encode("utf-8"), source=Path(path) if path else None)


@dataclass(frozen=True)
class Check:
    """One comparison of a recomputed figure with what the chain (or the store) records."""

    what: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class DroppedUpload:
    """An upload the coordinator acknowledged with a valid signed receipt, then left out of its
    store or of the round's settlement: the receipt proves it was accepted."""

    receipt: wire.UploadReceipt
    missing_from: tuple[str, ...]  # "the coordinator's store", "the round's settlement"

    def __str__(self) -> str:
        r = self.receipt
        return (
            f"round {r.round_id}, organisation {r.organisation}: coordinator {r.coordinator} "
            f"signed a receipt for update {r.update_hash} ({r.num_samples} samples, received at "
            f"{r.received_at}), which is missing from {' and '.join(self.missing_from)}"
        )


@dataclass
class AuditReport:
    round_id: int
    checks: list[Check] = field(default_factory=list)
    books: Books | None = None
    dropped: list[DroppedUpload] = field(default_factory=list)  # proven by receipts

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def mismatches(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, ok, detail))
        return ok


def audit_round(
    round_id: int,
    ledger: LedgerClient,
    data_dir: Path,
    *,
    spec: Path | None = None,
    validation: str | None = None,
    device: torch.device | None = None,
    receipts: Sequence[wire.UploadReceipt] = (),
) -> AuditReport:
    """Recompute round ``round_id`` from ``data_dir`` and compare everything with ``ledger``.

    The task spec and validation set are the ones the coordinator kept in ``data_dir`` unless
    ``spec`` (a spec file) or ``validation`` (as the task loads it) are given; either way they
    are checked against the chain. Each of ``receipts`` (members' receipts for the round) is
    verified, and the update it acknowledges looked for in the store and the settlement; those
    missing are the report's ``dropped``."""
    report = AuditReport(round_id)
    record = ledger.get_round(round_id)
    finalized = report.check(
        "round finalized on-chain",
        record.state == RoundState.FINALIZED,
        f"state {record.state.name.lower()}",
    )
    if not finalized and not receipts:
        return report
    store = Store(data_dir, read_only=True)
    try:
        if finalized:
            _audit(report, record, ledger, store, device or torch.device("cpu"), spec, validation)
        _check_receipts(report, record, ledger, store, receipts)
    finally:
        store.close()
    return report


def _audit(
    report: AuditReport,
    record: RoundRecord,
    ledger: LedgerClient,
    store: Store,
    device: torch.device,
    spec_file: Path | None,
    validation: str | None,
) -> None:
    round_id = report.round_id
    stored = store.get_round(round_id)
    if not report.check("round in the coordinator's store", stored is not None):
        return
    assert stored is not None
    closed = (wire.RoundStatus.FINALIZED, wire.RoundStatus.FAILED)
    if not report.check(
        "round closed by the coordinator",
        stored.status in closed and stored.result is not None,
        f"stored status {stored.status}",
    ):
        return
    result = wire.RoundResult.model_validate(stored.result)
    if stored.status == wire.RoundStatus.FAILED:
        _audit_failed(report, record, ledger, store, result, device, spec_file, validation)
        return

    _check_inputs(report, record, ledger, store, stored.model_hash)
    if not result.pricing:
        report.check("pricing settings recorded with the round", False, "none recorded")
        return
    policy = PricingPolicy.from_record(result.pricing)
    valuation = ledger.valuation_of(round_id)
    kept_validation = valuation.validation_hash if valuation is not None else None
    books = _recompute(
        report, ledger, store, policy, kept_validation, device, spec_file, validation
    )
    validation_hash = books.valuation.validation_hash
    report.check(
        "validation set matches the on-chain validation hash",
        valuation is not None and valuation.validation_hash == validation_hash,
        f"local 0x{validation_hash.hex()}",
    )
    report.check(
        "valuation method and seed match the chain",
        valuation is not None
        and (valuation.method, valuation.seed) == (books.valuation.method, books.valuation.seed),
        f"recomputed {books.valuation.method} seed {books.valuation.seed}",
    )
    report.check(
        "aggregate matches the on-chain new model hash",
        books.new_hash == hex32(record.new_model_hash),
        f"recomputed {books.new_hash}, on-chain {hex32(record.new_model_hash)}",
    )
    report.check(
        "total reward matches the chain",
        sum(books.rewards) == record.total_reward,
        f"recomputed {sum(books.rewards)}, on-chain {record.total_reward}",
    )
    if books.tree is not None:
        report.check(
            "Merkle root of the settlement matches the chain",
            books.tree.root == record.rewards_root,
            f"recomputed {hex32(books.tree.root)}, on-chain {hex32(record.rewards_root)}",
        )
    elif record.by_claims:
        report.check("settlement mode matches the chain", False, "the chain settled by claims")
    for k, org in enumerate(books.organisations):
        expected = (books.scores[k], books.rewards[k], books.flags[k])
        if books.tree is not None and not ledger.is_settled(round_id, org):
            # Unclaimed: only the flags are on-chain yet (posted with the root).
            report.check(
                f"flags of {org} match the chain (reward not claimed yet)",
                ledger.flags_of(round_id, org) == books.flags[k],
                f"recomputed {books.flags[k]}",
            )
            continue
        on_chain = (
            ledger.score_of(round_id, org),
            ledger.reward_of(round_id, org),
            ledger.flags_of(round_id, org),
        )
        report.check(
            f"score, reward and flags of {org} match the chain",
            on_chain == expected,
            f"recomputed {expected}, on-chain {on_chain}",
        )


def _check_inputs(
    report: AuditReport, record: RoundRecord, ledger: LedgerClient, store: Store, model_hash: str
) -> None:
    """The round's start model and every stored update, each against its on-chain hash; every
    on-chain committer's upload in the store."""
    start = store.get_blob(model_hash)
    report.check(
        "start model matches the on-chain model hash",
        start is not None and keccak(start) == record.model_hash,
        f"on-chain 0x{record.model_hash.hex()}",
    )
    for update in store.updates_for(report.round_id):
        blob = store.get_blob(update.update_hash)
        committed = ledger.commitment_of(report.round_id, update.organisation)
        report.check(
            f"update of {update.organisation} matches its commitment",
            blob is not None
            and committed is not None
            and hex32(keccak(blob)) == update.update_hash
            and hex32(committed.update_hash) == update.update_hash
            and committed.num_samples == update.num_samples,
            "stored bytes, stored hash, on-chain hash and sample count agree"
            if committed is not None
            else "nothing committed on-chain",
        )
    _check_committers(report, ledger, store)


def _check_committers(report: AuditReport, ledger: LedgerClient, store: Store) -> None:
    """Every organisation that committed on-chain has an upload in the store. One that has none
    never uploaded, was refused, or was dropped by the coordinator; its receipt tells which."""
    round_id = report.round_id
    committers = ledger.commit_order(round_id)
    stored = {u.organisation.lower() for u in store.updates_for(round_id)}
    missing = [org for org in committers if org.lower() not in stored]
    for org in missing:
        report.check(
            f"upload of {org}, committed on-chain, is in the store",
            False,
            f"round {round_id}: {org} committed on-chain, but the store holds no upload from "
            "it: it never uploaded, its upload was refused, or the coordinator dropped it (the "
            "organisation's signed receipt proves a drop: fedledger audit --receipt FILE)",
        )
    if not missing:
        report.check(
            "every on-chain committer's upload is in the store",
            True,
            f"{len(committers)} committer(s) on-chain",
        )


def _check_receipts(
    report: AuditReport,
    record: RoundRecord,
    ledger: LedgerClient,
    store: Store,
    receipts: Sequence[wire.UploadReceipt],
) -> None:
    """Each receipt: for this round, signed by an account holding COORDINATOR_ROLE; then the
    update it acknowledges in the store and in the settlement, or recorded as dropped."""
    chain_id = ledger.chain_id() if receipts else 0
    for receipt in receipts:
        org = receipt.organisation
        if not report.check(
            f"receipt of {org} is for round {report.round_id}",
            receipt.round_id == report.round_id,
            f"it acknowledges an upload for round {receipt.round_id}",
        ):
            continue
        try:
            signer = verify_receipt(receipt, ledger, chain_id=chain_id)
        except ReceiptError as exc:
            report.check(
                f"receipt of {org} is signed by the ledger's coordinator",
                False,
                f"{exc.code.value}: {exc.message}",
            )
            continue
        report.check(
            f"receipt of {org} is signed by the ledger's coordinator",
            True,
            f"{signer} holds COORDINATOR_ROLE; received at {receipt.received_at}",
        )
        committed = ledger.commitment_of(report.round_id, org)
        report.check(
            f"receipt of {org} acknowledges its on-chain commitment",
            committed is not None
            and hex32(committed.update_hash) == receipt.update_hash.lower()
            and committed.num_samples == receipt.num_samples,
            f"receipt {receipt.update_hash} ({receipt.num_samples} samples)",
        )
        missing = []
        stored, detail = _stored(store, receipt)
        if not report.check(
            f"upload of {org} acknowledged by its receipt is in the store", stored, detail
        ):
            missing.append("the coordinator's store")
        settled = _settled(report, record, ledger, org)
        if settled is not None and not report.check(
            f"upload of {org} acknowledged by its receipt is in the round's settlement",
            settled,
            "settled on-chain" if settled else "the settlement leaves it out",
        ):
            missing.append("the round's settlement")
        if missing:
            report.dropped.append(DroppedUpload(receipt, tuple(missing)))


def _stored(store: Store, receipt: wire.UploadReceipt) -> tuple[bool, str]:
    """Whether the store holds the receipt's update (its record and its bytes), and what it has."""
    update = store.get_update(receipt.round_id, receipt.organisation)
    if update is None:
        return False, "DROPPED: the store has no record of this acknowledged upload"
    if update.update_hash != receipt.update_hash.lower():
        return False, f"DROPPED: the store records another update, {update.update_hash}"
    blob = store.get_blob(update.update_hash)
    if blob is None or hex32(keccak(blob)) != update.update_hash:
        return False, "DROPPED: the store records it, but its bytes are missing or altered"
    return True, "recorded, bytes intact"


def _settled(
    report: AuditReport, record: RoundRecord, ledger: LedgerClient, org: str
) -> bool | None:
    """Whether a finalized round's settlement includes ``org``: scored on-chain (a direct
    settlement, or a claim made), or a leaf of the recomputed books whose root the chain holds.
    None where there is no settlement to look in: the round is not finalized, or it failed
    (its model unchanged: it paid nobody), or settled by claims that cannot be recomputed."""
    if record.state != RoundState.FINALIZED or record.new_model_hash == record.model_hash:
        return None
    if ledger.is_settled(report.round_id, org):
        return True
    if not record.by_claims:
        return False
    books = report.books
    if books is None:
        return None
    return org.lower() in {o.lower() for o in books.organisations}


def _recompute(
    report: AuditReport,
    ledger: LedgerClient,
    store: Store,
    policy: PricingPolicy,
    validation_hash: bytes | None,
    device: torch.device,
    spec_file: Path | None,
    validation: str | None,
) -> Books:
    """The round's books closed again exactly as the coordinator closes a round: the spec
    (checked against the chain), the validation set it kept (by ``validation_hash``) or the
    one given, the stored inputs."""
    spec = _spec(store, policy, spec_file)
    chain_spec = ledger.task_spec()
    report.check(
        "task spec matches the ledger's taskSpec()",
        spec.hash == chain_spec,
        f"{spec.source or 'the kept spec'} hashes to {hex32(spec.hash)}, "
        f"on-chain {hex32(chain_spec)}",
    )
    if policy.task_spec is not None:
        report.check(
            "task spec is the one the round was priced with",
            hex32(spec.hash) == policy.task_spec,
            f"recorded {policy.task_spec}",
        )
    task = load_task(spec, "validator")
    kept = None
    if validation is None and validation_hash is not None:
        kept = store.get_blob(hex32(validation_hash))
    if kept is not None:
        tensors = decode_tensors(kept)
        x_val, y_val = tensors["x"], tensors["y"]
    else:
        x_val, y_val = load_validation(task, validation)
    inputs = load_round_inputs(
        store,
        report.round_id,
        ledger.commit_order(report.round_id),
        task.build_model(seed=policy.model_seed),
        x_val,
        y_val,
        Codec.of(spec.compression),
    )
    books = close_books(inputs, policy, device=device)
    report.books = books
    return books


def _audit_failed(
    report: AuditReport,
    record: RoundRecord,
    ledger: LedgerClient,
    store: Store,
    result: wire.RoundResult,
    device: torch.device,
    spec_file: Path | None,
    validation: str | None,
) -> None:
    """A failed round: the chain kept the model and paid nothing; one refused after pricing
    (too few updates passed the screens) is priced again, and must be refused again."""
    report.check(
        "model unchanged on-chain (a failed round publishes none)",
        record.new_model_hash == record.model_hash,
        f"on-chain 0x{record.model_hash.hex()} -> 0x{record.new_model_hash.hex()}",
    )
    report.check(
        "nothing paid on-chain", record.total_reward == 0, f"on-chain {record.total_reward}"
    )
    _check_inputs(report, record, ledger, store, result.model_hash)
    if not result.pricing:  # failed before pricing: the quorum was not met
        return
    policy = PricingPolicy.from_record(result.pricing)
    kept = bytes.fromhex(result.validation_hash[2:]) if result.validation_hash else None
    books = _recompute(report, ledger, store, policy, kept, device, spec_file, validation)
    report.check(
        "too few updates passed the screens (recomputed)",
        0 < len(books.aggregated) < policy.min_aggregated,
        f"{len(books.aggregated)} passed, min_aggregated {policy.min_aggregated}",
    )
    recorded = {o.organisation.lower(): o.flags for o in result.organisations}
    for k, org in enumerate(books.organisations):
        report.check(
            f"flags of {org} match the round's result",
            recorded.get(org.lower()) == books.flags[k],
            f"recomputed {books.flags[k]}, recorded {recorded.get(org.lower())}",
        )

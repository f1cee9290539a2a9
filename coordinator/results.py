"""A round's public result (``GET /v1/rounds/{id}``), its summary and claim tickets, built
from its records.

Pure: every function takes what the store and the books hold and returns wire schemas, so the
coordinator answers the same thing before and after a restart, and an auditor rebuilds a
settlement tree from a recorded result alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from fedledger import wire
from fedledger.coordinator.books import Books
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.store import StoredRound, StoredUpdate
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.incentive.ledger import RetirementRecord
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree
from fedledger.incentive.onchain import TOKEN_UNIT, flag_names, hex32


def _absent(
    organisations: Sequence[str], retired: Mapping[str, RetirementRecord]
) -> list[wire.OrganisationResult]:
    """Expected organisations without an upload: missing, or retired (with what they spent);
    ``retired`` is keyed by lower-case address."""
    absent: list[wire.OrganisationResult] = []
    for o in organisations:
        record = retired.get(o.lower())
        absent.append(
            wire.OrganisationResult(organisation=o, status=wire.UploadStatus.MISSING)
            if record is None
            else wire.OrganisationResult(
                organisation=o, status=wire.UploadStatus.RETIRED, epsilon=record.epsilon
            )
        )
    return absent


def pending_result(stored: StoredRound, uploads: Sequence[StoredUpdate]) -> wire.RoundResult:
    """A round still open or closing: who has uploaded so far."""
    return wire.RoundResult(
        round_id=stored.round_id,
        status=stored.status,
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


def failed_result(
    stored: StoredRound,
    expected: Sequence[str],
    reason: str,
    finalize_tx: str | None,
    *,
    retired: Mapping[str, RetirementRecord] | None = None,
    uploads: Sequence[StoredUpdate] = (),
    books: Books | None = None,
    policy: PricingPolicy | None = None,
) -> wire.RoundResult:
    """A round closed without a new model (quorum not met, or too few updates passed the
    screens): model unchanged, nothing paid. Each organisation that uploaded is listed with its
    update; with the round's ``books`` (priced, then refused), with the flags and notes that
    left it out, and the ``policy`` is recorded so that an audit redoes that judgement."""
    held = {u.organisation.lower(): u for u in uploads}
    by_org = {org.lower(): i for i, org in enumerate(books.organisations)} if books else {}
    organisations: list[wire.OrganisationResult] = []
    for org in sorted(set(expected) | {u.organisation for u in uploads}, key=str.lower):
        update = held.get(org.lower())
        if update is None:
            organisations += _absent([org], retired or {})
            continue
        i = by_org.get(org.lower())
        flags = books.flags[i] if books is not None and i is not None else 0
        organisations.append(
            wire.OrganisationResult(
                organisation=update.organisation,
                status=wire.UploadStatus.ACCEPTED,
                update_hash=update.update_hash,
                num_samples=update.num_samples,
                flags=flags,
                flag_reasons=flag_names(flags),
                note=books.notes.get(i) if books is not None and i is not None else None,
                aggregated=False,
            )
        )
    return wire.RoundResult(
        round_id=stored.round_id,
        status=wire.RoundStatus.FAILED,
        model_hash=stored.model_hash,
        new_model_hash=stored.model_hash,
        deadline=stored.deadline,
        reason=reason,
        finalize_tx=finalize_tx,
        pricing=policy.record() if books is not None and policy is not None else None,
        validation_hash=hex32(books.valuation.validation_hash) if books is not None else None,
        organisations=organisations,
    )


def finalized_result(
    stored: StoredRound,
    books: Books,
    expected: Sequence[str],
    policy: PricingPolicy,
    finalize_tx: str | None,
    *,
    metrics: Mapping[str, float] | None = None,
    epsilons: Mapping[str, float | None] | None = None,
    retired: Mapping[str, RetirementRecord] | None = None,
) -> wire.RoundResult:
    """A settled round: every expected organisation, with its value, score, reward and flags;
    ``metrics`` are the new model's validation metrics the task reports, ``epsilons`` the
    epsilon each organisation committed with (by lower-case address), ``retired`` those that
    stopped training."""
    by_org = {org.lower(): i for i, org in enumerate(books.organisations)}
    organisations: list[wire.OrganisationResult] = []
    for org in sorted(set(expected) | set(books.organisations), key=str.lower):
        i = by_org.get(org.lower())
        if i is None:
            organisations += _absent([org], retired or {})
            continue
        organisations.append(
            wire.OrganisationResult(
                organisation=books.organisations[i],
                status=wire.UploadStatus.ACCEPTED,
                update_hash=books.update_hashes[i],
                num_samples=books.num_samples[i],
                value=books.values[i],
                value_stderr=books.errors[i],
                score=str(books.scores[i]),
                reward=str(books.rewards[i]),
                flags=books.flags[i],
                flag_reasons=flag_names(books.flags[i]),
                note=books.notes.get(i),
                norm=books.norms[i],
                aggregated=i in books.aggregated,
                epsilon=(epsilons or {}).get(org.lower()),
            )
        )
    return wire.RoundResult(
        round_id=stored.round_id,
        status=wire.RoundStatus.FINALIZED,
        model_hash=stored.model_hash,
        new_model_hash=books.new_hash,
        deadline=stored.deadline,
        validation_accuracy=books.accuracy,
        validation_utility=books.utility,
        validation_gain=books.gain,
        validation_metrics=dict(metrics or {}),
        finalize_tx=finalize_tx,
        valuation_method=books.valuation.method,
        valuation_seed=books.valuation.seed,
        validation_hash=hex32(books.valuation.validation_hash),
        evaluations=books.evaluations,
        norm_bound=books.norm_bound,
        settlement="claims" if books.tree is not None else "direct",
        rewards_root=hex32(books.tree.root) if books.tree is not None else None,
        pricing=policy.record(),
        organisations=organisations,
    )


def for_non_members(result: wire.RoundResult) -> wire.RoundResult:
    """``result`` as a reader who is not a member sees it: without each organisation's sample
    count, update norm and whether it was aggregated. With those and the two global models,
    the members of a small aggregate recover each other's updates; scores, rewards and flags
    stay (they are on the chain)."""
    return result.model_copy(
        update={
            "organisations": [
                o.model_copy(update={"num_samples": None, "aggregated": None, "norm": None})
                for o in result.organisations
            ]
        }
    )


def tokens_text(units: int) -> str:
    """Token units as an exact decimal number of tokens (18 decimals), e.g. ``12.5``."""
    return f"{(Decimal(units) / TOKEN_UNIT).normalize():f}"


@dataclass(frozen=True)
class RoundSummary:
    """An ended round in figures, as the operator's per-round log line and metrics report it."""

    round_id: int
    outcome: Literal["settled", "failed"]
    organisations: int  # expected, or uploaded without being expected
    committed: int  # commitments on-chain
    uploaded: int  # updates accepted by the coordinator
    aggregated: int  # updates in the new model (0 for a failed round)
    metrics: Mapping[str, float] = field(default_factory=dict)  # the new model's, on validation
    paid_units: int = 0  # token units paid in all
    flags: Mapping[str, int] = field(default_factory=dict)  # flag name -> updates flagged so
    reason: str | None = None  # why a failed round failed

    def message(self) -> str:
        """The log line: one line with every figure."""
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()) or "no metrics"
        flags = ", ".join(f"{k}={v}" for k, v in self.flags.items()) or "none"
        line = (
            f"round {self.round_id} {self.outcome}: {self.committed} committed, "
            f"{self.uploaded} uploaded, {self.aggregated} aggregated of {self.organisations} "
            f"organisations; {metrics}; paid {tokens_text(self.paid_units)} FLR "
            f"({self.paid_units} units); flags {flags}"
        )
        return line if self.reason is None else f"{line}; reason: {self.reason}"

    def fields(self) -> dict[str, object]:
        """The figures as structured log fields (``extra=``); amounts as decimal strings."""
        return {
            "round_id": self.round_id,
            "outcome": self.outcome,
            "organisations": self.organisations,
            "committed": self.committed,
            "uploaded": self.uploaded,
            "aggregated": self.aggregated,
            "metrics": dict(self.metrics),
            "paid_units": str(self.paid_units),
            "paid_tokens": tokens_text(self.paid_units),
            "flags": dict(self.flags),
            "reason": self.reason,
        }


def round_summary(result: wire.RoundResult, *, committed: int) -> RoundSummary:
    """The summary of a finalized or failed round from its result; ``committed``: how many
    organisations committed an update on-chain."""
    if result.status not in (wire.RoundStatus.FINALIZED, wire.RoundStatus.FAILED):
        raise ValueError(f"round {result.round_id} has not ended: it is {result.status.value}")
    accepted = [o for o in result.organisations if o.status == wire.UploadStatus.ACCEPTED]
    metrics = dict(result.validation_metrics)
    if not metrics and result.validation_utility is not None:
        metrics["utility"] = result.validation_utility
    flags = Counter(name for o in accepted for name in o.flag_reasons)
    return RoundSummary(
        round_id=result.round_id,
        outcome="settled" if result.status == wire.RoundStatus.FINALIZED else "failed",
        organisations=len(result.organisations),
        committed=committed,
        uploaded=len(accepted),
        aggregated=sum(1 for o in accepted if o.aggregated),
        metrics=metrics,
        paid_units=sum(int(o.reward) for o in accepted),
        flags=dict(sorted(flags.items())),
        reason=result.reason,
    )


def settlement_tree(result: wire.RoundResult) -> SettlementTree:
    """The Merkle tree of a round's settlement, rebuilt from its recorded result."""
    return SettlementTree.build(
        [
            SettlementLeaf(result.round_id, o.organisation, int(o.score), int(o.reward), o.flags)
            for o in result.organisations
            if o.status == wire.UploadStatus.ACCEPTED
        ]
    )


def claim_ticket(result: wire.RoundResult, organisation: str) -> wire.ClaimTicket:
    """What ``organisation`` sends to ``claimReward`` for a round settled by claims."""
    if result.settlement != "claims":
        raise CoordinatorError(
            ErrorCode.NOT_CLAIMABLE,
            f"round {result.round_id} was not settled by claims"
            + (" (it paid everyone directly)" if result.settlement == "direct" else ""),
        )
    tree = settlement_tree(result)
    try:
        leaf = tree.leaf_of(organisation)
    except KeyError as exc:
        raise CoordinatorError(
            ErrorCode.NO_CLAIM, f"{organisation} has nothing to claim in round {result.round_id}"
        ) from exc
    return wire.ClaimTicket(
        round_id=result.round_id,
        organisation=leaf.organisation,
        score=str(leaf.score),
        reward=str(leaf.reward),
        flags=leaf.flags,
        proof=[hex32(p) for p in tree.proof(organisation)],
        root=hex32(tree.root),
    )

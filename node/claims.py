"""An organisation's Merkle-root rewards: which the chain says it has not claimed, each claim
ticket checked against the on-chain root and sent only when the ledger will accept it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fedledger.errors import ContractRevert, CoordinatorRejected
from fedledger.incentive.ledger import LedgerClient, RoundRecord
from fedledger.incentive.merkle import SettlementLeaf, verify
from fedledger.incentive.onchain import RoundState
from fedledger.node.client import CoordinatorClient

log = logging.getLogger("fedledger.node")


@dataclass(frozen=True)
class Claim:
    """A reward the organisation claimed with a Merkle proof (rounds settled by claims)."""

    round_id: int
    reward: int
    score: int
    flags: int
    tx_hash: str


NotClaimedReason = Literal["claimed", "no_ticket", "bad_ticket", "refused"]


@dataclass(frozen=True)
class NotClaimed:
    """A round whose reward was not claimed now, and why: ``claimed`` (already), ``no_ticket``
    (the coordinator has no leaf for the organisation), ``bad_ticket`` (the ticket does not
    verify against the on-chain root, or asks more than the round has left: never sent), or
    ``refused`` (the ledger reverted, e.g. claimed meanwhile by another process)."""

    round_id: int
    reason: NotClaimedReason
    detail: str

    @property
    def is_problem(self) -> bool:
        """Whether someone should look at it (a ticket that does not hold, a refused claim)."""
        return self.reason in ("bad_ticket", "refused")


ClaimResult = Claim | NotClaimed


def rounds_to_claim(
    ledger: LedgerClient,
    organisation: str,
    *,
    before_round: int | None = None,
    include_open: bool = False,
) -> list[int]:
    """The rounds, oldest first, in which ``organisation`` committed and is not settled yet,
    read from the chain alone: finalized by a Merkle root (claimable now) and, with
    ``include_open``, still open (claimable once finalized, if settled by root)."""
    last = (
        ledger.round_count()
        if before_round is None
        else min(ledger.round_count(), before_round - 1)
    )
    found: list[int] = []
    for round_id in range(1, last + 1):
        record = ledger.get_round(round_id)
        claimable = record.state == RoundState.FINALIZED and record.by_claims
        pending = include_open and record.state == RoundState.OPEN
        if not (claimable or pending):
            continue
        if ledger.commitment_of(round_id, organisation) is None:
            continue
        if not ledger.is_settled(round_id, organisation):
            found.append(round_id)
    return found


def claim_round(
    ledger: LedgerClient, client: CoordinatorClient, record: RoundRecord
) -> ClaimResult:
    """Claim the ledger account's reward in a finalized round settled by root: its ticket from
    the coordinator, checked as ``claimReward`` will check it (the proof against the on-chain
    root, the reward against what the round has left) before any gas is spent."""
    assert ledger.account is not None, "claiming needs the organisation's key"
    me, round_id = ledger.account.address, record.round_id
    if ledger.is_settled(round_id, me):
        return NotClaimed(round_id, "claimed", "already claimed")
    try:
        ticket = client.claim_ticket(round_id, me)
    except CoordinatorRejected as exc:
        return NotClaimed(round_id, "no_ticket", f"no claim ticket: {exc}")
    try:
        leaf = SettlementLeaf(round_id, me, int(ticket.score), int(ticket.reward), ticket.flags)
        proof = [bytes.fromhex(p.removeprefix("0x")) for p in ticket.proof]
    except ValueError as exc:
        return NotClaimed(
            round_id, "bad_ticket", f"the coordinator's claim ticket is malformed: {exc}"
        )
    if not verify(proof, record.rewards_root, leaf):
        return NotClaimed(
            round_id,
            "bad_ticket",
            "the coordinator's claim ticket does not verify against the on-chain root "
            f"0x{record.rewards_root.hex()}; not claimed",
        )
    remaining = record.total_reward - record.claimed_reward
    if leaf.reward > remaining:
        return NotClaimed(
            round_id,
            "bad_ticket",
            f"the ticket's reward {leaf.reward} exceeds the {remaining} token units the round "
            "has left to pay; not claimed",
        )
    try:
        receipt = ledger.claim_reward(round_id, leaf.score, leaf.reward, leaf.flags, proof)
    except ContractRevert as exc:
        return NotClaimed(round_id, "refused", f"claim refused on-chain: {exc}")
    log.info("round %d: claimed %d token units", round_id, leaf.reward)
    tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
    return Claim(round_id, leaf.reward, leaf.score, leaf.flags, tx_hash)


def claim_unclaimed(
    ledger: LedgerClient,
    client: CoordinatorClient,
    *,
    before_round: int | None = None,
    on_result: Callable[[ClaimResult], None] | None = None,
) -> list[ClaimResult]:
    """Claim every reward of the ledger account that the chain says is unclaimed, in rounds
    settled by Merkle root (before ``before_round``, if given); one result per such round.

    The coordinator is asked only for rounds that have something to claim. A chain or
    coordinator outage raises; what was claimed before it stays claimed.
    """
    assert ledger.account is not None, "claiming needs the organisation's key"
    results: list[ClaimResult] = []
    for round_id in rounds_to_claim(ledger, ledger.account.address, before_round=before_round):
        result = claim_round(ledger, client, ledger.get_round(round_id))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results

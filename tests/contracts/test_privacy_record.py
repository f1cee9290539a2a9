"""The privacy record: a DP commitment carries the epsilon spent, and an organisation whose
budget is spent retires, so the coordinator reports it as retired instead of missing."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from web3.logs import DISCARD

from fedledger.incentive.ledger import LedgerClient, RetirementRecord
from fedledger.incentive.onchain import FIXED_POINT_ONE, to_fixed_point

if TYPE_CHECKING:
    from tests.contracts.conftest import Chain

ExpectRevert = Callable[..., object]


def test_a_private_commitment_records_its_epsilon_beside_it(
    chain: Chain, org_ledgers: tuple[LedgerClient, ...],
    open_round: Callable[..., tuple[int, int]], expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    dp, plain = chain.orgs[0].address, chain.orgs[1].address
    round_id, _ = open_round()
    receipt = org_ledgers[0].commit_update(round_id, b"\xa0" * 32, 120, epsilon=2.375)
    events = chain.ledger.contract.events.PrivacySpent().process_receipt(receipt, errors=DISCARD)
    assert [dict(e["args"]) for e in events] == [
        {"roundId": round_id, "org": dp, "epsilon": 2375 * FIXED_POINT_ONE // 1000}
    ]
    committed = chain.ledger.contract.events.UpdateCommitted().process_receipt(
        receipt, errors=DISCARD
    )
    assert committed[0]["args"]["numSamples"] == 120  # the same commitment as commitUpdate's
    assert chain.ledger.commitment_of(round_id, dp).num_samples == 120  # type: ignore[union-attr]
    assert chain.ledger.epsilon_of(round_id, dp) == 2.375
    org_ledgers[1].commit_update(round_id, b"\xa1" * 32, 80)
    assert chain.ledger.epsilon_of(round_id, plain) is None
    assert chain.ledger.commit_order(round_id) == [dp, plain]
    expect_revert(
        lambda: org_ledgers[2].commit_update(round_id, b"\xa2" * 32, 80, epsilon=0.0),
        "ZeroEpsilon",
    )
    expect_revert(  # a commitment is once per round, whichever function makes it
        lambda: org_ledgers[0].commit_update(round_id, b"\xa3" * 32, 120, epsilon=3.0),
        "AlreadyCommitted",
        round_id,
        dp,
        b"\xa0" * 32,
    )


def test_a_retired_organisation_commits_no_more_and_says_what_it_spent(
    chain: Chain, org_ledgers: tuple[LedgerClient, ...], outsider_ledger: LedgerClient,
    open_round: Callable[..., tuple[int, int]], advance_past: Callable[[int], int],
    coordinator_ledger: LedgerClient, expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    org = chain.orgs[0].address
    round_id, deadline = open_round()
    org_ledgers[0].commit_update(round_id, b"\xa0" * 32, 120, epsilon=7.5)
    assert chain.ledger.retirement_of(org) is None
    receipt = org_ledgers[0].retire(7.9)
    events = chain.ledger.contract.events.OrganisationRetired().process_receipt(receipt)
    assert [dict(e["args"]) for e in events] == [
        {"org": org, "sinceRound": round_id, "epsilon": to_fixed_point(7.9)}
    ]
    assert chain.ledger.retirement_of(org) == RetirementRecord(since_round=round_id, epsilon=7.9)
    # What it committed before it retired stands.
    assert chain.ledger.commitment_of(round_id, org) is not None
    expect_revert(lambda: org_ledgers[0].retire(8.0), "AlreadyRetired", org, round_id)
    expect_revert(
        lambda: outsider_ledger.retire(1.0), "OrganisationNotRegistered", chain.outsider.address
    )
    advance_past(deadline)
    coordinator_ledger.finalize_round(round_id, b"\x22" * 32, [], [], [])
    next_round, _ = open_round()
    for commit in (
        lambda: org_ledgers[0].commit_update(next_round, b"\xb0" * 32, 120),
        lambda: org_ledgers[0].commit_update(next_round, b"\xb0" * 32, 120, epsilon=8.0),
    ):
        expect_revert(commit, "AlreadyRetired", org, round_id)
    org_ledgers[1].retire()  # a task without DP: retired, no epsilon
    assert chain.ledger.retirement_of(chain.orgs[1].address) == RetirementRecord(next_round, None)

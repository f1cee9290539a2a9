"""extendRound: the coordinator gives a round short of its quorum more time to commit, but
only while its commit phase is still on (after the deadline uploads may have been seen)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eth_account.signers.local import LocalAccount

from fedledger.incentive.ledger import LedgerClient


def test_extension_before_the_deadline_lets_late_commitments_in(
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: Callable[..., tuple[int, int]],
    set_next_block_time: Callable[[int], None],
    expect_revert: Callable[..., Any],
) -> None:
    round_id, deadline = open_round()
    receipt = coordinator_ledger.extend_round(round_id, deadline + 100)
    event = coordinator_ledger.contract.events.RoundExtended().process_receipt(receipt)[0]["args"]
    assert (event["roundId"], event["previousDeadline"], event["deadline"]) == (
        round_id, deadline, deadline + 100,
    )  # fmt: skip
    assert coordinator_ledger.get_round(round_id).deadline == deadline + 100
    set_next_block_time(deadline + 10)  # past the first deadline, inside the extension
    org_ledgers[0].commit_update(round_id, b"\x22" * 32, 5)
    assert org_ledgers[0].account is not None
    assert coordinator_ledger.commitment_of(round_id, org_ledgers[0].account.address) is not None
    set_next_block_time(deadline + 101)
    expect_revert(
        lambda: org_ledgers[1].commit_update(round_id, b"\x23" * 32, 5),
        "CommitmentDeadlinePassed", round_id, deadline + 100, deadline + 101,
    )  # fmt: skip


def test_extension_reverts(
    chain: Any,
    coordinator_ledger: LedgerClient,
    outsider_ledger: LedgerClient,
    outsider: LocalAccount,
    open_round: Callable[..., tuple[int, int]],
    set_next_block_time: Callable[[int], None],
    expect_revert: Callable[..., Any],
) -> None:
    expect_revert(lambda: coordinator_ledger.extend_round(1, 2**40), "RoundNotOpen", 1, 0)
    round_id, deadline = open_round()
    expect_revert(
        lambda: coordinator_ledger.extend_round(round_id, deadline),
        "DeadlineNotLater",
        deadline,
        deadline,
    )
    role = coordinator_ledger.contract.functions.COORDINATOR_ROLE().call()
    expect_revert(
        lambda: outsider_ledger.extend_round(round_id, deadline + 50),
        "AccessControlUnauthorizedAccount", outsider.address, role,
    )  # fmt: skip
    # Past the deadline the commit phase is over for good, even with the round still open:
    # a coordinator holding uploads cannot let a member commit with what it was shown.
    set_next_block_time(deadline + 500)
    expect_revert(
        lambda: coordinator_ledger.extend_round(round_id, deadline + 1000),
        "CommitmentDeadlinePassed", round_id, deadline, deadline + 500,
    )  # fmt: skip
    coordinator_ledger.finalize_round(round_id, b"\x33" * 32, [], [], [])
    expect_revert(
        lambda: coordinator_ledger.extend_round(round_id, deadline + 1000),
        "RoundNotOpen",
        round_id,
        2,
    )

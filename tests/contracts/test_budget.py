"""The per-round budget on the ledger: the admin sets the most a round may pay, and neither way
of settling (direct or by Merkle root) can pay more, whatever the coordinator sends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.service import RoundService
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree
from fedledger.incentive.onchain import DEFAULT_ROUND_BUDGET, RoundState

if TYPE_CHECKING:
    from tests.contracts.conftest import Chain

NEW_MODEL = b"\x22" * 32
ADMIN_ROLE = b"\x00" * 32
OpenRound = Callable[..., tuple[int, int]]
ExpectRevert = Callable[..., object]


def committed(chain: Chain, open_round: OpenRound) -> int:
    round_id, _ = open_round()
    for i, org in enumerate(chain.orgs):
        chain.as_(org).commit_update(round_id, bytes([0xA0 + i]) * 32, 10)
    return round_id


def test_the_deployment_sets_the_default_budget_and_only_the_admin_changes_it(
    chain: Chain, admin_ledger: LedgerClient, outsider_ledger: LedgerClient,
    coordinator_ledger: LedgerClient, expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    assert chain.ledger.round_budget() == DEFAULT_ROUND_BUDGET
    receipt = admin_ledger.set_round_budget(5 * 10**18)
    events = chain.ledger.contract.events.RoundBudgetSet().process_receipt(receipt)
    assert [dict(e["args"]) for e in events] == [
        {"previousBudget": DEFAULT_ROUND_BUDGET, "budget": 5 * 10**18}
    ]
    assert chain.ledger.round_budget() == 5 * 10**18
    for client, account in (
        (outsider_ledger, chain.outsider),
        (coordinator_ledger, chain.coordinator),
    ):
        expect_revert(
            lambda c=client: c.set_round_budget(10**30),
            "AccessControlUnauthorizedAccount",
            account.address,
            ADMIN_ROLE,
        )


def test_a_direct_settlement_above_the_budget_reverts_and_one_at_it_pays(
    chain: Chain, admin_ledger: LedgerClient, coordinator_ledger: LedgerClient,
    open_round: OpenRound, expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    admin_ledger.set_round_budget(3000)
    round_id = committed(chain, open_round)
    orgs = [o.address for o in chain.orgs]
    over = [1000, 1000, 1001][: len(orgs)] + [0] * (len(orgs) - 3)
    expect_revert(
        lambda: coordinator_ledger.finalize_round(round_id, NEW_MODEL, orgs, [1] * len(orgs), over),
        "RoundBudgetExceeded",
        round_id,
        sum(over),
        3000,
    )
    exact = [1000, 1000, 1000][: len(orgs)] + [0] * (len(orgs) - 3)
    coordinator_ledger.finalize_round(round_id, NEW_MODEL, orgs, [1] * len(orgs), exact)
    assert chain.ledger.get_round(round_id).state == RoundState.FINALIZED
    assert chain.ledger.total_supply() == 3000


def test_a_root_announcing_more_than_the_budget_reverts(
    chain: Chain, admin_ledger: LedgerClient, coordinator_ledger: LedgerClient,
    open_round: OpenRound, expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    admin_ledger.set_round_budget(2500)
    round_id = committed(chain, open_round)
    leaves = [SettlementLeaf(round_id, o.address, 1, 1000, 0) for o in chain.orgs]
    tree = SettlementTree.build(leaves)
    assert tree.total_reward > 2500
    expect_revert(
        lambda: coordinator_ledger.finalize_round_with_root(
            round_id, NEW_MODEL, tree.root, tree.total_reward, len(leaves)
        ),
        "RoundBudgetExceeded",
        round_id,
        tree.total_reward,
        2500,
    )


def test_with_no_budget_nothing_can_be_paid_but_a_round_can_still_close(
    chain: Chain, admin_ledger: LedgerClient, coordinator_ledger: LedgerClient,
    open_round: OpenRound, expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    admin_ledger.set_round_budget(0)
    round_id = committed(chain, open_round)
    orgs = [o.address for o in chain.orgs]
    expect_revert(
        lambda: coordinator_ledger.finalize_round(
            round_id, NEW_MODEL, orgs, [0] * len(orgs), [1] + [0] * (len(orgs) - 1)
        ),
        "RoundBudgetExceeded",
        round_id,
        1,
        0,
    )
    coordinator_ledger.finalize_round(round_id, NEW_MODEL, orgs, [0] * len(orgs), [0] * len(orgs))
    assert chain.ledger.get_round(round_id).state == RoundState.FINALIZED


def test_the_coordinator_refuses_to_start_with_a_reward_above_the_budget(
    chain: Chain, admin_ledger: LedgerClient, tmp_path: Path
) -> None:
    admin_ledger.set_round_budget(10**18)
    settings = CoordinatorSettings(
        data_dir=tmp_path / "coordinator", pricing=PricingPolicy(reward_per_round=2 * 10**18)
    )
    service = RoundService(settings, chain.as_(chain.coordinator))
    with pytest.raises(CoordinatorError) as refused:
        service.start(background=False)
    assert refused.value.code is ErrorCode.OVER_BUDGET
    assert refused.value.details == {"reward_per_round": 2 * 10**18, "round_budget": 10**18}
    assert not (tmp_path / "coordinator").exists()  # refused before touching the data dir

"""FedLedger and RewardToken on the in-process EVM: happy paths, events, views and every revert."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3

from evm import ONE, ExpectRevert, OpenRound, close_commits, events
from fedledger.errors import ContractRevert
from fedledger.incentive.chain import send_transaction
from fedledger.incentive.ledger import CommitmentRecord, LedgerClient, RoundRecord
from fedledger.incentive.onchain import RoundState

if TYPE_CHECKING:
    from tests.contracts.conftest import Chain

ZERO = b"\x00" * 32
MODEL = b"\x11" * 32
NEW_MODEL = b"\x22" * 32
UPDATE_A = b"\xa1" * 32
UPDATE_B = b"\xb2" * 32
UPDATE_C = b"\xc3" * 32
DEFAULT_ADMIN_ROLE = ZERO
COORDINATOR_ROLE = bytes(Web3.keccak(text="COORDINATOR_ROLE"))
INT96_MIN = -(2**95)  # the range of a stored score
INT96_MAX = 2**95 - 1
REWARD_MAX = 2**88 - 1  # the most one organisation is paid for one round


def commit_all(org_ledgers: tuple[LedgerClient, ...], round_id: int) -> list[tuple[bytes, int]]:
    """Every organisation commits; returns ``(update hash, samples)`` per organisation."""
    made = [(UPDATE_A, 100), (UPDATE_B, 250), (UPDATE_C, 7)]
    for client, (update_hash, samples) in zip(org_ledgers, made, strict=True):
        client.commit_update(round_id, update_hash, samples)
    return made


# ------------------------------------------------------------------ deployment and views


def test_fresh_ledger_has_no_rounds_and_three_organisations(
    chain: Chain, ledger: LedgerClient
) -> None:
    assert ledger.round_count() == 0
    assert ledger.get_round(1) == RoundRecord(1, ZERO, ZERO, 0, RoundState.NONE, 0, 0)
    assert ledger.organisations() == [org.address for org in chain.orgs]
    assert all(ledger.is_organisation(org.address) for org in chain.orgs)
    for account in (chain.outsider, chain.admin, chain.coordinator):
        assert not ledger.is_organisation(account.address)
    assert ledger.has_coordinator_role(chain.coordinator.address)
    assert not ledger.has_coordinator_role(chain.admin.address)
    assert ledger.contract.functions.hasRole(DEFAULT_ADMIN_ROLE, chain.admin.address).call()
    assert ledger.total_supply() == 0
    assert ledger.commitment_of(1, chain.orgs[0].address) is None
    assert ledger.reward_of(1, chain.orgs[0].address) == 0
    assert not ledger.is_settled(1, chain.orgs[0].address)


def test_ledger_deploys_and_owns_its_token(chain: Chain, ledger: LedgerClient) -> None:
    assert ledger.token_address == chain.deployment.token
    assert ledger.token.functions.owner().call() == ledger.address
    assert ledger.token.functions.name().call() == "fedledger Reward"
    assert ledger.token.functions.symbol().call() == "FLR"
    assert ledger.token.functions.decimals().call() == 18


def test_deploy_with_zero_coordinator_reverts(chain: Chain) -> None:
    zero_address = "0x" + "00" * 20
    with pytest.raises(ContractRevert) as info:
        LedgerClient.deploy(chain.w3, chain.admin, zero_address)
    assert info.value.error == "ZeroAddress"


# ------------------------------------------------------------------ registerOrganisation


def test_admin_registers_an_organisation(
    chain: Chain, admin_ledger: LedgerClient, ledger: LedgerClient
) -> None:
    receipt = admin_ledger.register_organisation(chain.outsider.address)
    assert events(ledger.contract, "OrganisationRegistered", receipt) == [
        {"org": chain.outsider.address}
    ]
    assert ledger.is_organisation(chain.outsider.address)
    assert ledger.organisations() == [*(o.address for o in chain.orgs), chain.outsider.address]


@pytest.mark.parametrize("caller", ["coordinator", "organisation", "outsider"])
def test_only_admin_registers_organisations(
    chain: Chain, expect_revert: ExpectRevert, caller: str
) -> None:
    account = {
        "coordinator": chain.coordinator,
        "organisation": chain.orgs[0],
        "outsider": chain.outsider,
    }[caller]
    expect_revert(
        lambda: chain.as_(account).register_organisation(chain.outsider.address),
        "AccessControlUnauthorizedAccount",
        account.address,
        DEFAULT_ADMIN_ROLE,
    )


def test_registering_twice_reverts(
    chain: Chain, admin_ledger: LedgerClient, expect_revert: ExpectRevert
) -> None:
    org = chain.orgs[1].address
    expect_revert(
        lambda: admin_ledger.register_organisation(org), "OrganisationAlreadyRegistered", org
    )


def test_registering_the_zero_address_reverts(
    admin_ledger: LedgerClient, expect_revert: ExpectRevert
) -> None:
    expect_revert(lambda: admin_ledger.register_organisation("0x" + "00" * 20), "ZeroAddress")


# ------------------------------------------------------------------ openRound


def test_coordinator_opens_a_round(
    chain: Chain, coordinator_ledger: LedgerClient, ledger: LedgerClient
) -> None:
    deadline = chain.now() + 600
    receipt = coordinator_ledger.open_round(1, MODEL, deadline)
    assert events(ledger.contract, "RoundOpened", receipt) == [
        {"roundId": 1, "modelHash": MODEL, "deadline": deadline}
    ]
    assert ledger.round_count() == 1
    assert ledger.get_round(1) == RoundRecord(1, MODEL, ZERO, deadline, RoundState.OPEN, 0, 0)
    assert ledger.get_round(2).state is RoundState.NONE


@pytest.mark.parametrize("caller", ["admin", "organisation", "outsider"])
def test_only_the_coordinator_opens_rounds(
    chain: Chain, expect_revert: ExpectRevert, caller: str
) -> None:
    account = {"admin": chain.admin, "organisation": chain.orgs[0], "outsider": chain.outsider}[
        caller
    ]
    deadline = chain.now() + 600
    expect_revert(
        lambda: chain.as_(account).open_round(1, MODEL, deadline),
        "AccessControlUnauthorizedAccount",
        account.address,
        COORDINATOR_ROLE,
    )


@pytest.mark.parametrize("round_id", [0, 2, 7])
def test_first_round_must_be_one(
    chain: Chain, coordinator_ledger: LedgerClient, expect_revert: ExpectRevert, round_id: int
) -> None:
    deadline = chain.now() + 600
    expect_revert(
        lambda: coordinator_ledger.open_round(round_id, MODEL, deadline),
        "RoundOutOfOrder",
        1,
        round_id,
    )


def test_a_finalized_round_cannot_be_reopened_or_skipped(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    open_round: OpenRound,
    expect_revert: ExpectRevert,
) -> None:
    open_round()
    close_commits(coordinator_ledger, 1)
    coordinator_ledger.finalize_round(1, NEW_MODEL, [], [], [])
    deadline = chain.now() + 600
    expect_revert(
        lambda: coordinator_ledger.open_round(1, MODEL, deadline), "RoundOutOfOrder", 2, 1
    )
    expect_revert(
        lambda: coordinator_ledger.open_round(3, MODEL, deadline), "RoundOutOfOrder", 2, 3
    )
    coordinator_ledger.open_round(2, NEW_MODEL, deadline)
    assert coordinator_ledger.get_round(2).model_hash == NEW_MODEL


def test_opening_while_the_previous_round_is_open_reverts(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    open_round: OpenRound,
    expect_revert: ExpectRevert,
) -> None:
    open_round()
    deadline = chain.now() + 600
    expect_revert(lambda: coordinator_ledger.open_round(2, MODEL, deadline), "PreviousRoundOpen", 1)


def test_opening_with_a_zero_model_hash_reverts(
    chain: Chain, coordinator_ledger: LedgerClient, expect_revert: ExpectRevert
) -> None:
    deadline = chain.now() + 600
    expect_revert(lambda: coordinator_ledger.open_round(1, ZERO, deadline), "ZeroHash")


def test_deadline_equal_to_block_time_is_in_the_past(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    set_next_block_time: Callable[[int], None],
    expect_revert: ExpectRevert,
) -> None:
    now = chain.now() + 50
    set_next_block_time(now)
    expect_revert(lambda: coordinator_ledger.open_round(1, MODEL, now), "DeadlineInPast", now, now)
    expect_revert(
        lambda: coordinator_ledger.open_round(1, MODEL, now - 10), "DeadlineInPast", now - 10, now
    )
    coordinator_ledger.open_round(1, MODEL, now + 1)  # one second ahead is enough
    assert coordinator_ledger.get_round(1).deadline == now + 1


# ------------------------------------------------------------------ commitUpdate


def test_organisation_commits_an_update(
    chain: Chain,
    ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
) -> None:
    round_id, _ = open_round()
    receipt = org_ledgers[0].commit_update(round_id, UPDATE_A, 1234)
    assert events(ledger.contract, "UpdateCommitted", receipt) == [
        {"roundId": 1, "org": chain.orgs[0].address, "updateHash": UPDATE_A, "numSamples": 1234}
    ]
    assert ledger.commitment_of(1, chain.orgs[0].address) == CommitmentRecord(UPDATE_A, 1234)
    assert list(ledger.contract.functions.commitmentOf(1, chain.orgs[1].address).call()) == [
        ZERO,
        0,
    ]
    assert ledger.commitment_of(1, chain.orgs[1].address) is None
    assert ledger.get_round(1).commit_count == 1
    # The node's one read before it trains: the round's record and its own commitment.
    for org, commitment in ((0, CommitmentRecord(UPDATE_A, 1234)), (1, None)):
        assert ledger.round_and_commitment(1, chain.orgs[org].address) == (
            ledger.get_round(1),
            commitment,
        )
    # The coordinator's read of every member's commitment at once.
    members = [chain.orgs[0].address, chain.orgs[1].address]
    assert ledger.commitments_of(1, members) == {
        members[0]: CommitmentRecord(UPDATE_A, 1234),
        members[1]: None,
    }

    org_ledgers[1].commit_update(round_id, UPDATE_B, 1)
    assert ledger.get_round(1).commit_count == 2
    assert ledger.commitment_of(1, chain.orgs[1].address) == CommitmentRecord(UPDATE_B, 1)
    assert ledger.commit_order(1) == [chain.orgs[0].address, chain.orgs[1].address]
    assert ledger.commit_order(2) == []


def test_commit_order_is_the_order_of_commits(
    chain: Chain, org_ledgers: tuple[LedgerClient, ...], ledger: LedgerClient, open_round: OpenRound
) -> None:
    round_id, _ = open_round()
    for k in (2, 0, 1):
        org_ledgers[k].commit_update(round_id, bytes([0xA0 + k]) * 32, 5)
    assert ledger.commit_order(round_id) == [chain.orgs[k].address for k in (2, 0, 1)]


def test_commitment_is_per_round(
    chain: Chain,
    ledger: LedgerClient,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
) -> None:
    open_round()
    org_ledgers[0].commit_update(1, UPDATE_A, 10)
    close_commits(coordinator_ledger, 1)
    coordinator_ledger.finalize_round(1, NEW_MODEL, [], [], [])
    open_round(NEW_MODEL)
    assert ledger.commitment_of(2, chain.orgs[0].address) is None
    org_ledgers[0].commit_update(2, UPDATE_A, 11)  # the same hash again is allowed in a new round
    assert ledger.commitment_of(2, chain.orgs[0].address) == CommitmentRecord(UPDATE_A, 11)
    assert ledger.commitment_of(1, chain.orgs[0].address) == CommitmentRecord(UPDATE_A, 10)


@pytest.mark.parametrize("caller", ["outsider", "admin", "coordinator"])
def test_unregistered_account_cannot_commit(
    chain: Chain, open_round: OpenRound, expect_revert: ExpectRevert, caller: str
) -> None:
    account: LocalAccount = {
        "outsider": chain.outsider,
        "admin": chain.admin,
        "coordinator": chain.coordinator,
    }[caller]
    open_round()
    expect_revert(
        lambda: chain.as_(account).commit_update(1, UPDATE_A, 10),
        "OrganisationNotRegistered",
        account.address,
    )


def test_a_commitment_is_final(
    chain: Chain,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
) -> None:
    open_round()
    org_ledgers[0].commit_update(1, UPDATE_A, 10)
    for update_hash in (UPDATE_A, UPDATE_B):
        expect_revert(
            lambda h=update_hash: org_ledgers[0].commit_update(1, h, 99),
            "AlreadyCommitted",
            1,
            chain.orgs[0].address,
            UPDATE_A,
        )


def test_commit_at_the_deadline_is_accepted_and_after_it_reverts(
    w3: Web3,
    chain: Chain,
    ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    set_next_block_time: Callable[[int], None],
    expect_revert: ExpectRevert,
) -> None:
    _, deadline = open_round(duration_s=100)
    set_next_block_time(deadline)
    receipt = org_ledgers[0].commit_update(1, UPDATE_A, 10)
    assert w3.eth.get_block(receipt["blockNumber"])["timestamp"] == deadline

    set_next_block_time(deadline + 1)
    expect_revert(
        lambda: org_ledgers[1].commit_update(1, UPDATE_B, 10),
        "CommitmentDeadlinePassed",
        1,
        deadline,
        deadline + 1,
    )
    assert ledger.get_round(1).commit_count == 1


def test_commit_long_after_the_deadline_reverts(
    w3: Web3,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    advance_past: Callable[[int], int],
    expect_revert: ExpectRevert,
) -> None:
    _, deadline = open_round()
    now = advance_past(deadline + 10_000)
    pending = int(w3.eth.get_block("pending")["timestamp"])  # the block the commit would land in
    assert pending > now > deadline + 10_000
    expect_revert(
        lambda: org_ledgers[2].commit_update(1, UPDATE_C, 3),
        "CommitmentDeadlinePassed",
        1,
        deadline,
        pending,
    )


@pytest.mark.parametrize("round_id", [0, 1, 2])
def test_commit_to_a_round_never_opened_reverts(
    org_ledgers: tuple[LedgerClient, ...], expect_revert: ExpectRevert, round_id: int
) -> None:
    expect_revert(
        lambda: org_ledgers[0].commit_update(round_id, UPDATE_A, 10),
        "RoundNotOpen",
        round_id,
        RoundState.NONE,
    )


def test_commit_to_a_finalized_round_reverts(
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
) -> None:
    open_round()
    close_commits(coordinator_ledger, 1)
    coordinator_ledger.finalize_round(1, NEW_MODEL, [], [], [])
    expect_revert(
        lambda: org_ledgers[0].commit_update(1, UPDATE_A, 10),
        "RoundNotOpen",
        1,
        RoundState.FINALIZED,
    )


def test_commit_with_zero_hash_or_zero_samples_reverts(
    org_ledgers: tuple[LedgerClient, ...], open_round: OpenRound, expect_revert: ExpectRevert
) -> None:
    open_round()
    expect_revert(lambda: org_ledgers[0].commit_update(1, ZERO, 10), "ZeroHash")
    expect_revert(lambda: org_ledgers[0].commit_update(1, UPDATE_A, 0), "ZeroSamples")


# ------------------------------------------------------------------ finalizeRound


def test_finalize_records_scores_and_mints_rewards(
    chain: Chain,
    ledger: LedgerClient,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    advance_past: Callable[[int], int],
) -> None:
    _, deadline = open_round()
    commit_all(org_ledgers, 1)
    advance_past(deadline)  # settling happens after the deadline
    addresses = [org.address for org in chain.orgs]
    scores = [ONE // 2, -(ONE // 4), INT96_MIN]
    rewards = [700 * ONE, 0, 5]

    receipt = coordinator_ledger.finalize_round(1, NEW_MODEL, addresses, scores, rewards)

    assert events(ledger.contract, "ContributionRecorded", receipt) == [
        {"roundId": 1, "org": a, "score": s, "reward": r}
        for a, s, r in zip(addresses, scores, rewards, strict=True)
    ]
    assert events(ledger.contract, "RoundFinalized", receipt) == [
        {"roundId": 1, "newModelHash": NEW_MODEL, "totalReward": 700 * ONE + 5, "organisations": 3}
    ]
    zero_address = "0x" + "00" * 20
    assert events(ledger.token, "Transfer", receipt) == [
        {"from": zero_address, "to": addresses[0], "value": 700 * ONE},
        {"from": zero_address, "to": addresses[2], "value": 5},
    ]
    assert ledger.get_round(1) == RoundRecord(
        1,
        MODEL,
        NEW_MODEL,
        deadline,
        RoundState.FINALIZED,
        3,
        700 * ONE + 5,
        claimed_reward=700 * ONE + 5,
    )
    for address, score, reward in zip(addresses, scores, rewards, strict=True):
        assert ledger.score_of(1, address) == score
        assert ledger.reward_of(1, address) == reward
        assert ledger.is_settled(1, address)
        assert ledger.balance_of(address) == reward
        # A node's one read of a round it took part in: the record, its reward and flags.
        assert ledger.round_and_settlement(1, address) == (
            ledger.get_round(1),
            *ledger.settled_of(1, address),
        )
        assert ledger.round_and_settlement(1, address)[1] == reward
    assert ledger.total_supply() == 700 * ONE + 5
    assert not ledger.is_settled(1, chain.outsider.address)


def test_finalize_may_settle_only_some_committers(
    chain: Chain,
    ledger: LedgerClient,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
) -> None:
    open_round()
    commit_all(org_ledgers, 1)  # every organisation committed: no need to wait for the deadline
    coordinator_ledger.finalize_round(1, NEW_MODEL, [chain.orgs[1].address], [INT96_MAX], [9])
    assert ledger.score_of(1, chain.orgs[1].address) == INT96_MAX
    assert not ledger.is_settled(1, chain.orgs[0].address)
    assert ledger.reward_of(1, chain.orgs[0].address) == 0
    assert ledger.total_supply() == 9


def test_finalize_with_empty_arrays_pays_nothing(
    chain: Chain,
    ledger: LedgerClient,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
) -> None:
    _, deadline = open_round()
    commit_all(org_ledgers, 1)
    receipt = coordinator_ledger.finalize_round(1, NEW_MODEL, [], [], [])
    assert events(ledger.contract, "ContributionRecorded", receipt) == []
    assert events(ledger.token, "Transfer", receipt) == []
    assert events(ledger.contract, "RoundFinalized", receipt) == [
        {"roundId": 1, "newModelHash": NEW_MODEL, "totalReward": 0, "organisations": 0}
    ]
    assert ledger.get_round(1) == RoundRecord(
        1, MODEL, NEW_MODEL, deadline, RoundState.FINALIZED, 3, 0
    )
    assert ledger.total_supply() == 0
    for org in chain.orgs:
        assert not ledger.is_settled(1, org.address)
        assert ledger.balance_of(org.address) == 0


@pytest.mark.parametrize("caller", ["admin", "organisation", "outsider"])
def test_only_the_coordinator_finalizes(
    chain: Chain,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
    caller: str,
) -> None:
    account = {"admin": chain.admin, "organisation": chain.orgs[0], "outsider": chain.outsider}[
        caller
    ]
    open_round()
    org_ledgers[0].commit_update(1, UPDATE_A, 10)
    expect_revert(
        lambda: chain.as_(account).finalize_round(
            1, NEW_MODEL, [chain.orgs[0].address], [ONE], [ONE]
        ),
        "AccessControlUnauthorizedAccount",
        account.address,
        COORDINATOR_ROLE,
    )


def test_finalizing_twice_reverts(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
) -> None:
    open_round()
    org_ledgers[0].commit_update(1, UPDATE_A, 10)
    org = chain.orgs[0].address
    close_commits(coordinator_ledger, 1)
    coordinator_ledger.finalize_round(1, NEW_MODEL, [org], [ONE], [ONE])
    expect_revert(
        lambda: coordinator_ledger.finalize_round(1, NEW_MODEL, [org], [ONE], [ONE]),
        "RoundNotOpen",
        1,
        RoundState.FINALIZED,
    )
    expect_revert(
        lambda: coordinator_ledger.finalize_round(1, MODEL, [], [], []),
        "RoundNotOpen",
        1,
        2,
    )


def test_finalizing_a_round_never_opened_reverts(
    coordinator_ledger: LedgerClient, expect_revert: ExpectRevert
) -> None:
    expect_revert(
        lambda: coordinator_ledger.finalize_round(1, NEW_MODEL, [], [], []),
        "RoundNotOpen",
        1,
        RoundState.NONE,
    )


@pytest.mark.parametrize(
    ("num_orgs", "num_scores", "num_rewards", "num_flags"),
    [(2, 1, 2, 2), (2, 2, 1, 2), (1, 2, 2, 2), (0, 0, 1, 0), (2, 2, 2, 1), (0, 0, 0, 1)],
)
def test_mismatched_settlement_arrays_revert(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
    num_orgs: int,
    num_scores: int,
    num_rewards: int,
    num_flags: int,
) -> None:
    open_round()
    commit_all(org_ledgers, 1)
    addresses = [org.address for org in chain.orgs][:num_orgs]
    expect_revert(
        lambda: coordinator_ledger.finalize_round(
            1,
            NEW_MODEL,
            addresses,
            [ONE] * num_scores,
            [ONE] * num_rewards,
            flags=[0] * num_flags,
        ),
        "LengthMismatch",
        num_orgs,
        num_scores,
        num_rewards,
        num_flags,
    )


def test_finalize_with_zero_model_hash_reverts(
    coordinator_ledger: LedgerClient, open_round: OpenRound, expect_revert: ExpectRevert
) -> None:
    open_round()
    close_commits(coordinator_ledger, 1)
    expect_revert(lambda: coordinator_ledger.finalize_round(1, ZERO, [], [], []), "ZeroHash")


@pytest.mark.parametrize("who", ["registered_silent", "outsider"])
def test_settling_an_organisation_that_did_not_commit_reverts(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
    who: str,
) -> None:
    open_round()
    org_ledgers[0].commit_update(1, UPDATE_A, 10)
    silent = chain.orgs[2].address if who == "registered_silent" else chain.outsider.address
    committed = chain.orgs[0].address
    close_commits(coordinator_ledger, 1)
    expect_revert(
        lambda: coordinator_ledger.finalize_round(
            1, NEW_MODEL, [committed, silent], [ONE, ONE], [ONE, ONE]
        ),
        "NotCommitted",
        1,
        silent,
    )


def test_commitment_in_an_earlier_round_does_not_count(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
) -> None:
    open_round()
    org_ledgers[0].commit_update(1, UPDATE_A, 10)
    close_commits(coordinator_ledger, 1)
    coordinator_ledger.finalize_round(1, NEW_MODEL, [], [], [])
    open_round(NEW_MODEL)
    close_commits(coordinator_ledger, 2)
    org = chain.orgs[0].address
    expect_revert(
        lambda: coordinator_ledger.finalize_round(2, MODEL, [org], [ONE], [ONE]),
        "NotCommitted",
        2,
        org,
    )


def test_duplicate_organisation_in_a_settlement_reverts(
    chain: Chain,
    coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...],
    open_round: OpenRound,
    expect_revert: ExpectRevert,
) -> None:
    open_round()
    commit_all(org_ledgers, 1)
    a, b = chain.orgs[0].address, chain.orgs[1].address
    expect_revert(
        lambda: coordinator_ledger.finalize_round(
            1, NEW_MODEL, [a, b, a], [ONE, ONE, -ONE], [1, 2, 3]
        ),
        "DuplicateSettlement",
        1,
        a,
    )


# ------------------------------------------------------------------ token


@pytest.mark.parametrize("caller", ["coordinator", "admin", "organisation"])
def test_only_the_ledger_mints(
    chain: Chain, ledger: LedgerClient, expect_revert: ExpectRevert, caller: str
) -> None:
    account = {
        "coordinator": chain.coordinator,
        "admin": chain.admin,
        "organisation": chain.orgs[0],
    }[caller]
    mint = ledger.token.functions.mint(account.address, 10**6)
    expect_revert(
        lambda: send_transaction(chain.w3, account, mint, ledger.selectors),
        "OwnableUnauthorizedAccount",
        account.address,
    )


# ------------------------------------------------------------------ supply over rounds


def _play_rounds(chain: Chain, rounds: list[list[tuple[bool, bool, int, int]]]) -> int:
    """Play ``rounds`` of (commits, settled, score, reward) per organisation; return the total paid."""
    coordinator = chain.as_(chain.coordinator)
    paid = 0
    for round_id, plan in enumerate(rounds, start=1):
        deadline = chain.now() + 600
        coordinator.open_round(round_id, MODEL, deadline)
        settled: list[tuple[str, int, int]] = []
        for org, (commits, settles, score, reward) in zip(chain.orgs, plan, strict=False):
            if commits:
                chain.as_(org).commit_update(round_id, UPDATE_A, 1 + round_id)
                if settles:
                    settled.append((org.address, score, reward))
        close_commits(coordinator, round_id)
        coordinator.finalize_round(
            round_id,
            NEW_MODEL,
            [a for a, _, _ in settled],
            [s for _, s, _ in settled],
            [r for _, _, r in settled],
        )
        paid += sum(r for _, _, r in settled)
        assert chain.ledger.get_round(round_id).total_reward == sum(r for _, _, r in settled)
    return paid


def test_total_supply_is_the_sum_of_rewards_over_rounds(chain: Chain, ledger: LedgerClient) -> None:
    rounds = [
        [(True, True, ONE, 30), (True, True, -ONE, 0), (True, True, 0, 12)],
        [(True, False, 0, 0), (False, False, 0, 0), (True, True, ONE // 3, 2 * ONE)],
        [(True, True, 5, 1), (True, True, 7, 1), (True, True, 9, 1)],
    ]
    paid = _play_rounds(chain, rounds)
    assert ledger.round_count() == 3
    assert ledger.total_supply() == paid == 30 + 12 + 2 * ONE + 3
    per_org = [sum(ledger.reward_of(r, org.address) for r in (1, 2, 3)) for org in chain.orgs]
    assert per_org == [ledger.balance_of(org.address) for org in chain.orgs]
    assert per_org == [31, 1, 12 + 2 * ONE + 1]


settlement = st.tuples(
    st.booleans(),
    st.booleans(),
    st.integers(min_value=INT96_MIN, max_value=INT96_MAX),
    st.integers(min_value=0, max_value=REWARD_MAX),
)


@pytest.mark.slow
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rounds=st.lists(st.lists(settlement, min_size=3, max_size=3), min_size=1, max_size=3))
def test_total_supply_equals_rewards_paid_property(
    make_chain: Callable[[], Chain], rounds: list[list[tuple[bool, bool, int, int]]]
) -> None:
    chain = make_chain()
    chain.as_(chain.admin).set_round_budget(
        2**256 - 1
    )  # rewards up to 3 * 2**88 a round; see test_budget
    paid = _play_rounds(chain, rounds)
    ledger = chain.ledger
    assert ledger.total_supply() == paid
    assert sum(ledger.balance_of(org.address) for org in chain.orgs) == paid
    assert sum(ledger.get_round(r).total_reward for r in range(1, len(rounds) + 1)) == paid

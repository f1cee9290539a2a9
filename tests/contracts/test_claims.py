"""Settlement by Merkle claims (finalizeRoundWithRoot, claimReward) and recorded valuations.

The Python tree (``fedledger.incentive.merkle``) must produce roots and proofs that
OpenZeppelin's ``MerkleProof`` accepts on-chain; a claim pays once, only its own leaf, and
never more than the root's announced total.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from eth_account import Account
from hypothesis import given
from hypothesis import strategies as st

from evm import ONE, ExpectRevert, OpenRound, close_commits, events
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree, verify
from fedledger.incentive.onchain import NO_VALUATION, RoundState, ValuationRecord

if TYPE_CHECKING:
    from tests.contracts.conftest import Chain

NEW_MODEL = b"\x22" * 32
VALUATION = ValuationRecord("exact:accuracy", seed=7, validation_hash=b"\x5a" * 32)
PHANTOMS = [Account.create(f"phantom {i}").address for i in range(8)]  # never on-chain


def leaves_for(round_id: int, orgs: list[str]) -> list[SettlementLeaf]:
    """A settlement with distinct scores, rewards and flags per organisation."""
    return [
        SettlementLeaf(round_id, org, (i - 1) * ONE // 3, (i + 1) * 1000, 4 if i == 2 else 0)
        for i, org in enumerate(orgs)
    ]


def commit(chain: Chain, round_id: int, count: int | None = None) -> None:
    for i, org in enumerate(chain.orgs[:count]):
        chain.as_(org).commit_update(round_id, bytes([0xA0 + i]) * 32, 10 * (i + 1))


def post_root(
    coordinator_ledger: LedgerClient, round_id: int, tree: SettlementTree, **kwargs: object
) -> object:
    flagged = {leaf.organisation: leaf.flags for leaf in tree.leaves if leaf.flags}
    return coordinator_ledger.finalize_round_with_root(
        round_id,
        NEW_MODEL,
        tree.root,
        kwargs.pop("total", tree.total_reward),  # type: ignore[arg-type]
        len(tree.leaves),
        flagged=flagged,
        valuation=VALUATION,
    )


def committed_round(chain: Chain, open_round: OpenRound) -> tuple[int, SettlementTree]:
    """Open a round in which every organisation commits; their settlement tree, not posted."""
    round_id, _ = open_round()
    commit(chain, round_id)
    return round_id, SettlementTree.build(leaves_for(round_id, [o.address for o in chain.orgs]))


@pytest.fixture
def claimable(
    chain: Chain, open_round: OpenRound, coordinator_ledger: LedgerClient
) -> Callable[..., tuple[int, SettlementTree]]:
    """Open a round, let every organisation commit and post the root of their settlement."""

    def make(total: int | None = None) -> tuple[int, SettlementTree]:
        round_id, tree = committed_round(chain, open_round)
        extra = {} if total is None else {"total": total}
        post_root(coordinator_ledger, round_id, tree, **extra)
        return round_id, tree

    return make


def claim(chain: Chain, org_index: int, round_id: int, tree: SettlementTree) -> object:
    org = chain.orgs[org_index]
    leaf = tree.leaf_of(org.address)
    return chain.as_(org).claim_reward(
        round_id, leaf.score, leaf.reward, leaf.flags, tree.proof(org.address)
    )


# ------------------------------------------------------------------ the tree itself


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=2**64))
def test_every_leaf_proves_against_the_root_and_no_other_leaf_does(
    size: int, round_id: int
) -> None:
    tree = SettlementTree.build(leaves_for(round_id, PHANTOMS[:size]))
    for leaf in tree.leaves:
        proof = tree.proof(leaf.organisation)
        assert verify(proof, tree.root, leaf)
        assert not verify(
            proof, tree.root, SettlementLeaf(**{**vars(leaf), "reward": leaf.reward + 1})
        )
        assert not verify(
            proof, tree.root, SettlementLeaf(**{**vars(leaf), "round_id": round_id + 1})
        )
    assert tree.total_reward == sum(leaf.reward for leaf in tree.leaves)


def test_tree_is_independent_of_leaf_order_and_refuses_duplicates() -> None:
    leaves = leaves_for(1, PHANTOMS[:5])
    assert SettlementTree.build(leaves).root == SettlementTree.build(leaves[::-1]).root
    with pytest.raises(ValueError, match="appears twice"):
        SettlementTree.build([*leaves, leaves[0]])
    with pytest.raises(ValueError, match="at least one leaf"):
        SettlementTree.build([])
    with pytest.raises(KeyError):
        SettlementTree.build(leaves).proof(PHANTOMS[7])


# ------------------------------------------------------------------ claims on-chain


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8])
def test_python_proofs_verify_with_openzeppelin_at_every_tree_shape(
    chain: Chain, open_round: OpenRound, coordinator_ledger: LedgerClient, size: int
) -> None:
    """Trees of 1 to 8 leaves (the three organisations plus leaves of other addresses)."""
    round_id, _ = open_round()
    commit(chain, round_id)
    real = [o.address for o in chain.orgs][: min(size, 3)]
    tree = SettlementTree.build(leaves_for(round_id, [*real, *PHANTOMS[: size - len(real)]]))
    post_root(coordinator_ledger, round_id, tree)

    ledger = chain.ledger
    for i, org in enumerate(real):
        leaf = tree.leaf_of(org)
        receipt = claim(chain, i, round_id, tree)
        assert events(ledger.contract, "RewardClaimed", receipt) == [
            {"roundId": round_id, "org": org, "reward": leaf.reward}
        ]
        assert events(ledger.contract, "ContributionRecorded", receipt) == [
            {"roundId": round_id, "org": org, "score": leaf.score, "reward": leaf.reward}
        ]
        assert ledger.balance_of(org) == leaf.reward
        assert ledger.score_of(round_id, org) == leaf.score
        assert ledger.reward_of(round_id, org) == leaf.reward
        assert ledger.flags_of(round_id, org) == leaf.flags
        assert ledger.is_settled(round_id, org)
    record = ledger.get_round(round_id)
    assert record.claimed_reward == sum(tree.leaf_of(o).reward for o in real)
    assert ledger.total_supply() == record.claimed_reward


def test_posting_a_root_records_everything_but_pays_nobody(
    chain: Chain, open_round: OpenRound, coordinator_ledger: LedgerClient
) -> None:
    round_id, tree = committed_round(chain, open_round)
    receipt = post_root(coordinator_ledger, round_id, tree)

    ledger = chain.ledger
    flagged = chain.orgs[2].address
    assert events(ledger.contract, "RewardsRootPosted", receipt) == [
        {"roundId": round_id, "root": tree.root}
    ]
    assert events(ledger.contract, "OrganisationFlagged", receipt) == [
        {"roundId": round_id, "org": flagged, "flags": 4}
    ]
    method, seed, validation_hash = VALUATION.as_abi()
    assert events(ledger.contract, "RoundValued", receipt) == [
        {"roundId": round_id, "method": method, "seed": seed, "validationHash": validation_hash}
    ]
    assert events(ledger.contract, "RoundFinalized", receipt) == [
        {
            "roundId": round_id,
            "newModelHash": NEW_MODEL,
            "totalReward": tree.total_reward,
            "organisations": 3,
        }
    ]
    assert events(ledger.contract, "ContributionRecorded", receipt) == []
    record = ledger.get_round(round_id)
    assert record.state == RoundState.FINALIZED
    assert record.by_claims and record.rewards_root == tree.root
    assert (record.total_reward, record.claimed_reward) == (tree.total_reward, 0)
    assert ledger.valuation_of(round_id) == VALUATION
    assert ledger.flags_of(round_id, flagged) == 4
    assert ledger.total_supply() == 0
    assert not any(ledger.is_settled(round_id, o.address) for o in chain.orgs)


def test_a_claim_with_a_wrong_proof_or_a_changed_leaf_reverts(
    chain: Chain, claimable: Callable[..., tuple[int, SettlementTree]], expect_revert: ExpectRevert
) -> None:
    round_id, tree = claimable()
    org = chain.orgs[0]
    leaf = tree.leaf_of(org.address)
    proof = tree.proof(org.address)
    client = chain.as_(org)
    bad = [
        (leaf.score, leaf.reward, leaf.flags, [bytes(32)] * len(proof)),  # wrong siblings
        (leaf.score, leaf.reward, leaf.flags, proof[:-1]),  # truncated
        (leaf.score, leaf.reward + 1, leaf.flags, proof),  # more than its reward
        (leaf.score + ONE, leaf.reward, leaf.flags, proof),  # a better score
        (leaf.score, leaf.reward, 0, tree.proof(chain.orgs[2].address)),  # another's proof
    ]
    for score, reward, flags, wrong in bad:
        expect_revert(
            lambda s=score, r=reward, f=flags, p=wrong: client.claim_reward(round_id, s, r, f, p),
            "InvalidProof",
            round_id,
            org.address,
        )
    claim(chain, 0, round_id, tree)
    assert chain.ledger.balance_of(org.address) == leaf.reward


def test_a_second_claim_reverts_and_pays_nothing(
    chain: Chain, claimable: Callable[..., tuple[int, SettlementTree]], expect_revert: ExpectRevert
) -> None:
    round_id, tree = claimable()
    claim(chain, 1, round_id, tree)
    expect_revert(
        lambda: claim(chain, 1, round_id, tree), "AlreadyClaimed", round_id, chain.orgs[1].address
    )
    assert (
        chain.ledger.balance_of(chain.orgs[1].address) == tree.leaf_of(chain.orgs[1].address).reward
    )


def test_nobody_claims_another_organisations_reward(
    chain: Chain, claimable: Callable[..., tuple[int, SettlementTree]], expect_revert: ExpectRevert
) -> None:
    """The leaf is bound to msg.sender: organisation 0 replaying 1's leaf and proof gets nothing,
    and neither does an outsider that never committed."""
    round_id, tree = claimable()
    victim = chain.orgs[1].address
    leaf = tree.leaf_of(victim)
    args = (round_id, leaf.score, leaf.reward, leaf.flags, tree.proof(victim))
    expect_revert(
        lambda: chain.as_(chain.orgs[0]).claim_reward(*args),
        "InvalidProof",
        round_id,
        chain.orgs[0].address,
    )
    expect_revert(
        lambda: chain.as_(chain.outsider).claim_reward(*args),
        "NotCommitted",
        round_id,
        chain.outsider.address,
    )
    claim(chain, 1, round_id, tree)
    assert chain.ledger.balance_of(victim) == leaf.reward


def test_claims_never_pay_more_than_the_announced_total(
    chain: Chain, claimable: Callable[..., tuple[int, SettlementTree]], expect_revert: ExpectRevert
) -> None:
    """A root whose leaves sum to more than its total (a faulty coordinator) pays until the
    total is reached and not one unit more."""
    leaves = leaves_for(0, [o.address for o in chain.orgs])
    total = leaves[0].reward + leaves[1].reward  # the third claim would exceed it
    round_id, tree = claimable(total=total)
    claim(chain, 0, round_id, tree)
    claim(chain, 1, round_id, tree)
    expect_revert(
        lambda: claim(chain, 2, round_id, tree),
        "ClaimExceedsTotal",
        round_id,
        tree.leaf_of(chain.orgs[2].address).reward,
        0,
    )
    assert chain.ledger.total_supply() == total


def test_only_rounds_settled_by_root_are_claimable(
    chain: Chain,
    open_round: OpenRound,
    coordinator_ledger: LedgerClient,
    expect_revert: ExpectRevert,
) -> None:
    round_id, tree = committed_round(chain, open_round)
    org = chain.orgs[0]
    leaf = tree.leaf_of(org.address)
    args = (round_id, leaf.score, leaf.reward, leaf.flags, tree.proof(org.address))
    expect_revert(lambda: chain.as_(org).claim_reward(*args), "NotClaimable", round_id)  # open
    coordinator_ledger.finalize_round(
        round_id, NEW_MODEL, [org.address], [leaf.score], [leaf.reward], valuation=VALUATION
    )
    expect_revert(lambda: chain.as_(org).claim_reward(*args), "NotClaimable", round_id)  # direct
    assert chain.ledger.balance_of(org.address) == leaf.reward


def test_finalize_with_root_reverts_on_bad_input(
    chain: Chain,
    open_round: OpenRound,
    coordinator_ledger: LedgerClient,
    expect_revert: ExpectRevert,
) -> None:
    round_id, deadline = open_round()
    commit(chain, round_id, count=2)  # organisation 2 does not commit
    absent = chain.orgs[2].address
    root = b"\x77" * 32

    def post(**kw: object) -> Callable[[], object]:
        args: dict[str, object] = {"new_model_hash": NEW_MODEL, "root": root, "flagged": None}
        args.update(kw)
        return lambda: coordinator_ledger.finalize_round_with_root(
            round_id,
            args["new_model_hash"],  # type: ignore[arg-type]
            args["root"],  # type: ignore[arg-type]
            100,
            2,
            flagged=args["flagged"],  # type: ignore[arg-type]
        )

    # before the deadline, with one organisation yet to commit, nobody may have seen an upload
    expect_revert(post(), "CommitPhaseOpen", round_id, deadline, 2, 3)
    close_commits(coordinator_ledger, round_id)
    expect_revert(post(root=bytes(32)), "ZeroHash")
    expect_revert(post(new_model_hash=bytes(32)), "ZeroHash")
    expect_revert(post(flagged={absent: 1}), "NotCommitted", round_id, absent)
    coordinator_role = chain.ledger.contract.functions.COORDINATOR_ROLE().call()
    expect_revert(
        lambda: chain.as_(chain.orgs[0]).finalize_round_with_root(round_id, NEW_MODEL, root, 1, 1),
        "AccessControlUnauthorizedAccount",
        chain.orgs[0].address,
        coordinator_role,
    )
    post()()
    expect_revert(post(), "RoundNotOpen", round_id, RoundState.FINALIZED)
    expect_revert(
        lambda: coordinator_ledger.finalize_round(round_id, NEW_MODEL, [], [], []),
        "RoundNotOpen",
        round_id,
        RoundState.FINALIZED,
    )


# ------------------------------------------------------------------ direct settlement's records


def test_direct_settlement_records_flags_and_valuation(
    chain: Chain, open_round: OpenRound, coordinator_ledger: LedgerClient
) -> None:
    round_id, _ = open_round()
    commit(chain, round_id)
    orgs = [o.address for o in chain.orgs]
    receipt = coordinator_ledger.finalize_round(
        round_id,
        NEW_MODEL,
        orgs,
        [ONE, 0, -ONE],
        [900, 0, 0],
        flags=[0, 2, 8 | 16],
        valuation=VALUATION,
    )
    ledger = chain.ledger
    assert events(ledger.contract, "OrganisationFlagged", receipt) == [
        {"roundId": round_id, "org": orgs[1], "flags": 2},
        {"roundId": round_id, "org": orgs[2], "flags": 24},
    ]
    assert [ledger.flags_of(round_id, o) for o in orgs] == [0, 2, 24]
    assert ledger.valuation_of(round_id) == VALUATION
    record = ledger.get_round(round_id)
    assert not record.by_claims
    assert record.total_reward == record.claimed_reward == 900


def test_a_round_closed_without_scores_records_no_valuation(
    open_round: OpenRound, coordinator_ledger: LedgerClient, ledger: LedgerClient
) -> None:
    round_id, _ = open_round()
    assert ledger.valuation_of(round_id) is None
    close_commits(coordinator_ledger, round_id)
    coordinator_ledger.finalize_round(round_id, NEW_MODEL, [], [], [])
    assert ledger.valuation_of(round_id) == NO_VALUATION


def test_valuation_method_must_fit_bytes32() -> None:
    with pytest.raises(ValueError, match="1 to 32 ASCII"):
        ValuationRecord("x" * 33)
    with pytest.raises(ValueError, match="1 to 32 ASCII"):
        ValuationRecord("")
    assert ValuationRecord.from_abi(VALUATION.as_abi()) == VALUATION

"""Claiming rewards of rounds settled by Merkle root from what the chain says is unclaimed: once
each, never with a ticket the chain would reject, and after a node restarts."""

from __future__ import annotations

from collections.abc import Callable

from fedledger import wire
from fedledger.coordinator.api import create_app
from fedledger.coordinator.policy import PricingPolicy
from fedledger.demo import serve_in_thread
from fedledger.node.claims import Claim, NotClaimed, claim_round, claim_unclaimed, rounds_to_claim
from fedledger.node.client import CoordinatorClient
from fedledger.node.runner import NodeRunner
from harness import Harness, OneEpochDigits

BY_ROOT = PricingPolicy(claims_above=0, min_aggregated=1)
"""Every round settles by one Merkle root, whatever the number of organisations."""


def _round(harness: Harness, round_id: int) -> dict[str, int]:
    """Every organisation uploads a real update to ``round_id``, which closes by root; returns
    each one's reward in it as the coordinator's result says."""
    current = harness.client.get("/v1/rounds/current").json()
    assert (current["round_id"], current["status"]) == (round_id, "open")
    base = harness.model(current["model_hash"])
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k, base), round_id=round_id)
        for k, org in enumerate(harness.orgs)
    ]:
        assert harness.post(upload).status_code == 201  # type: ignore[attr-defined]
    harness.service.step()
    result = harness.member_result(round_id)
    assert (result["status"], result["settlement"]) == ("finalized", "claims")
    return {o["organisation"]: int(o["reward"]) for o in result["organisations"]}


class TamperedTickets(CoordinatorClient):
    """A coordinator that promises one token unit more than the root it posted."""

    def claim_ticket(self, round_id: int, organisation: str) -> wire.ClaimTicket:
        ticket = super().claim_ticket(round_id, organisation)
        return ticket.model_copy(update={"reward": str(int(ticket.reward) + 1)})


def test_claim_unclaimed_claims_each_unclaimed_reward_once(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(total_rounds=2, pricing=BY_ROOT)
    first = _round(harness, 1)
    harness.service.step()  # opens round 2
    second = _round(harness, 2)
    org = harness.orgs[0]
    ledger = harness.org_ledger(org)
    assert first[org.address] > 0 and second[org.address] > 0
    assert rounds_to_claim(ledger, org.address) == [1, 2]
    with serve_in_thread(create_app(harness.service)) as url, CoordinatorClient(url) as client:
        early = claim_round(ledger, client, ledger.get_round(1))  # claimed by hand, earlier
        assert isinstance(early, Claim) and early.reward == first[org.address]
        assert rounds_to_claim(ledger, org.address) == [2]
        made = claim_unclaimed(ledger, client)
        again = claim_unclaimed(ledger, client)
    assert [(c.round_id, c.reward) for c in made if isinstance(c, Claim)] == [
        (2, second[org.address])
    ]
    assert len(made) == 1 and again == []
    assert harness.ledger.balance_of(org.address) == first[org.address] + second[org.address]
    assert harness.ledger.total_reward_of(org.address) == first[org.address] + second[org.address]
    for other in harness.orgs[1:]:  # claiming is each organisation's own: theirs still wait
        assert rounds_to_claim(harness.ledger, other.address) == [1, 2]
        assert harness.ledger.balance_of(other.address) == 0


def test_a_ticket_that_does_not_verify_against_the_root_is_never_sent(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(total_rounds=1, pricing=BY_ROOT)
    _round(harness, 1)
    org = harness.orgs[1]
    ledger = harness.org_ledger(org)
    nonce = ledger.w3.eth.get_transaction_count(org.address)
    with serve_in_thread(create_app(harness.service)) as url, TamperedTickets(url) as client:
        results = claim_unclaimed(ledger, client)
    assert len(results) == 1 and isinstance(results[0], NotClaimed)
    assert (results[0].round_id, results[0].reason, results[0].is_problem) == (
        1,
        "bad_ticket",
        True,
    )
    assert "does not verify against the on-chain root" in results[0].detail
    assert ledger.w3.eth.get_transaction_count(org.address) == nonce  # no transaction at all
    assert not ledger.is_settled(1, org.address)
    assert rounds_to_claim(ledger, org.address) == [1]  # still there for an honest ticket


def test_a_restarted_node_claims_the_rewards_its_last_run_did_not(
    make_harness: Callable[..., Harness],
) -> None:
    """The organisations took part in the round (their node then stopped, its memory of the
    round gone); a fresh node started after training is done claims from the chain alone."""
    harness = make_harness(total_rounds=1, pricing=BY_ROOT)
    rewards = _round(harness, 1)
    assert harness.client.get("/v1/rounds/current").json()["training"] == "done"
    org = harness.orgs[2]
    task = OneEpochDigits()
    with serve_in_thread(create_app(harness.service)) as url:
        runner = NodeRunner(
            CoordinatorClient(url),
            harness.org_ledger(org),
            task,
            task.load_data(f"2/{len(harness.orgs)}"),
            poll_interval_s=0.02,
            clock=lambda: harness.clock[0],
        )
        assert runner.unclaimed == set()
        outcomes = runner.run()
    assert outcomes == []  # nothing trained: there was no round left to take part in
    assert [(c.round_id, c.reward) for c in runner.claims] == [(1, rewards[org.address])]
    assert harness.ledger.is_settled(1, org.address)
    assert harness.ledger.balance_of(org.address) == rewards[org.address]
    assert rounds_to_claim(harness.ledger, org.address) == []

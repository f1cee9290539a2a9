"""The node's round loop against a real coordinator over loopback HTTP, on the in-process chain."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fedledger.coordinator.api import create_app
from fedledger.coordinator.policy import PricingPolicy
from fedledger.demo import serve_in_thread
from fedledger.errors import ErrorCode, ModelVerificationError, TaskError
from fedledger.incentive.commitment import keccak
from fedledger.incentive.onchain import RoundState
from fedledger.node.client import CoordinatorClient
from fedledger.node.runner import NodeRunner, Settled
from fedledger.tasks import BUILTIN_DIGITS, DigitsTask, load_spec
from harness import Harness, OneEpochDigits


def _runner(harness: Harness, url: str, k: int, task: DigitsTask | None = None) -> NodeRunner:
    """Organisation k's node, on its share of the digits split (one local epoch by default)."""
    task = task or OneEpochDigits()
    return NodeRunner(
        CoordinatorClient(url),
        harness.org_ledger(harness.orgs[k]),
        task,
        task.load_data(f"{k}/{len(harness.orgs)}"),
        seed=k,
        poll_interval_s=0.02,
        commit_wait_s=0.5,  # no round driver here announces the end of the commit phase
        clock=lambda: harness.clock[0],
    )


def test_nodes_train_commit_and_upload_every_round(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(total_rounds=2)
    harness.service.start_driver()
    with serve_in_thread(create_app(harness.service)) as url:
        runners = [_runner(harness, url, k) for k in range(len(harness.orgs))]
        outcomes: dict[int, list[object]] = {}
        threads = [
            threading.Thread(target=lambda k=k: outcomes.__setitem__(k, runners[k].run()))
            for k in range(len(runners))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    for k, org in enumerate(harness.orgs):
        assert [o.round_id for o in outcomes[k]] == [1, 2]  # type: ignore[attr-defined]
        for outcome in outcomes[k]:
            committed = harness.ledger.commitment_of(outcome.round_id, org.address)  # type: ignore[attr-defined]
            assert committed is not None
            assert "0x" + committed.update_hash.hex() == outcome.update_hash  # type: ignore[attr-defined]
    assert [harness.ledger.get_round(r).state for r in (1, 2)] == [RoundState.FINALIZED] * 2


def _run_all(harness: Harness, url: str) -> list[NodeRunner]:
    runners = [_runner(harness, url, k) for k in range(len(harness.orgs))]
    threads = [threading.Thread(target=runner.run) for runner in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return runners


def test_nodes_claim_their_rewards_in_rounds_settled_by_root(
    make_harness: Callable[..., Harness],
) -> None:
    """With claims_above=0 every round settles by Merkle root; each node claims its own."""
    harness = make_harness(total_rounds=2, pricing=PricingPolicy(claims_above=0))
    harness.service.start_driver()
    with serve_in_thread(create_app(harness.service)) as url:
        runners = _run_all(harness, url)
        results = [CoordinatorClient(url).round_result(r) for r in (1, 2)]
    for result in results:
        assert result.settlement == "claims"
        record = harness.ledger.get_round(result.round_id)
        assert "0x" + record.rewards_root.hex() == result.rewards_root
        assert record.claimed_reward == record.total_reward  # every leaf claimed, none twice
    for k, org in enumerate(harness.orgs):
        earned = {
            r.round_id: int(o.reward)
            for r in results
            for o in r.organisations
            if o.organisation == org.address
        }
        assert {c.round_id: c.reward for c in runners[k].claims} == earned
        assert set(earned) == {1, 2}
        assert harness.ledger.balance_of(org.address) == sum(earned.values())
        assert all(harness.ledger.is_settled(r, org.address) for r in earned)


def test_node_refuses_a_model_that_differs_from_the_chain(harness: Harness) -> None:
    current = harness.service.current()
    blob = harness.service.store.blob_path(current.model_hash)
    blob.write_bytes(
        blob.read_bytes()[:-4] + b"\0\0\0\0"
    )  # the coordinator serves tampered weights
    with serve_in_thread(create_app(harness.service)) as url:
        runner = _runner(harness, url, 0)
        with pytest.raises(ModelVerificationError, match="refusing to train"):
            runner.take_part(runner.client.current_round())
    assert harness.ledger.commitment_of(current.round_id, harness.orgs[0].address) is None


def _uploads_only_once_every_member_committed(harness: Harness, *, told_early: bool) -> None:
    """Organisation 1 has committed; organisation 0's node takes part (in a thread): once
    committed it waits, uploading nothing, until organisation 2's commitment ends the phase.
    ``told_early``: the coordinator says the phase is over from the start, wrongly."""
    harness.make_upload(harness.orgs[1], seed=1)
    if told_early:
        harness.service.machine.commits_closed.add(1)  # organisation 2 has not committed
    with serve_in_thread(create_app(harness.service)) as url:
        runner = _runner(harness, url, 0)
        assert runner.client.current_round().commits_closed is told_early
        done: list[object] = []
        worker = threading.Thread(
            target=lambda: done.append(runner.take_part(runner.client.current_round()))
        )
        worker.start()
        while harness.ledger.commitment_of(1, harness.orgs[0].address) is None:
            assert worker.is_alive()
            worker.join(timeout=0.05)
        worker.join(timeout=0.5)  # committed; still waiting for organisation 2
        assert worker.is_alive() and not done
        assert harness.service.store.get_update(1, harness.orgs[0].address) is None
        harness.make_upload(harness.orgs[2], seed=2)  # the last commitment ends the phase
        worker.join(timeout=60)
        assert not worker.is_alive()
    assert done and done[0] is not None
    assert harness.service.store.get_update(1, harness.orgs[0].address) is not None


def test_a_node_uploads_only_once_the_commit_phase_is_over(harness: Harness) -> None:
    """Committed, the node waits for the others' commitments before anything leaves it."""
    _uploads_only_once_every_member_committed(harness, told_early=False)


def test_a_node_takes_only_the_chains_word_for_the_end_of_the_commit_phase(
    harness: Harness,
) -> None:
    """A coordinator that says the commit phase is over before it is (one colluding with a
    member yet to commit) gets nothing early: the node confirms on-chain before it uploads."""
    _uploads_only_once_every_member_committed(harness, told_early=True)


def test_restarted_node_reproduces_its_committed_update(harness: Harness) -> None:
    """A node that crashed after committing on-chain uploads the very update it committed."""
    with serve_in_thread(create_app(harness.service)) as url:
        first = _runner(harness, url, 0)
        current = first.client.current_round()
        params = first.fetch_global_model(current)
        assert (
            keccak(harness.service.model_bytes(current.model_hash))
            == harness.ledger.get_round(1).model_hash
        )
        del params
        for k in (1, 2):  # the others have committed: node 0's commitment ends the phase
            harness.make_upload(harness.orgs[k], seed=k)
        outcome = first.take_part(current)
        assert outcome is not None and not outcome.duplicate
        restarted = _runner(harness, url, 0)  # fresh process state, same key and data
        again = restarted.take_part(restarted.client.current_round())
    assert again is not None and again.duplicate
    assert again.update_hash == outcome.update_hash


def test_a_node_with_another_spec_is_told_which_fields_differ_and_trains_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    mine = tmp_path / "spec.toml"
    mine.write_bytes(BUILTIN_DIGITS.read_bytes().replace(b"lr = 0.05", b"lr = 0.5"))
    with serve_in_thread(create_app(harness.service)) as url:
        runner = _runner(harness, url, 0, DigitsTask(load_spec(mine)))
        with pytest.raises(TaskError) as refused:
            runner.run()
    assert refused.value.code is ErrorCode.SPEC_MISMATCH
    assert "training.lr: 0.5 != 0.05" in refused.value.message
    assert runner.done_rounds == set()
    assert harness.ledger.commitment_of(1, harness.orgs[0].address) is None


def test_a_node_keeps_what_it_sent_and_reports_each_settled_round(
    make_harness: Callable[..., Harness], tmp_path: Path
) -> None:
    harness = make_harness(total_rounds=1)
    harness.service.start_driver()
    settled: list[Settled] = []
    with serve_in_thread(create_app(harness.service)) as url:
        runners = [_runner(harness, url, k) for k in range(len(harness.orgs))]
        runners[0].outbox = tmp_path / "outbox"
        runners[0].on_settled = settled.append
        threads = [threading.Thread(target=r.run) for r in runners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    me = harness.orgs[0].address
    committed = harness.ledger.commitment_of(1, me)
    assert committed is not None
    sent = tmp_path / "outbox" / "round-0001"
    assert keccak((sent / "update.safetensors").read_bytes()) == committed.update_hash
    assert json.loads((sent / "upload.json").read_text())["round_id"] == 1
    assert [s.round_id for s in settled] == [1]
    assert settled[0].reward == harness.ledger.reward_of(1, me)
    result = harness.service.round_result(1)
    assert settled[0].validation == {
        "neg_log_loss": result.validation_utility,
        "accuracy": result.validation_accuracy,
    }


def test_a_node_refuses_a_coordinator_serving_another_spec_than_the_chain(
    harness: Harness, tmp_path: Path
) -> None:
    """The coordinator's served spec is checked too: one serving another task (misconfigured,
    or hoping nodes train something else) is refused, with the fields that differ."""
    other = tmp_path / "spec.toml"
    other.write_bytes(BUILTIN_DIGITS.read_bytes().replace(b"epochs = 3", b"epochs = 30"))
    harness.service.spec = load_spec(other)
    with serve_in_thread(create_app(harness.service)) as url:
        runner = _runner(harness, url, 0)
        with pytest.raises(TaskError, match="serves a task spec hashing to") as refused:
            runner.run()
    assert "training.epochs: 3 != 30" in refused.value.message
    assert harness.ledger.commitment_of(1, harness.orgs[0].address) is None

"""``audit_round``: a finished round recomputed from the coordinator's data directory matches
the chain, and every kind of tampering with the stored inputs or records is reported."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import pytest

from fedledger.coordinator.audit import AuditReport, audit_round
from fedledger.coordinator.books import round_pool
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import canonical_bytes
from harness import Harness


def _finished_round(make_harness: Callable[..., Harness], **settings: object) -> Harness:
    harness = make_harness(**settings)
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k), num_samples=50 * (k + 1))
        for k, org in enumerate(harness.orgs)
    ]:
        assert harness.post(upload).status_code == 201
    harness.service.step()
    assert harness.client.get("/v1/rounds/1").json()["status"] == "finalized"
    return harness


def _audit(harness: Harness) -> AuditReport:
    return audit_round(1, harness.ledger, harness.service.settings.data_dir)


@pytest.mark.parametrize("claims_above", [16, 0], ids=["direct", "claims"])
def test_an_honest_round_passes_every_check(
    make_harness: Callable[..., Harness], claims_above: int
) -> None:
    harness = _finished_round(make_harness, pricing=PricingPolicy(claims_above=claims_above))
    report = _audit(harness)
    assert report.ok, report.mismatches
    checked = " | ".join(c.what for c in report.checks)
    for org in harness.orgs:
        assert f"update of {org.address} matches its commitment" in checked
    assert "aggregate matches the on-chain new model hash" in checked
    assert ("Merkle root" in checked) == (claims_above == 0)
    assert report.books is not None
    policy = harness.service.settings.pricing
    books = report.books
    assert sum(books.rewards) == round_pool(policy, books.values, books.flags, books.gain) > 0


def test_a_replay_of_the_public_global_step_is_flagged_and_the_audit_agrees(
    make_harness: Callable[..., Harness],
) -> None:
    """Round 2: two organisations train from the round's model; the third, with no data,
    uploads twice the public step from round 1's model to round 2's (both served to anyone).
    It is flagged as a replay and paid nothing, and the audit, loading the same inputs from
    the data directory, closes the books identically."""
    harness = _finished_round(make_harness)
    harness.service.step()  # opens round 2
    current = harness.client.get("/v1/rounds/current").json()
    assert current["round_id"] == 2
    first = harness.client.get("/v1/rounds/1").json()
    new, old = harness.model(current["model_hash"]), harness.model(first["model_hash"])
    replay = {n: 2.0 * (new[n] - old[n]) for n in new}
    uploads = [harness.trained_delta(0, new), harness.trained_delta(1, new), replay]
    harness.round_with_cheat(2, uploads, "replay of the public global steps")
    report = audit_round(2, harness.ledger, harness.service.settings.data_dir)
    assert report.ok, report.mismatches


def test_a_tampered_update_is_reported(make_harness: Callable[..., Harness]) -> None:
    harness = _finished_round(make_harness)
    store = harness.service.store
    victim = store.updates_for(1)[1]
    path = store.blob_path(victim.update_hash)
    tensors = harness.trained_delta(2)
    path.write_bytes(canonical_bytes({n: 2 * t for n, t in tensors.items()}))
    report = _audit(harness)
    assert not report.ok
    failed = [c.what for c in report.mismatches]
    assert f"update of {victim.organisation} matches its commitment" in failed
    assert "aggregate matches the on-chain new model hash" in failed


def test_recorded_settings_that_differ_from_the_round_are_reported(
    make_harness: Callable[..., Harness],
) -> None:
    """A coordinator that claims another rate than it paid by: the totals disagree."""
    harness = _finished_round(make_harness)
    database = harness.service.settings.data_dir / "state.sqlite3"
    with sqlite3.connect(database) as db:
        (raw,) = db.execute("SELECT result_json FROM rounds WHERE round_id = 1").fetchone()
        result = json.loads(raw)
        result["pricing"]["reward_per_gain"] = str(2 * int(result["pricing"]["reward_per_gain"]))
        db.execute("UPDATE rounds SET result_json = ? WHERE round_id = 1", (json.dumps(result),))
    failed = [c.what for c in _audit(harness).mismatches]
    assert "total reward matches the chain" in failed
    assert any(what.startswith("score, reward and flags of") for what in failed)


def test_an_open_round_cannot_be_audited(harness: Harness) -> None:
    report = _audit(harness)
    assert not report.ok
    assert [c.what for c in report.checks] == ["round finalized on-chain"]


def test_the_audit_never_writes_to_the_data_directory(make_harness: Callable[..., Harness]) -> None:
    harness = _finished_round(make_harness)
    data_dir = harness.service.settings.data_dir
    partial = data_dir / "blobs" / "inflight.part"  # an upload being written right now
    partial.write_bytes(b"half an upload")
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    assert _audit(harness).ok
    after = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    assert partial.exists()
    assert {p for p in after if "state.sqlite3" not in p.name} == {
        p for p in before if "state.sqlite3" not in p.name
    }
    assert {p: t for p, t in after.items() if p.suffix == ".safetensors"} == {
        p: t for p, t in before.items() if p.suffix == ".safetensors"
    }

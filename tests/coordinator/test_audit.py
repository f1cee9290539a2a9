"""``audit_round``: a finished round recomputed from the coordinator's data directory matches
the chain, and every kind of tampering with the stored inputs or records is reported; an upload
the coordinator acknowledged and dropped is reported, and proven by the member's receipt."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import pytest

from fedledger import wire
from fedledger.coordinator.audit import AuditReport, audit_round
from fedledger.coordinator.books import round_pool
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import canonical_bytes
from fedledger.receipts import ReceiptSigner
from harness import Harness


def _finished_round(
    make_harness: Callable[..., Harness],
    receipts: list[wire.UploadReceipt] | None = None,
    **settings: object,
) -> Harness:
    """Round 1 with every member's upload, closed; each member's receipt into ``receipts``."""
    harness = make_harness(**settings)
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k), num_samples=50 * (k + 1))
        for k, org in enumerate(harness.orgs)
    ]:
        response = harness.post(upload)
        assert response.status_code == 201  # type: ignore[attr-defined]
        if receipts is not None:
            receipts.append(wire.UploadReceipt.model_validate(response.json()))  # type: ignore[attr-defined]
    harness.service.step()
    assert harness.client.get("/v1/rounds/1").json()["status"] == "finalized"
    return harness


def _audit(harness: Harness) -> AuditReport:
    return audit_round(1, harness.ledger, harness.service.settings.data_dir)


@pytest.mark.parametrize("claims_above", [16, 0], ids=["direct", "claims"])
def test_an_honest_round_passes_every_check(
    make_harness: Callable[..., Harness], claims_above: int
) -> None:
    receipts: list[wire.UploadReceipt] = []
    harness = _finished_round(
        make_harness, receipts, pricing=PricingPolicy(claims_above=claims_above)
    )
    report = _audit(harness)
    assert report.ok, report.mismatches
    checked = " | ".join(c.what for c in report.checks)
    for org in harness.orgs:
        assert f"update of {org.address} matches its commitment" in checked
    assert "every on-chain committer's upload is in the store" in checked
    assert "aggregate matches the on-chain new model hash" in checked
    # Every member's receipt checks out: signed by the coordinator, its update stored and settled.
    with_receipts = audit_round(
        1, harness.ledger, harness.service.settings.data_dir, receipts=receipts
    )
    assert with_receipts.ok and with_receipts.dropped == [], with_receipts.mismatches
    proven = " | ".join(c.what for c in with_receipts.checks)
    for org in harness.orgs:
        assert f"receipt of {org.address} is signed by the ledger's coordinator" in proven
        assert f"upload of {org.address} acknowledged by its receipt is in the store" in proven
        assert (
            f"upload of {org.address} acknowledged by its receipt is in the round's settlement"
            in proven
        )
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


@pytest.mark.parametrize("claims_above", [16, 0], ids=["direct", "claims"])
def test_a_dropped_upload_is_reported_and_the_member_s_receipt_proves_it(
    make_harness: Callable[..., Harness], claims_above: int
) -> None:
    """The coordinator acknowledges all three uploads, then deletes one (its record and its
    bytes) before the round closes without it. The audit reports the committer missing from
    the store; with the member's signed receipt, the drop is proven."""
    harness = make_harness(pricing=PricingPolicy(min_aggregated=1, claims_above=claims_above))
    receipts = []
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs)
    ]:
        response = harness.post(upload)
        assert response.status_code == 201  # type: ignore[attr-defined]
        receipts.append(wire.UploadReceipt.model_validate(response.json()))  # type: ignore[attr-defined]
    victim = harness.orgs[1].address
    store = harness.service.store
    dropped = store.get_update(1, victim)
    assert dropped is not None
    with sqlite3.connect(harness.service.settings.data_dir / "state.sqlite3") as db:
        db.execute("DELETE FROM updates WHERE round_id = 1 AND organisation = ?", (victim,))
    store.blob_path(dropped.update_hash).unlink()
    harness.advance(601 + harness.service.settings.upload_grace_s)
    harness.service.step()
    assert harness.ledger.get_round(1).state.name == "FINALIZED"

    # Without receipts: a committer missing from the store, nothing more can be said.
    report = _audit(harness)
    assert [c.what for c in report.mismatches] == [
        f"upload of {victim}, committed on-chain, is in the store"
    ]
    assert "round 1" in report.mismatches[0].detail and report.dropped == []

    # With the members' receipts: the victim's proves the drop; the others' are clean.
    forged = ReceiptSigner(
        harness.outsider, chain_id=harness.ledger.chain_id(), ledger=harness.ledger.address
    ).receipt(receipts[1].acknowledgement())
    report = audit_round(
        1, harness.ledger, harness.service.settings.data_dir, receipts=[*receipts, forged]
    )
    assert [d.receipt.organisation for d in report.dropped] == [victim]
    assert report.dropped[0].missing_from == ("the coordinator's store", "the round's settlement")
    assert f"organisation {victim}" in str(report.dropped[0])
    assert {c.what for c in report.mismatches} == {
        f"upload of {victim}, committed on-chain, is in the store",
        f"upload of {victim} acknowledged by its receipt is in the store",
        f"upload of {victim} acknowledged by its receipt is in the round's settlement",
        f"receipt of {victim} is signed by the ledger's coordinator",  # the forged one only
    }
    signed = [c for c in report.checks if c.what.endswith("is signed by the ledger's coordinator")]
    assert [c.ok for c in signed] == [True, True, True, False]
    assert "bad_receipt" in signed[-1].detail
    assert any(c.ok and "acknowledges its on-chain commitment" in c.what for c in report.checks)

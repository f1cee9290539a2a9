"""No global model from fewer than the consortium's minimum of updates: with K aggregated, any
K-1 members recover the last one's update from the two public models (and with one, anybody)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedledger.coordinator.audit import audit_round
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.store import Store
from harness import Harness


def test_the_default_minimum_is_three() -> None:
    assert PricingPolicy().min_aggregated == 3
    with pytest.raises(ValueError, match="min_aggregated"):
        PricingPolicy(min_aggregated=0)


def test_a_round_of_two_updates_fails_and_publishes_nothing(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(quorum=2, pricing=PricingPolicy())
    start = harness.ledger.get_round(1).model_hash
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs[:2])
    ]:
        assert harness.post(upload).status_code == 201
    harness.advance(601 + harness.service.settings.upload_grace_s)
    harness.service.step()
    result = harness.client.get("/v1/rounds/1").json()
    assert result["status"] == "failed"
    assert "fewer than the consortium's minimum of 3 (min_aggregated)" in result["reason"]
    assert result["new_model_hash"] == result["model_hash"]
    record = harness.ledger.get_round(1)
    assert record.new_model_hash == start and record.total_reward == 0
    assert harness.ledger.balance_of(harness.orgs[0].address) == 0
    # Who uploaded is on the record as such, not missing; the one who did not is missing.
    statuses = {o["organisation"]: o["status"] for o in result["organisations"]}
    assert [statuses[o.address] for o in harness.orgs[:2]] == ["accepted", "accepted"]
    assert set(statuses.values()) == {"accepted", "missing"}
    # The next round trains on the same model: nothing was published.
    harness.service.step()
    assert harness.ledger.get_round(2).model_hash == start


def test_updates_screened_out_do_not_count_towards_the_minimum(
    make_harness: Callable[..., Harness],
) -> None:
    """Three uploads, one a copy: two would make the model, so the round fails; three honest
    ones make it."""
    honest = [make_harness().trained_delta(k) for k in range(3)]
    for uploads, status in (
        (honest, "finalized"),
        ([*honest[:2], {name: 2.0 * t for name, t in honest[0].items()}], "failed"),
    ):
        harness = make_harness(pricing=PricingPolicy())
        # every member commits first: uploads wait for the commit phase to end
        for upload in [
            harness.make_upload(org, tensors)
            for org, tensors in zip(harness.orgs, uploads, strict=True)
        ]:
            assert harness.post(upload).status_code == 201
        harness.service.step()
        result = harness.member_result(1)
        assert result["status"] == status, result.get("reason")
        if status == "finalized":
            assert sum(o["aggregated"] for o in result["organisations"]) == 3
        else:
            assert "only 2 update(s) passed the screens" in result["reason"]
            # The record says why: the copy's flag and note, nobody aggregated.
            rows = {o["organisation"]: o for o in result["organisations"]}
            copy = rows[harness.orgs[2].address]
            assert copy["status"] == "accepted" and copy["flag_reasons"] == ["copied_update"]
            assert copy["note"] and not any(o["aggregated"] for o in rows.values())
            assert all(rows[o.address]["flags"] == 0 for o in harness.orgs[:2])
            # An auditor prices the round again and finds it refused for the same reason.
            report = audit_round(1, harness.ledger, harness.service.settings.data_dir)
            assert report.ok, report.mismatches
            assert any(c.what.startswith("too few updates passed") for c in report.checks)
            # A store whose record says the copy was clean is caught.
            store = Store(harness.service.settings.data_dir)
            stored = store.get_round(1)
            assert stored is not None and stored.result is not None
            forged = dict(stored.result)
            forged["organisations"] = [{**o, "flags": 0} for o in stored.result["organisations"]]
            store.set_round_status(
                1, stored.status, new_model_hash=stored.model_hash, result=forged
            )
            store.close()
            report = audit_round(1, harness.ledger, harness.service.settings.data_dir)
            assert [c.what for c in report.mismatches] == [
                f"flags of {harness.orgs[2].address} match the round's result"
            ]

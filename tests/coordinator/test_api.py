"""The coordinator API: every rejection has a status and a stable code, and nothing accepted is lost."""

from __future__ import annotations

import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import canonical_bytes
from fedledger.incentive.onchain import Flag, RoundState
from harness import Harness, pool_of


def _error(response: object) -> tuple[int, str]:
    status = response.status_code  # type: ignore[attr-defined]
    return status, response.json()["code"]  # type: ignore[attr-defined]


def test_valid_upload_is_acknowledged_and_stored(harness: Harness) -> None:
    org = harness.orgs[0]
    upload = harness.make_upload(org)
    response = harness.post(upload)
    assert response.status_code == 201, response.text
    receipt = response.json()
    assert receipt["update_hash"] == "0x" + upload.digest.hex()
    assert receipt["organisation"] == org.address
    assert receipt["duplicate"] is False
    assert harness.service.store.get_blob(receipt["update_hash"]) == upload.body
    current = harness.client.get("/v1/rounds/current").json()
    assert current["uploads_received"] == 1 and current["status"] == "open"


def test_same_bytes_twice_returns_the_original_receipt(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0])
    first = harness.post(upload).json()
    again = harness.make_upload(harness.orgs[0], body=upload.body, commit=False)
    response = harness.post(again)
    assert response.status_code == 200
    assert response.json() == {**first, "duplicate": True}
    assert len(harness.service.store.updates_for(upload.round_id)) == 1


def test_different_bytes_for_the_same_round_keep_the_original(harness: Harness) -> None:
    org = harness.orgs[0]
    original = harness.make_upload(org)
    harness.post(original)
    other = harness.make_upload(org, seed=1, commit=False)
    assert _error(harness.post(other)) == (409, "already_submitted")
    stored = harness.service.store.get_update(original.round_id, org.address)
    assert stored is not None and stored.update_hash == "0x" + original.digest.hex()


def test_unsigned_upload_is_refused(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0])
    response = harness.client.post(f"/v1/rounds/{upload.round_id}/updates", content=upload.body)
    assert _error(response) == (401, "unsigned")
    assert "X-Fedledger-Signature" in response.json()["message"]


def test_malformed_headers_are_refused(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0])
    assert _error(harness.post(upload, **{"X-Fedledger-Nonce": "not-a-number"})) == (
        401,
        "malformed_authorization",
    )
    assert _error(harness.post(upload, **{"X-Fedledger-Signature": "0x1234"})) == (
        401,
        "bad_signature",
    )


def test_signature_by_another_key_is_refused(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0], signer=harness.outsider)
    assert _error(harness.post(upload)) == (401, "bad_signature")


def test_unregistered_signer_is_refused(harness: Harness) -> None:
    upload = harness.make_upload(harness.outsider, commit=False)
    response = harness.post(upload)
    assert _error(response) == (401, "unregistered_signer")
    assert harness.outsider.address in response.json()["message"]


def test_organisation_signing_as_another_is_forbidden(harness: Harness) -> None:
    victim, attacker = harness.orgs[0], harness.orgs[1]
    upload = harness.make_upload(victim, signer=attacker)
    response = harness.post(upload)
    assert _error(response) == (403, "impersonation")
    assert harness.service.store.get_update(upload.round_id, victim.address) is None


def test_signature_for_another_chain_or_contract_is_refused(harness: Harness) -> None:
    org = harness.orgs[0]
    other_chain = harness.make_upload(org, chain_id=1)
    assert _error(harness.post(other_chain)) == (401, "bad_signature")
    other_ledger = harness.make_upload(org, commit=False, ledger_address=harness.outsider.address)
    assert _error(harness.post(other_ledger)) == (401, "bad_signature")


def test_expired_request_is_refused(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0], expiry=int(harness.clock[0]) - 1)
    assert _error(harness.post(upload)) == (401, "expired")


def test_body_that_differs_from_the_signed_hash_is_refused(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0])
    tampered = canonical_bytes(harness.delta(seed=7))
    harness.end_commit_phase()  # the body is read only once the headers pass every check
    response = harness.client.post(
        f"/v1/rounds/{upload.round_id}/updates", content=tampered, headers=upload.headers
    )
    assert _error(response) == (401, "body_hash_mismatch")


def test_hash_that_differs_from_the_chain_commitment_is_refused(harness: Harness) -> None:
    org = harness.orgs[0]
    committed = harness.make_upload(org, seed=1)  # commits seed 1's hash on-chain
    sent = harness.make_upload(org, seed=2, commit=False)  # uploads seed 2's bytes
    response = harness.post(sent)
    assert _error(response) == (409, "commitment_mismatch")
    assert "0x" + committed.digest.hex() in response.json()["message"]
    assert harness.service.store.get_update(sent.round_id, org.address) is None


def test_upload_without_on_chain_commitment_is_refused(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0], commit=False)
    assert _error(harness.post(upload)) == (409, "not_committed")


def test_sample_count_must_match_the_commitment(harness: Harness) -> None:
    org = harness.orgs[0]
    committed = harness.make_upload(org, num_samples=100)
    lying = harness.make_upload(org, body=committed.body, num_samples=5000, commit=False)
    assert _error(harness.post(lying)) == (409, "samples_mismatch")


def test_a_sample_count_above_the_consortium_cap_is_refused(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(pricing=PricingPolicy(max_samples=500))
    org = harness.orgs[0]
    above, at_cap = (
        harness.make_upload(org, num_samples=501),
        harness.make_upload(harness.orgs[1], num_samples=500),
    )
    response = harness.post(above)
    assert _error(response) == (422, "too_many_samples")
    assert "above the consortium's cap of 500" in response.json()["message"]
    assert harness.service.store.get_update(1, org.address) is None
    assert harness.post(at_cap).status_code == 201
    assert harness.service.settings.pricing.record()["max_samples"] == 500  # recorded per round


def test_wrong_shapes_names_and_dtypes_are_refused_with_the_differences(harness: Harness) -> None:
    good = harness.delta()
    name = sorted(good)[0]
    bad = dict(good)
    bad[name] = torch.zeros(3, 3)
    bad["extra.weight"] = torch.zeros(2)
    del bad[sorted(good)[-1]]
    as_double = {n: t.double() for n, t in good.items()}
    misshapen, doubled = (
        harness.make_upload(harness.orgs[0], bad),
        harness.make_upload(harness.orgs[1], as_double),
    )
    response = harness.post(misshapen)
    assert _error(response) == (422, "tensor_mismatch")
    message = response.json()["message"]
    assert name in message and "extra.weight" in message and sorted(good)[-1] in message

    response = harness.post(doubled)
    assert _error(response) == (422, "tensor_mismatch")
    assert "float64" in response.json()["message"]


def test_nan_and_infinity_are_refused_naming_the_tensor(harness: Harness) -> None:
    uploads = []
    for k, bad_value in enumerate((float("nan"), float("inf"))):
        delta = harness.delta()
        name = sorted(delta)[1]
        delta[name].view(-1)[0] = bad_value
        uploads.append(harness.make_upload(harness.orgs[k], delta))
    for upload in uploads:
        response = harness.post(upload)
        assert _error(response) == (422, "non_finite")
        assert name in response.json()["message"]


class _WritesAFile:
    path = ""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_pickle_payload_is_refused_and_never_unpickled(harness: Harness, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _WritesAFile.path = str(marker)
    payload = pickle.dumps({"weight": _WritesAFile()})
    response = harness.post(harness.make_upload(harness.orgs[0], body=payload))
    assert _error(response) == (422, "not_safetensors")
    assert not marker.exists()


def test_oversize_body_is_refused_with_413(harness: Harness) -> None:
    limit = harness.service.settings.max_upload_bytes
    upload = harness.make_upload(harness.orgs[0], body=b"\0" * (limit + 1))
    response = harness.post(upload)
    assert _error(response) == (413, "too_large")

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to trust
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    response = harness.client.post(
        f"/v1/rounds/{upload.round_id}/updates", content=chunks(), headers=upload.headers
    )
    assert _error(response) == (413, "too_large")


def test_upload_for_another_round_gets_the_current_round(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0], round_id=2, commit=False)
    response = harness.post(upload)
    assert _error(response) == (409, "wrong_round")
    assert response.json()["details"]["current_round"] == 1


def test_malformed_request_is_422_without_echoing_input(harness: Harness) -> None:
    response = harness.client.get("/v1/rounds/not-a-number")
    assert _error(response) == (422, "invalid_request")
    assert "not-a-number" not in response.text


def test_unknown_model_and_round_are_404(harness: Harness) -> None:
    assert _error(harness.client.get("/v1/models/0x" + "ab" * 32)) == (404, "unknown_model")
    assert _error(harness.client.get("/v1/rounds/99")) == (404, "unknown_round")


def test_uploaded_updates_are_not_served_as_models(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0])
    assert harness.post(upload).status_code == 201
    response = harness.client.get(f"/v1/models/0x{upload.digest.hex()}")
    assert _error(response) == (404, "unknown_model")
    assert upload.body not in response.content


def test_served_model_matches_its_on_chain_hash(harness: Harness) -> None:
    from fedledger.incentive.commitment import keccak

    current = harness.client.get("/v1/rounds/current").json()
    data = harness.client.get(f"/v1/models/{current['model_hash']}").content
    assert keccak(data) == harness.ledger.get_round(current["round_id"]).model_hash


def test_full_round_aggregates_prices_and_pays_on_chain(harness: Harness) -> None:
    bad_attempts = [harness.make_upload(harness.orgs[0], commit=False, seed=9)]
    uploads = [
        harness.make_upload(org, harness.trained_delta(k), num_samples=100 * (k + 1))
        for k, org in enumerate(harness.orgs)
    ]
    for upload in uploads:
        assert harness.post(upload).status_code == 201
    for attempt in bad_attempts:
        assert harness.post(attempt).status_code == 409
    harness.service.step()  # all in: aggregate, price, settle
    result = harness.client.get("/v1/rounds/1").json()
    assert result["status"] == "finalized", result.get("reason")
    rewards = [int(o["reward"]) for o in result["organisations"]]
    assert result["validation_gain"] > 0  # three honest updates from the initial model
    assert sum(rewards) == pool_of(result, harness.service.settings.pricing) > 0
    record = harness.ledger.get_round(1)
    assert record.state == RoundState.FINALIZED
    assert "0x" + record.new_model_hash.hex() == result["new_model_hash"]
    for entry in result["organisations"]:
        assert harness.ledger.balance_of(entry["organisation"]) == int(entry["reward"])
        assert harness.ledger.score_of(1, entry["organisation"]) == int(entry["score"])
    harness.service.step()  # opens round 2 on the new model
    current = harness.client.get("/v1/rounds/current").json()
    assert current["round_id"] == 2
    assert current["model_hash"] == result["new_model_hash"]


def test_replayed_nonce_is_refused_in_a_later_round(harness: Harness) -> None:
    first = harness.make_upload(harness.orgs[0], nonce=42)
    assert harness.post(first).status_code == 201
    harness.advance(harness.service.settings.round_timeout_s + 60)
    harness.service.step()  # deadline with quorum 1: round 1 closes
    harness.service.step()  # round 2 opens
    harness.clock[0] = harness.ledger.block_timestamp()
    replay = harness.make_upload(harness.orgs[0], nonce=42, seed=3)
    assert _error(harness.post(replay)) == (401, "replayed")


def test_upload_after_the_deadline_is_refused(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(quorum=2)
    upload = harness.make_upload(harness.orgs[0], expiry=int(harness.clock[0]) + 3000)
    harness.advance(601 + harness.service.settings.upload_grace_s)
    response = harness.post(upload)
    assert _error(response) == (409, "deadline_passed")
    assert harness.service.store.get_update(1, harness.orgs[0].address) is None


def test_quorum_not_met_fails_the_round_without_payout(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(quorum=2)
    assert harness.post(harness.make_upload(harness.orgs[0])).status_code == 201
    harness.advance(601 + harness.service.settings.upload_grace_s)
    harness.service.step()
    result = harness.client.get("/v1/rounds/1").json()
    assert result["status"] == "failed"
    assert "quorum" in result["reason"]
    assert result["new_model_hash"] == result["model_hash"]
    assert harness.ledger.get_round(1).total_reward == 0
    assert harness.ledger.total_supply() == 0


def test_absent_organisation_is_missing_with_zero_score_and_reward(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(quorum=2)
    present, absent = harness.orgs[:2], harness.orgs[2]
    # every member commits first: uploads wait for the commit phase to end
    for upload in [harness.make_upload(org, seed=k) for k, org in enumerate(present)]:
        assert harness.post(upload).status_code == 201
    harness.service.step()
    assert harness.client.get("/v1/rounds/1").json()["status"] == "open"  # still waiting
    harness.advance(601 + harness.service.settings.upload_grace_s)
    harness.service.step()  # the deadline with a quorum: the round goes on without it
    result = harness.client.get("/v1/rounds/1").json()
    assert result["status"] == "finalized", result.get("reason")
    by_org = {o["organisation"]: o for o in result["organisations"]}
    assert by_org[absent.address]["status"] == "missing"
    assert by_org[absent.address]["value"] == 0 and by_org[absent.address]["reward"] == "0"
    assert harness.ledger.reward_of(1, absent.address) == 0
    assert not harness.ledger.is_settled(1, absent.address)
    assert all(harness.ledger.is_settled(1, org.address) for org in present)


def test_extend_policy_gives_a_short_round_more_time(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(quorum=2, quorum_policy="extend", max_extensions=1)
    first_deadline = harness.ledger.get_round(1).deadline
    # one commitment of the two required; its authorisation outlives the extension
    early = harness.make_upload(harness.orgs[0], expiry=first_deadline + 3000)
    harness.service.step()  # well before the deadline: nothing to decide yet
    assert harness.ledger.get_round(1).deadline == first_deadline
    harness.advance_to(first_deadline - 2)  # the last seconds of the commit phase
    harness.service.step()  # short of quorum: extended on-chain before the deadline
    extended = harness.ledger.get_round(1).deadline
    assert extended > first_deadline
    assert harness.client.get("/v1/rounds/current").json()["deadline"] == extended
    assert harness.client.get("/v1/rounds/1").json()["status"] == "open"
    harness.advance_to(first_deadline + 10)  # past the first deadline, inside the extension
    late = harness.make_upload(harness.orgs[1], seed=1)  # a commitment the extension let in
    for upload in (early, late):
        assert harness.post(upload).status_code == 201
    harness.advance_to(extended + harness.service.settings.upload_grace_s + 1)
    harness.service.step()
    assert harness.client.get("/v1/rounds/1").json()["status"] == "finalized"


def test_extend_policy_fails_after_its_last_extension(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(quorum=2, quorum_policy="extend", max_extensions=1)
    harness.advance_to(harness.ledger.get_round(1).deadline - 2)
    harness.service.step()  # first miss: extended
    extended = harness.ledger.get_round(1).deadline
    harness.advance_to(extended - 2)
    harness.service.step()  # second miss: no extensions left
    assert harness.ledger.get_round(1).deadline == extended
    harness.advance(3 + harness.service.settings.upload_grace_s)
    harness.service.step()
    result = harness.client.get("/v1/rounds/1").json()
    assert result["status"] == "failed" and "quorum" in result["reason"]


def test_a_round_past_its_deadline_is_not_extended(make_harness: Callable[..., Harness]) -> None:
    """After the commit deadline uploads may have been seen: the extend policy has no say
    any more (the ledger would refuse it too) and the short round fails."""
    harness = make_harness(quorum=2, quorum_policy="extend", max_extensions=3)
    deadline = harness.ledger.get_round(1).deadline
    harness.advance_to(deadline + harness.service.settings.upload_grace_s + 1)
    harness.service.step()
    assert harness.ledger.get_round(1).deadline == deadline
    result = harness.client.get("/v1/rounds/1").json()
    assert result["status"] == "failed" and "quorum" in result["reason"]


def test_no_upload_is_taken_while_commitments_are_open(harness: Harness) -> None:
    """Two phases: until every active organisation committed (or the deadline passed), an
    upload is refused, so nobody can commit with what another uploaded."""
    first = harness.make_upload(harness.orgs[0])
    response = harness.post(first, wait_for_commits=False)
    assert _error(response) == (409, "commitments_open")
    assert response.json()["details"]["deadline"] == harness.ledger.get_round(1).deadline  # type: ignore[attr-defined]
    assert harness.service.store.get_update(1, harness.orgs[0].address) is None
    rest = [harness.make_upload(org, seed=k) for k, org in enumerate(harness.orgs[1:], 1)]
    # The last commitment ends the phase at once, long before the deadline.
    assert harness.ledger.commits_closed(1)
    for upload in (first, *rest):
        assert harness.post(upload, wait_for_commits=False).status_code == 201


def test_a_copied_update_is_flagged_in_the_api_and_on_chain(harness: Harness) -> None:
    honest = [harness.trained_delta(k) for k in range(2)]
    copied = {name: 3.0 * t for name, t in honest[0].items()}
    result = harness.round_with_cheat(1, [*honest, copied], "rescaled copy")
    by_org = {o["organisation"]: o for o in result["organisations"]}
    cheat = by_org[harness.orgs[2].address]
    assert sum(int(o["reward"]) for o in by_org.values()) == pool_of(
        result, harness.service.settings.pricing
    )

    ledger = harness.ledger
    assert ledger.flags_of(1, harness.orgs[2].address) == cheat["flags"] == int(Flag.COPIED_UPDATE)
    logs = ledger.contract.events.OrganisationFlagged().get_logs(from_block=0)
    assert [(log["args"]["org"], log["args"]["flags"]) for log in logs] == [
        (harness.orgs[2].address, int(Flag.COPIED_UPDATE))
    ]
    valuation = ledger.valuation_of(1)
    assert valuation is not None
    assert valuation.method == result["valuation_method"] == "exact:neg_log_loss"
    assert valuation.seed == result["valuation_seed"] == 1
    assert "0x" + valuation.validation_hash.hex() == result["validation_hash"]


def test_an_unexpected_error_in_the_round_driver_shows_in_health_and_is_retried(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in closing a round must not silently kill the driver while /health says ok."""
    service = harness.service
    real_step = service.step
    calls: list[int] = []

    def failing_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("pricing blew up")
        real_step()

    monkeypatch.setattr(service, "step", failing_once)
    statuses: list[str] = []
    service.start_driver()
    deadline = time.monotonic() + 20
    while len(calls) < 2 and time.monotonic() < deadline:
        statuses.append(harness.client.get("/v1/health").json()["status"])
        time.sleep(0.05)
    assert len(calls) >= 2, "the driver stopped after the error"
    assert "degraded: RuntimeError: pricing blew up" in statuses
    while harness.client.get("/v1/health").json()["status"] != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _wait_for(condition: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.01)


def test_a_long_poll_is_held_until_the_round_changes_then_answers_with_it(
    harness: Harness,
) -> None:
    """GET /v1/rounds/current?after_round&after_status&wait_s is held while the round is the
    one the caller knows, and answered with the new state as soon as the round changes."""
    watch = harness.service.watch  # a held poll is a wait on it, not a blocked thread
    current = harness.client.get("/v1/rounds/current").json()
    assert (current["round_id"], current["status"]) == (1, "open")
    known = {"after_round": 1, "after_status": "open"}
    assert watch.waiting == 0

    wait_s = 25.0
    answers: list[tuple[float, httpx.Response]] = []

    def poll() -> None:
        response = harness.client.get("/v1/rounds/current", params={**known, "wait_s": wait_s})
        answers.append((time.monotonic(), response))

    asked_at = time.monotonic()
    waiter = threading.Thread(target=poll, name="long-poll", daemon=True)
    waiter.start()
    _wait_for(lambda: watch.waiting or answers, "the poll to be held")
    assert answers == [], "a poll for the current state was answered without a change"
    assert watch.waiting == 1

    # Uploads change the round's counts, not its (round, status): the poll stays held.
    # every member commits first: uploads wait for the commit phase to end
    for upload in [harness.make_upload(org, seed=k) for k, org in enumerate(harness.orgs)]:
        assert harness.post(upload).status_code == 201
    assert waiter.is_alive() and answers == []

    changed_at = time.monotonic()
    assert harness.service.step()  # all in: round 1 closes
    waiter.join(timeout=20)
    assert not waiter.is_alive(), "the poll was not answered after the round changed"
    answered_at, response = answers[0]
    assert response.status_code == 200
    answer = response.json()
    # It was answered after the change, with the new state, and long before its wait_s.
    assert answered_at >= changed_at
    assert answered_at < asked_at + wait_s - 5
    assert answer["round_id"] == 1 and answer["status"] in ("closing", "finalized")
    now = harness.client.get("/v1/rounds/current").json()
    assert now["status"] == "finalized"
    assert {**answer, "status": None} == {**now, "status": None}
    assert watch.waiting == 0


def test_a_long_poll_for_the_commit_phase_is_answered_when_the_last_commitment_lands(
    harness: Harness,
) -> None:
    """``after_commits_closed=false`` is held while members may still commit, and prompts the
    coordinator to read the chain: the last committer's poll ends every wait at once."""
    watch = harness.service.watch
    for k, org in enumerate(harness.orgs[:-1]):
        harness.make_upload(org, seed=k)  # commits on-chain
    current = harness.client.get("/v1/rounds/current").json()
    assert (current["status"], current["commits_closed"]) == ("open", False)
    params = {"after_round": 1, "after_status": "open", "after_commits_closed": "false"}
    answers: list[dict[str, Any]] = []

    def poll() -> None:
        response = harness.client.get("/v1/rounds/current", params={**params, "wait_s": 25})
        answers.append(response.json())

    first = threading.Thread(target=poll, daemon=True)
    first.start()
    _wait_for(lambda: watch.waiting == 1 or answers, "the poll to be held")
    harness.service.step()  # prompted: the driver reads the chain, a member has not committed
    assert answers == [] and watch.waiting == 1
    assert 1 not in harness.service.machine.commits_closed

    harness.make_upload(harness.orgs[-1], seed=9)  # the last commitment, then its node's poll
    second = threading.Thread(target=poll, daemon=True)
    second.start()
    _wait_for(lambda: watch.waiting == 2 or answers, "the second poll to be held")
    harness.service.step()  # prompted again: the phase is over on-chain
    for waiter in (first, second):
        waiter.join(timeout=20)
        assert not waiter.is_alive()
    assert [(a["round_id"], a["status"], a["commits_closed"]) for a in answers] == [
        (1, "open", True)
    ] * 2
    # Uploads are taken now; a poll that does not ask about the commit phase still waits for
    # the round's status to change.
    upload = harness.make_upload(harness.orgs[0], seed=0, commit=False)  # as committed
    assert harness.post(upload).status_code == 201
    held = threading.Thread(target=poll, daemon=True)
    answers.clear()
    params.pop("after_commits_closed")
    held.start()
    _wait_for(lambda: watch.waiting == 1 or answers, "a status poll to be held")
    assert answers == []
    harness.service.watch.close()
    held.join(timeout=20)
    assert not held.is_alive()


def test_membership_is_read_once_a_round_and_a_newcomer_is_looked_up(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads from the organisations registered when the round opened are checked against
    the list read then; one registered since is looked up on-chain, and accepted."""
    from fedledger.incentive.chain import devnet_account
    from fedledger.incentive.ledger import LedgerClient

    newcomer = devnet_account(2 + len(harness.orgs))
    admin = LedgerClient(harness.ledger.w3, harness.ledger.address, devnet_account(0))
    admin.register_organisation(newcomer.address)
    looked_up: list[str] = []
    ledger = harness.service.ledger
    original = ledger.is_organisation
    monkeypatch.setattr(
        ledger, "is_organisation", lambda a: looked_up.append(a.lower()) or original(a)
    )
    members = [*harness.orgs, newcomer]
    uploads = [harness.make_upload(org, seed=k) for k, org in enumerate(members)]
    for upload in uploads:
        assert harness.post(upload).status_code == 201
    assert looked_up == [newcomer.address.lower()]
    stored = {u.organisation.lower() for u in harness.service.store.updates_for(1)}
    assert stored == {m.address.lower() for m in members}


def test_a_long_poll_answers_a_stale_state_at_once_and_waits_at_most_the_cap(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every member commits first: uploads wait for the commit phase to end
    for upload in [harness.make_upload(org, seed=k) for k, org in enumerate(harness.orgs)]:
        assert harness.post(upload).status_code == 201
    assert harness.service.step()  # round 1 closes
    assert harness.service.step()  # round 2 opens
    current = harness.client.get("/v1/rounds/current").json()
    assert (current["round_id"], current["status"]) == (2, "open")

    # A caller that knows an older state is answered at once, whatever wait_s it asks.
    for stale_round, stale_status in [(1, "open"), (1, "finalized"), (2, "closing"), (0, "open")]:
        started = time.monotonic()
        response = harness.client.get(
            "/v1/rounds/current",
            params={"after_round": stale_round, "after_status": stale_status, "wait_s": 25},
        )
        assert time.monotonic() - started < 10, (stale_round, stale_status)
        assert response.json() == current

    # Nothing changes: the poll answers the same state once wait_s has passed.
    known = {"after_round": 2, "after_status": "open"}
    started = time.monotonic()
    response = harness.client.get("/v1/rounds/current", params={**known, "wait_s": 0.3})
    assert time.monotonic() - started >= 0.3
    assert response.json() == current

    # wait_s is capped by MAX_LONG_POLL_S (here lowered to 0.5 s, so the test need not wait 30).
    service_module = sys.modules[type(harness.service).__module__]
    monkeypatch.setattr(service_module, "MAX_LONG_POLL_S", 0.5)
    capped: list[tuple[float, httpx.Response]] = []

    def poll() -> None:
        response = harness.client.get("/v1/rounds/current", params={**known, "wait_s": 1e6})
        capped.append((time.monotonic() - started, response))

    started = time.monotonic()
    # In a thread, so that an uncapped wait fails the test instead of hanging it; the
    # fixture's service.stop() releases a poll still waiting.
    waiter = threading.Thread(target=poll, name="capped-poll", daemon=True)
    waiter.start()
    waiter.join(timeout=15)
    assert capped, "wait_s=1e6 was not capped by MAX_LONG_POLL_S"
    elapsed, response = capped[0]
    assert elapsed >= 0.5
    assert response.json() == current

"""Concurrent uploads over real HTTP: one organisation, one round, exactly one update stored."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from fedledger.coordinator.api import create_app
from fedledger.demo import serve_in_thread
from harness import Harness

CONCURRENT = 20


def test_twenty_concurrent_identical_uploads_store_one(harness: Harness) -> None:
    org = harness.orgs[0]
    upload = harness.make_upload(org)
    harness.end_commit_phase()
    with serve_in_thread(create_app(harness.service)) as url:

        def send(_: int) -> httpx.Response:
            return httpx.post(
                f"{url}/v1/rounds/{upload.round_id}/updates",
                content=upload.body,
                headers=upload.headers,
                timeout=60,
            )

        with ThreadPoolExecutor(CONCURRENT) as pool:
            responses = list(pool.map(send, range(CONCURRENT)))
    # One body an organisation is received at a time: a copy arriving meanwhile is told so
    # (409 upload_in_progress); one arriving after is answered with the original receipt.
    created = [r for r in responses if r.status_code == 201]
    again = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 409]
    assert len(created) == 1 and len(created) + len(again) + len(busy) == CONCURRENT
    assert {r.json()["code"] for r in busy} <= {"upload_in_progress"}
    receipts = {(r.json()["update_hash"], r.json()["received_at"]) for r in created + again}
    assert len(receipts) == 1  # every receipt is the one original receipt
    assert len(harness.service.store.updates_for(upload.round_id)) == 1


def test_twenty_concurrent_different_uploads_accept_only_the_committed_one(
    harness: Harness,
) -> None:
    org = harness.orgs[0]
    committed = harness.make_upload(org, seed=0)
    others = [harness.make_upload(org, seed=s, commit=False) for s in range(1, CONCURRENT)]
    harness.end_commit_phase()
    with serve_in_thread(create_app(harness.service)) as url:

        def send(upload: object) -> httpx.Response:
            return httpx.post(
                f"{url}/v1/rounds/{committed.round_id}/updates",
                content=upload.body,  # type: ignore[attr-defined]
                headers=upload.headers,  # type: ignore[attr-defined]
                timeout=60,
            )

        with ThreadPoolExecutor(CONCURRENT) as pool:
            responses = list(pool.map(send, [committed, *others]))
    assert responses[0].status_code == 201
    assert {r.json()["code"] for r in responses[1:]} <= {"commitment_mismatch", "already_submitted"}
    assert all(r.status_code == 409 for r in responses[1:])
    stored = harness.service.store.updates_for(committed.round_id)
    assert [u.update_hash for u in stored] == ["0x" + committed.digest.hex()]

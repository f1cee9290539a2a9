"""Round results by reader: members see each organisation's sample count, norm and whether it
was aggregated; anyone else gets the same result without them; a bad read request is refused
with the code an upload's signature would get."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedledger import wire
from fedledger.incentive.signing import sign_read
from harness import Harness

HIDDEN = ("num_samples", "aggregated", "norm")


@pytest.fixture
def settled(make_harness: Callable[..., Harness]) -> Harness:
    harness = make_harness(quorum=3)
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs)
    ]:
        assert harness.post(upload).status_code == 201
    harness.service.step()
    return harness


def test_members_see_sample_counts_and_membership_and_nobody_else_does(settled: Harness) -> None:
    member = settled.member_result(1)
    assert member["status"] == "finalized"
    assert all(o["num_samples"] == 100 and o["aggregated"] for o in member["organisations"])
    assert all(o["norm"] > 0 for o in member["organisations"])
    anonymous = settled.client.get("/v1/rounds/1").json()
    for entry in anonymous["organisations"]:
        assert all(entry[field] is None for field in HIDDEN)
    # Everything else is the same, scores and rewards included (they are on the chain).
    strip = [{k: v for k, v in o.items() if k not in HIDDEN} for o in member["organisations"]]
    assert strip == [
        {k: v for k, v in o.items() if k not in HIDDEN} for o in anonymous["organisations"]
    ]
    assert {k: v for k, v in anonymous.items() if k != "organisations"} == {
        k: v for k, v in member.items() if k != "organisations"
    }


def test_a_members_only_transport_shows_everything_to_every_reader(
    make_harness: Callable[..., Harness],
) -> None:
    from fastapi.testclient import TestClient

    from fedledger.coordinator.api import create_app

    harness = make_harness()
    assert (
        harness.post(harness.make_upload(harness.orgs[0], harness.trained_delta(0))).status_code
        == 201
    )
    client = TestClient(create_app(harness.service, members_only=True))
    entry = client.get("/v1/rounds/1").json()["organisations"]
    assert [o["num_samples"] for o in entry if o["status"] == "accepted"] == [100]


def _signed(harness: Harness, account: object, expiry: int, **fields: str) -> dict[str, str]:
    signature = sign_read(
        account,  # type: ignore[arg-type]
        expiry,
        chain_id=harness.ledger.chain_id(),
        ledger=harness.ledger.address,
    )
    headers = wire.read_request_headers(wire.SignedRead(account.address, expiry, signature))  # type: ignore[attr-defined]
    return {**headers, **fields}


def test_bad_read_requests_are_refused_with_stable_codes(settled: Harness) -> None:
    now = int(settled.clock[0])
    org, other = settled.orgs[0], settled.orgs[1]
    cases = {
        "expired": _signed(settled, org, now - 1),
        "expiry_too_far": _signed(settled, org, now + 10**6),
        "unregistered_signer": _signed(settled, settled.outsider, now + 60),
        # Organisation 0's signature presented as organisation 1's read.
        "bad_signature": _signed(settled, org, now + 60, **{wire.H_READER: other.address}),
        "malformed_authorization": {wire.H_READER: org.address},
    }
    for code, headers in cases.items():
        response = settled.client.get("/v1/rounds/1", headers=headers)
        assert response.status_code in (400, 401, 403), (code, response.text)
        assert response.json()["code"] == code, response.text
    signed_elsewhere = sign_read(org, now + 60, chain_id=999, ledger=settled.ledger.address)
    response = settled.client.get(
        "/v1/rounds/1",
        headers=wire.read_request_headers(wire.SignedRead(org.address, now + 60, signed_elsewhere)),
    )
    assert response.json()["code"] == "bad_signature"  # bound to this chain id

"""Ids and counts are bounded and parsed strictly: no input answers 5xx, none is taken for
another (``1.0`` or ``+1`` for round 1), and a refused upload leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedledger.errors import ContractRevert
from harness import Harness

TOO_BIG = str(2**63)  # one past what the store's INTEGER holds


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (f"/v1/rounds/{TOO_BIG}", 422, "invalid_request"),
        ("/v1/rounds/99999999999999999999999999", 422, "invalid_request"),
        ("/v1/rounds/1.0", 422, "invalid_request"),
        ("/v1/rounds/+1", 422, "invalid_request"),
        ("/v1/rounds/%201", 422, "invalid_request"),
        ("/v1/rounds/1_0", 422, "invalid_request"),
        ("/v1/rounds/-1", 422, "invalid_request"),
        ("/v1/rounds/0", 422, "invalid_request"),
        (f"/v1/rounds/{TOO_BIG}/claims/0x{'ab' * 20}", 422, "invalid_request"),
        (f"/v1/rounds/1/claims/{'a' * 5000}", 422, "invalid_request"),
        (f"/v1/models/0x{'ab' * 5000}", 422, "invalid_request"),
        (
            f"/v1/rounds/current?after_round={TOO_BIG}&after_status=open&wait_s=1",
            422,
            "invalid_request",
        ),
        ("/v1/rounds/current?after_round=1&after_status=open&wait_s=nan", 422, "invalid_request"),
        ("/v1/rounds/current?after_round=1&after_status=open&wait_s=-5", 422, "invalid_request"),
        ("/v1/rounds/9223372036854775807", 404, "unknown_round"),
    ],
)
def test_a_bad_id_is_refused_with_a_code(
    make_harness: Callable[..., Harness], path: str, status: int, code: str
) -> None:
    harness = make_harness()
    response = harness.client.get(path)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert len(response.content) < 2000  # the input is not echoed back


@pytest.mark.parametrize("round_text", ["1.0", "+1", "01x", TOO_BIG])
def test_an_upload_to_a_round_that_is_not_a_plain_id_is_refused(
    make_harness: Callable[..., Harness], round_text: str
) -> None:
    harness = make_harness()
    upload = harness.make_upload(harness.orgs[0])
    response = harness.client.post(
        f"/v1/rounds/{round_text}/updates", content=upload.body, headers=upload.headers
    )
    assert response.status_code == 422 and response.json()["code"] == "invalid_request"
    assert harness.service.store.get_update(1, harness.orgs[0].address) is None


def test_a_sample_count_beyond_the_store_is_refused_before_anything_is_written(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness()
    blobs = harness.service.settings.data_dir / "blobs"
    before = sorted(p.name for p in blobs.rglob("*") if p.is_file())
    # The ledger stores at most 2**40 - 1 samples, so no such commitment exists ...
    with pytest.raises(ContractRevert) as refused:
        harness.make_upload(harness.orgs[0], num_samples=2**63 + 5)
    assert refused.value.error == "ValueOutOfRange"
    # ... and the coordinator refuses the count before it reads the chain or writes anything.
    upload = harness.make_upload(harness.orgs[0], num_samples=2**63 + 5, commit=False)
    again = harness.make_upload(harness.orgs[1], num_samples=100)
    response = harness.post(upload)
    assert response.status_code == 422 and response.json()["code"] == "too_many_samples"
    assert sorted(p.name for p in blobs.rglob("*") if p.is_file()) == before  # no orphan blob
    # The next upload on the same connection is taken as usual.
    assert harness.post(again).status_code == 201


def test_an_error_answer_is_bounded_whatever_its_message() -> None:
    """A refusal that would repeat a huge input (a message naming 400,000 tensors, a detail
    list as long) is cut to a bounded answer that says how much was left out."""
    import json

    from fedledger.coordinator.api import MAX_MESSAGE_CHARS, _error

    names = [f"tensor {k}" * 10 for k in range(400_000)]
    response = _error(422, "tensor_mismatch", "; ".join(names), names=names, note="x" * 10_000)
    body = json.loads(bytes(response.body))
    assert len(response.body) < 2 * MAX_MESSAGE_CHARS + 10_000
    assert body["message"].startswith("tensor 0tensor 0")
    assert body["message"].endswith("more characters)")
    assert body["details"]["names"][-1] == f"... ({400_000 - 20} more)"
    assert body["details"]["note"].endswith("(9800 more characters)")

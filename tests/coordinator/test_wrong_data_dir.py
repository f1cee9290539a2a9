"""A coordinator started on a data directory from another chain or ledger refuses to run,
naming the first round that differs, instead of reporting the old rounds as this ledger's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedledger.coordinator.service import RoundService
from fedledger.errors import CoordinatorError, ErrorCode
from harness import Harness


def _settle_round_one(harness: Harness) -> None:
    uploads = [harness.make_upload(org, seed=k) for k, org in enumerate(harness.orgs)]
    for upload in uploads:
        assert harness.post(upload).status_code == 201  # type: ignore[attr-defined]
    harness.service.step()
    assert harness.member_result(1)["status"] == "finalized"


def _start_on(other: Harness, data_dir: Path) -> CoordinatorError:
    """Start a second coordinator on ``other``'s ledger (round 1 open there) and ``data_dir``."""
    service = RoundService(
        other.service.settings.model_copy(update={"data_dir": data_dir}),
        other.service.ledger,
        clock=lambda: other.clock[0],
    )
    with pytest.raises(CoordinatorError) as refused:
        service.start(background=False)
    assert refused.value.code == ErrorCode.WRONG_DATA_DIR
    return refused.value


def test_an_empty_ledger_refuses_a_data_directory_with_rounds(
    make_harness: Callable[..., Harness],
) -> None:
    first = make_harness()
    first.service.stop()
    with pytest.raises(CoordinatorError) as refused:
        make_harness(data_dir=first.service.settings.data_dir)  # a fresh chain, no round yet
    assert refused.value.code == ErrorCode.WRONG_DATA_DIR
    assert "has round 1 but ledger" in str(refused.value)
    assert "opened only 0 round(s)" in str(refused.value)


def test_a_round_this_ledger_never_opened_is_named(make_harness: Callable[..., Harness]) -> None:
    first, other = make_harness(), make_harness()
    _settle_round_one(first)
    first.service.step()  # round 2 opens, on the first chain only
    first.service.stop()
    refused = _start_on(other, first.service.settings.data_dir)
    assert "has round 2 but ledger" in str(refused)
    assert "opened only 1 round(s)" in str(refused)


def test_a_settled_round_the_ledger_does_not_record_is_named(
    make_harness: Callable[..., Harness],
) -> None:
    first, other = make_harness(), make_harness()  # the same initial model on both chains
    _settle_round_one(first)
    new_model = first.member_result(1)["new_model_hash"]
    first.service.stop()
    message = str(_start_on(other, first.service.settings.data_dir))
    assert "round 1 of" in message and "settled it with model" in message
    assert new_model in message
    assert "0x" + "00" * 32 in message  # the other ledger's round 1 is still open

"""The books closed in a process of their own (``--books-process``): the same books as in the
coordinator's process, the valuation's progress passed on, the child's errors with their codes,
and a child that dies failing that try only: the next one starts a fresh child."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedledger.coordinator import books_process
from fedledger.coordinator.audit import audit_round
from fedledger.coordinator.books import Books, close_books
from fedledger.coordinator.books_process import BooksProcess
from fedledger.coordinator.inputs import load_round_inputs
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.failpoints import BOOKS_BEFORE_ANSWER, ENV_VAR
from harness import Harness


def _closed_round(make_harness: Callable[..., Harness]) -> Harness:
    """Round 1 with every member's upload, closed by the books process."""
    harness = make_harness(books_process="on")
    for upload in [
        harness.make_upload(org, harness.trained_delta(k), num_samples=50 * (k + 1))
        for k, org in enumerate(harness.orgs)
    ]:
        assert harness.post(upload).status_code == 201  # type: ignore[attr-defined]
    harness.service.step()
    assert harness.client.get("/v1/rounds/1").json()["status"] == "finalized"
    return harness


def _process(harness: Harness) -> BooksProcess:
    process = harness.service.machine.books_process
    assert process is not None
    return process


def _in_this_process(harness: Harness, round_id: int) -> Books:
    machine = harness.service.machine
    inputs = load_round_inputs(
        machine.store,
        round_id,
        machine.ledger.commit_order(round_id),
        machine.game.model,
        machine.game.x_val,
        machine.game.y_val,
        machine.game.codec,
    )
    return close_books(inputs, harness.service.settings.pricing, device=machine.device)


def _assert_same(a: Books, b: Books) -> None:
    assert a.organisations == b.organisations
    assert a.values == b.values and a.errors == b.errors
    assert a.scores == b.scores and a.rewards == b.rewards and a.flags == b.flags
    assert a.new_hash == b.new_hash and a.new_bytes == b.new_bytes
    assert a.method == b.method and a.evaluations == b.evaluations


class _Progress(list[tuple[int, int]]):
    def __call__(self, done: int, total: int) -> None:
        self.append((done, total))


def test_a_round_closed_in_its_own_process_is_the_one_the_audit_recomputes(
    make_harness: Callable[..., Harness],
) -> None:
    harness = _closed_round(make_harness)
    process = _process(harness)
    assert process.pid is not None and process.pid != os.getpid()
    # The audit recomputes the books in its own process from the data directory and the chain:
    # the scores, rewards and new model the child settled are the ones it gets.
    report = audit_round(1, harness.ledger, harness.service.settings.data_dir)
    assert report.ok, report.mismatches
    progress = _Progress()
    again = process.close_books(1, harness.ledger.commit_order(1), progress)
    _assert_same(again, _in_this_process(harness, 1))
    assert sum(again.rewards) > 0
    # The valuation's progress comes back from the child as it goes.
    assert progress, "no progress was passed on"
    assert progress[-1][0] == progress[-1][1] > 0  # every coalition asked for was scored
    assert again.evaluations >= progress[-1][1]


def test_errors_in_the_child_keep_their_code_and_a_child_that_dies_is_replaced(
    make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = _closed_round(make_harness)
    process = _process(harness)
    order = harness.ledger.commit_order(1)
    first = process.pid
    assert first is not None
    with pytest.raises(CoordinatorError) as raised:
        process.close_books(99, [])
    assert raised.value.code == ErrorCode.MISSING_ROUND
    assert "round 99 is not in the store" in str(raised.value)
    assert any("in the books process" in note for note in raised.value.__notes__)
    assert process.pid == first  # an error is an answer: the child lives on
    # Killed between rounds; the next child dies where it would have answered (a failpoint
    # read from the environment it is spawned with). That try fails, with the exit's cause.
    os.kill(first, signal.SIGKILL)
    monkeypatch.setenv(ENV_VAR, BOOKS_BEFORE_ANSWER)
    with pytest.raises(CoordinatorError) as raised:
        process.close_books(1, order)
    assert raised.value.code == ErrorCode.BOOKS_PROCESS_FAILED
    assert "SIGKILL" in str(raised.value) and "a fresh one is started" in str(raised.value)
    monkeypatch.delenv(ENV_VAR)
    books = process.close_books(1, order)
    assert process.pid not in (None, first)
    _assert_same(books, _in_this_process(harness, 1))


def test_a_stopped_books_process_refuses_more_rounds(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(books_process="on")
    process = _process(harness)
    pid = process.pid
    assert pid is not None
    harness.service.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone: stop waited for it
    with pytest.raises(CoordinatorError) as raised:
        process.close_books(1, harness.ledger.commit_order(1))
    assert raised.value.code == ErrorCode.BOOKS_PROCESS_FAILED
    assert "stopped with the service" in str(raised.value)


def test_auto_gives_large_models_on_a_multi_core_cpu_their_own_process() -> None:
    small = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    large = nn.Sequential(nn.Linear(64, 2000), nn.ReLU(), nn.Linear(2000, 10))
    cpu = torch.device("cpu")
    assert sum(p.numel() for p in large.parameters()) >= books_process.MIN_PARAMS
    assert not books_process.wanted("auto", small, cpu)
    assert books_process.wanted("auto", large, cpu) == (torch.get_num_threads() > 1)
    assert not books_process.wanted("auto", large, torch.device("cuda"))
    assert books_process.wanted("on", small, cpu) and not books_process.wanted("off", large, cpu)


def test_the_coordinator_closes_small_models_books_in_its_own_process_by_default(
    make_harness: Callable[..., Harness],
) -> None:
    assert make_harness().service.machine.books_process is None

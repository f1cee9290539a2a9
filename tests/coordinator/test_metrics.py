"""GET /metrics: what a Prometheus scraper reads after real rounds on the in-process chain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from fedledger.errors import ContractRevert
from fedledger.incentive.onchain import TOKEN_UNIT
from harness import Harness

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(harness: Harness) -> tuple[Samples, str]:
    """Every sample ``GET /metrics`` answers, by name and labels, and the raw text."""
    response = harness.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, response.text


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a KeyError if the coordinator does not export it."""
    return samples[(name, frozenset(labels.items()))]


def test_metrics_count_a_settled_round_its_uploads_chain_calls_and_payout(
    harness: Harness,
) -> None:
    before, _ = scrape(harness)
    assert sample(before, "fedledger_current_round") == 1
    assert sample(before, "fedledger_rounds_ended_total", outcome="settled") == 0
    assert sample(before, "fedledger_chain_calls_total", function="openRound", outcome="ok") == 1

    refused = harness.post(
        harness.make_upload(harness.outsider, commit=False), wait_for_commits=False
    )
    code = refused.json()["code"]  # type: ignore[attr-defined]
    assert code == "unregistered_signer"
    uploads = [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs)
    ]
    for upload in uploads:
        assert harness.post(upload).status_code == 201  # type: ignore[attr-defined]
    assert harness.post(uploads[0]).status_code == 200  # type: ignore[attr-defined]
    harness.service.step()  # all in: close, value, settle
    assert harness.member_result(1)["status"] == "finalized"

    samples, text = scrape(harness)
    assert sample(samples, "fedledger_rounds_ended_total", outcome="settled") == 1
    assert sample(samples, "fedledger_rounds_ended_total", outcome="failed") == 0
    nodes = len(harness.orgs)
    assert sample(samples, "fedledger_uploads_total", result="accepted", code="") == nodes
    assert sample(samples, "fedledger_uploads_total", result="duplicate", code="") == 1
    assert sample(samples, "fedledger_uploads_total", result="refused", code=code) == 1
    assert sample(samples, "fedledger_upload_seconds_count", result="accepted") == nodes
    assert sample(samples, "fedledger_upload_seconds_count", result="refused") == 1
    assert (
        sample(samples, "fedledger_chain_calls_total", function="finalizeRound", outcome="ok") == 1
    )
    assert sample(samples, "fedledger_chain_call_seconds_count", function="finalizeRound") == 1
    assert sample(samples, "fedledger_round_close_seconds_count") == 1
    assert sample(samples, "fedledger_round_valuation_seconds_count") == 1
    paid = harness.ledger.get_round(1).total_reward
    assert paid > 0
    assert paid == sum(harness.ledger.balance_of(o.address) for o in harness.orgs)
    assert sample(samples, "fedledger_tokens_paid_total") == paid / TOKEN_UNIT
    # Public like /v1/health: nothing names an organisation.
    for org in [*harness.orgs, harness.outsider]:
        assert org.address.lower() not in text.lower()

    harness.service.step()  # round 2 opens
    after, _ = scrape(harness)
    assert sample(after, "fedledger_current_round") == 2
    assert sample(after, "fedledger_chain_calls_total", function="openRound", outcome="ok") == 2


def test_metrics_count_a_failed_round_without_payout(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(quorum=2)
    assert harness.post(harness.make_upload(harness.orgs[0])).status_code == 201  # type: ignore[attr-defined]
    harness.advance(601 + harness.service.settings.upload_grace_s)
    harness.service.step()
    assert harness.member_result(1)["status"] == "failed"
    samples, _ = scrape(harness)
    assert sample(samples, "fedledger_rounds_ended_total", outcome="failed") == 1
    assert sample(samples, "fedledger_rounds_ended_total", outcome="settled") == 0
    assert sample(samples, "fedledger_tokens_paid_total") == 0
    assert sample(samples, "fedledger_round_close_seconds_count") == 1
    assert sample(samples, "fedledger_round_valuation_seconds_count") == 0  # never priced


def test_apps_over_different_services_keep_their_own_metrics(
    make_harness: Callable[..., Harness],
) -> None:
    first, second = make_harness(), make_harness()
    assert first.post(first.make_upload(first.orgs[0])).status_code == 201  # type: ignore[attr-defined]
    one, _ = scrape(first)
    other, _ = scrape(second)
    assert sample(one, "fedledger_uploads_total", result="accepted", code="") == 1
    assert sample(other, "fedledger_uploads_total", result="accepted", code="") == 0


def test_the_ledger_client_tells_its_observer_of_every_call(harness: Harness) -> None:
    seen: list[tuple[str, float, bool]] = []

    def on_call(function: str, seconds: float, ok: bool) -> None:
        seen.append((function, seconds, ok))

    observed = harness.ledger.observed(on_call)
    assert observed.round_count() == 1
    with pytest.raises(ContractRevert):  # not the coordinator: openRound reverts
        observed.with_account(harness.outsider).open_round(2, bytes(32), 2**40)
    assert [(function, ok) for function, _, ok in seen] == [
        ("roundCount", True),
        ("openRound", False),
    ]
    assert all(seconds >= 0 for _, seconds, _ in seen)
    harness.ledger.round_count()  # the unobserved client reports to nobody
    assert len(seen) == 2

"""The operator's line per round: one INFO record when a round settles or fails, with its figures."""

from __future__ import annotations

import logging

import pytest

from fedledger.coordinator.results import RoundSummary, round_summary, tokens_text
from fedledger.errors import ChainError
from fedledger.incentive.onchain import TOKEN_UNIT
from harness import Harness


def metric(harness: Harness, name: str, **labels: str) -> float:
    """One sample of ``GET /metrics``; a KeyError if the coordinator does not export it."""
    from prometheus_client.parser import text_string_to_metric_families

    text = harness.client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError((name, labels))


def round_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The per-round records: the coordinator's INFO records that carry a round's outcome."""
    return [
        r
        for r in caplog.records
        if r.name == "fedledger.coordinator"
        and r.levelno == logging.INFO
        and getattr(r, "outcome", None) is not None
    ]


def test_one_line_per_ended_round_with_its_figures(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedledger.coordinator")
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs)
    ]:
        response = harness.post(upload)
        assert response.status_code == 201  # type: ignore[attr-defined]
    harness.service.step()  # round 1 settles
    harness.service.step()  # round 2 opens; nobody uploads
    harness.advance_to(
        harness.ledger.get_round(2).deadline + harness.service.settings.upload_grace_s + 1
    )
    harness.service.step()  # round 2 fails: no quorum
    harness.service.step()  # round 3 opens: no line for that

    lines = round_lines(caplog)
    assert [(vars(r)["round_id"], vars(r)["outcome"]) for r in lines] == [
        (1, "settled"),
        (2, "failed"),
    ]
    settled, failed = (vars(r) for r in lines)
    result = harness.member_result(1)
    paid = harness.ledger.get_round(1).total_reward
    assert paid > 0
    assert settled["committed"] == settled["uploaded"] == settled["organisations"] == 3
    assert settled["aggregated"] == sum(o["aggregated"] for o in result["organisations"]) == 3
    assert settled["metrics"] == result["validation_metrics"] != {}
    assert settled["paid_units"] == str(paid)
    assert settled["flags"] == {} and settled["reason"] is None
    message = lines[0].getMessage()
    assert message.startswith(
        "round 1 settled: 3 committed, 3 uploaded, 3 aggregated of 3 organisations; "
    )
    assert f"paid {tokens_text(paid)} FLR ({paid} units); flags none" in message
    assert f"accuracy {result['validation_metrics']['accuracy']:.4f}" in message

    assert failed["committed"] == failed["uploaded"] == failed["aggregated"] == 0
    assert failed["paid_units"] == "0"
    assert failed["reason"].startswith("quorum not met: 0 of 1 required uploads")
    assert harness.member_result(2)["reason"] == failed["reason"]
    assert lines[1].getMessage().endswith(f"; reason: {failed['reason']}")


def test_a_flagged_update_is_counted_by_flag_name(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedledger.coordinator")
    honest = [harness.trained_delta(k) for k in range(2)]
    copied = {name: 3.0 * t for name, t in honest[0].items()}
    harness.round_with_cheat(1, [*honest, copied], "rescaled copy")
    (line,) = round_lines(caplog)
    assert vars(line)["flags"] == {"copied_update": 1}
    assert vars(line)["aggregated"] == 2 and vars(line)["uploaded"] == 3
    assert "flags copied_update=1" in line.getMessage()
    assert metric(harness, "fedledger_flags_total", flag="copied_update") == 1


def test_a_close_redone_after_the_settlement_was_sent_logs_and_counts_once(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver retries a close that failed after finalizeRound went out: the chain has the
    settlement, the store records it on the retry, and the round is reported once."""
    caplog.set_level(logging.INFO, logger="fedledger.coordinator")
    settler = harness.service.machine.settler
    real_settle = settler.settle
    sent: list[str | None] = []

    def lost_after_sending(*args: object, **kwargs: object) -> str | None:
        tx = real_settle(*args, **kwargs)  # type: ignore[arg-type]
        sent.append(tx)
        if len(sent) == 1:
            raise ChainError("connection lost after sending finalizeRound")
        return tx

    monkeypatch.setattr(settler, "settle", lost_after_sending)
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs)
    ]:
        response = harness.post(upload)
        assert response.status_code == 201  # type: ignore[attr-defined]
    with pytest.raises(ChainError):
        harness.service.step()
    assert round_lines(caplog) == []
    harness.service.step()  # the retry: already finalized on-chain, recorded now
    assert sent[0] is not None and sent[1] is None  # sent once
    (line,) = round_lines(caplog)
    paid = harness.ledger.get_round(1).total_reward
    assert vars(line)["outcome"] == "settled" and vars(line)["paid_units"] == str(paid)
    assert metric(harness, "fedledger_rounds_ended_total", outcome="settled") == 1
    assert metric(harness, "fedledger_tokens_paid_total") == paid / TOKEN_UNIT
    assert metric(harness, "fedledger_round_close_seconds_count") == 1


def test_a_round_still_open_has_no_summary(harness: Harness) -> None:
    with pytest.raises(ValueError, match="has not ended"):
        round_summary(harness.service.round_result(1), committed=0)


def test_token_amounts_are_exact_decimals() -> None:
    assert tokens_text(0) == "0"
    assert tokens_text(12 * TOKEN_UNIT + TOKEN_UNIT // 2) == "12.5"
    assert tokens_text(1) == "0.000000000000000001"
    summary = RoundSummary(
        round_id=7, outcome="settled", organisations=2, committed=2, uploaded=2, aggregated=2
    )
    assert summary.fields()["paid_units"] == "0"
    assert "no metrics" in summary.message()

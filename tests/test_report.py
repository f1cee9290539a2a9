"""``fedledger report``: charts and a summary of a real run, the ledger's numbers and the API's
metrics, and the chain alone when no coordinator answers."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.image import imread
from typer.testing import CliRunner

from fedledger.coordinator.api import create_app
from fedledger.demo import serve_in_thread
from fedledger.devnet.anvil import free_port
from fedledger.incentive.ledger import RetirementRecord
from fedledger.incentive.onchain import TOKEN_UNIT, from_fixed_point
from fedledger.node.client import CoordinatorClient
from fedledger.report import (
    MetricsUnavailable,
    RunMetrics,
    organisation_totals,
    percent_shares,
    read_metrics,
    short_address,
    summary_markdown,
    tokens_text,
    write_report,
)
from fedledger.runlog import LedgerLog, LedgerRound, RewardRow, read_ledger
from harness import Harness

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _three_rounds(make_harness: Callable[..., Harness]) -> Harness:
    """Round 1: three honest updates. Round 2: two, and organisation 2's zero update (flagged
    zero_update, unpaid). Round 3: one upload against a quorum of two, so it fails."""
    harness = make_harness(quorum=2)
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k), num_samples=50 * (k + 1))
        for k, org in enumerate(harness.orgs)
    ]:
        assert harness.post(upload).status_code == 201
    harness.service.step()  # closes round 1
    harness.service.step()  # opens round 2
    model = harness.model(harness.client.get("/v1/rounds/current").json()["model_hash"])
    zero = {name: torch.zeros_like(t) for name, t in model.items()}
    uploads = [harness.trained_delta(0, model), harness.trained_delta(1, model), zero]
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, tensors, num_samples=50)
        for org, tensors in zip(harness.orgs, uploads, strict=True)
    ]:
        assert harness.post(upload).status_code == 201
    harness.service.step()  # closes round 2
    harness.service.step()  # opens round 3
    assert harness.post(harness.make_upload(harness.orgs[0])).status_code == 201
    harness.advance(harness.service.settings.round_timeout_s + 60)
    harness.service.step()  # the deadline short of the quorum: round 3 fails
    return harness


def _table(summary: str, heading: str) -> list[list[str]]:
    """The body rows of the Markdown table under ``heading``, cell by cell."""
    section = summary.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width, *_ = imread(path).shape
    assert height > 100 and width > 100, path


def _assert_organisations_are_the_ledgers(summary: str, harness: Harness) -> list[list[str]]:
    rows = _table(summary, "Organisations")
    assert [row[0] for row in rows] == [f"`{a}`" for a in harness.ledger.organisations()]
    for row in rows:
        address = row[0].strip("`")
        assert Decimal(row[1]) * TOKEN_UNIT == harness.ledger.total_reward_of(address) > 0
        summed = sum(harness.ledger.score_of(r, address) for r in range(1, 4))
        assert row[3] == f"{from_fixed_point(summed):+.6f}"
    assert sum(Decimal(row[2].removesuffix("%")) for row in rows) == Decimal("100.00")
    return rows


@pytest.mark.slow
def test_the_report_is_the_ledgers_numbers_and_the_apis_metrics(
    make_harness: Callable[..., Harness], tmp_path: Path
) -> None:
    harness = _three_rounds(make_harness)
    with (
        serve_in_thread(create_app(harness.service)) as url,
        CoordinatorClient(url) as client,
    ):
        log = read_ledger(harness.ledger)
        metrics = read_metrics(client, log)
        api = {r: client.round_result(r) for r in range(1, 4)}
    assert isinstance(metrics, RunMetrics), metrics
    written = write_report(tmp_path / "report", log, metrics)

    # The metrics are the API's, for the rounds that made a model (not the failed one).
    assert [api[r].status.value for r in (1, 2, 3)] == ["finalized", "finalized", "failed"]
    assert set(metrics.by_round) == {1, 2}
    for r in (1, 2):
        assert api[r].validation_metrics  # the digits spec reports neg_log_loss and accuracy
        assert metrics.by_round[r] == dict(api[r].validation_metrics)
    names = list(api[1].validation_metrics)
    assert "accuracy" in names

    # One chart per metric, the shares and the contributions, then the summary.
    out = tmp_path / "report"
    charts = [f"{name}.png" for name in names] + ["reward_shares.png", "contributions.png"]
    assert [p.name for p in written] == [*charts, "summary.md"]
    for chart in charts:
        _assert_png(out / chart)

    summary = (out / "summary.md").read_text()
    assert f"`{harness.ledger.address}` on chain {harness.ledger.chain_id()}" in summary
    assert "3 on the ledger; 2 settled, 1 failed, 0 open" in summary
    final = ", ".join(f"{n} {v:.4f}" for n, v in api[2].validation_metrics.items())
    assert f"Final validation metrics (round 2): {final}" in summary
    assert "not available" not in summary
    for chart in charts:
        assert f"]({chart})" in summary

    rows = _assert_organisations_are_the_ledgers(summary, harness)
    flagged = {row[0].strip("`"): row[4] for row in rows}
    assert flagged == {
        harness.orgs[0].address: "-",
        harness.orgs[1].address: "-",
        harness.orgs[2].address: "2 (zero_update)",
    }
    assert len(rows[0]) == 5  # no DP in the task: no epsilon column

    # Round by round: the state, what the ledger paid, and each metric as the API gave it.
    rounds = _table(summary, "Rounds")
    assert [row[:2] for row in rounds] == [["1", "settled"], ["2", "settled"], ["3", "failed"]]
    for row, r in zip(rounds, (1, 2, 3), strict=True):
        assert Decimal(row[2]) * TOKEN_UNIT == harness.ledger.get_round(r).total_reward
        expected = [f"{api[r].validation_metrics[n]:.4f}" for n in names] if r < 3 else ["-"] * 2
        assert row[3:] == expected


def test_without_a_coordinator_the_report_comes_from_the_chain_alone(
    make_harness: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = make_harness()
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs)
    ]:
        assert harness.post(upload).status_code == 201
    harness.service.step()
    monkeypatch.setattr("fedledger.cli._ledger", lambda *_: (harness.ledger, None))
    from fedledger.cli import app

    out = tmp_path / "report"
    nobody = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["report", "--out", str(out), "--coordinator", nobody])

    assert result.exit_code == 0, result.output
    assert "Validation metrics not available" in result.output
    assert f"written to {out}" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "contributions.png",
        "reward_shares.png",
        "summary.md",
    ]
    for chart in ("contributions.png", "reward_shares.png"):
        _assert_png(out / chart)
    summary = (out / "summary.md").read_text()
    line = re.search(r"^- \*\*(Validation metrics not available: .*)\*\*$", summary, re.M)
    assert line is not None and nobody in line.group(1)
    assert "1 on the ledger; 1 settled, 0 failed, 0 open" in summary
    rows = _table(summary, "Organisations")
    for row in rows:
        address = row[0].strip("`")
        assert Decimal(row[1]) * TOKEN_UNIT == harness.ledger.total_reward_of(address) > 0
    assert sum(Decimal(row[2].removesuffix("%")) for row in rows) == Decimal("100.00")
    paid = tokens_text(harness.ledger.get_round(1).total_reward)
    assert _table(summary, "Rounds") == [["1", "settled", paid]]  # no metric columns


def test_a_coordinator_of_another_ledger_gives_no_metrics() -> None:
    log = LedgerLog("0x" + "11" * 20, 31337, [], [], {}, {}, {})
    health = {
        "status": "ok",
        "chain_id": 31337,
        "ledger": "0x" + "22" * 20,
        "round_id": 1,
        "training": "running",
    }
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json=health))
    with CoordinatorClient("http://127.0.0.1:1", transport=transport) as client:
        metrics = read_metrics(client, log)
    assert isinstance(metrics, MetricsUnavailable)
    assert f"serves ledger {health['ledger']}, not {log.ledger}" in metrics.line


def _row(round_id: int, organisation: str, reward: int, epsilon: float | None) -> RewardRow:
    return RewardRow(
        round=round_id, state="finalized", settlement="direct", organisation=organisation,
        committed="0x" + "ab" * 32, settled=True, payment="paid", score="10", value=1e-17,
        reward=str(reward), reward_tokens=reward / TOKEN_UNIT, flags=[], epsilon=epsilon,
    )  # fmt: skip


def test_with_dp_the_summary_gives_each_organisations_epsilon_spent() -> None:
    a, b, c = ("0x" + digit * 40 for digit in "abc")
    rows = [_row(1, a, 2, 0.5), _row(1, b, 1, 0.7), _row(1, c, 0, None)]
    rows += [_row(2, a, 5, 1.25), _row(2, b, 0, None), _row(2, c, 0, None)]
    log = LedgerLog(
        ledger="0x" + "11" * 20,
        chain_id=1,
        rounds=[LedgerRound(1, "finalized", False, 3), LedgerRound(2, "finalized", False, 5)],
        rows=rows,
        balances={a: 7, b: 1, c: 0},
        total_rewards={a: 7, b: 1, c: 0},
        retired={b: RetirementRecord(since_round=2, epsilon=0.9)},
    )
    unavailable = MetricsUnavailable("http://127.0.0.1:1", "down")
    summary = summary_markdown(log, unavailable, organisation_totals(log), [])
    section = summary.split("## Organisations\n", 1)[1].split("\n## ", 1)[0]
    assert "| epsilon spent |" in section
    epsilons = {row[0].strip("`"): row[5] for row in _table(summary, "Organisations")}
    # The latest spent (epsilons only grow), the one retired with, none without DP.
    assert epsilons == {a: "1.250", b: "0.900", c: "-"}
    shares = [row[2] for row in _table(summary, "Organisations")]
    assert shares == ["87.50%", "12.50%", "0.00%"]
    assert f"Rewards paid: {tokens_text(8)} FLR in all" in summary
    assert f"- **{unavailable.line}**" in summary


@given(st.lists(st.integers(min_value=0, max_value=10**24), min_size=1, max_size=12))
def test_shares_add_up_to_exactly_100_and_each_is_within_a_step(amounts: list[int]) -> None:
    shares = [Decimal(s) for s in percent_shares(amounts)]
    total = sum(amounts)
    if total == 0:
        assert shares == [0] * len(amounts)
        return
    assert sum(shares) == 100
    for share, amount in zip(shares, amounts, strict=True):
        assert abs(share - Decimal(amount) * 100 / Decimal(total)) < Decimal("0.01")


def test_addresses_are_shortened_to_their_ends() -> None:
    address = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"
    assert short_address(address) == "0x15d3…6A65"

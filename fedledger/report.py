"""A run's report: PNG charts and a Markdown summary, built from the ledger's record and the coordinator's metrics."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedledger import wire
from fedledger.errors import NodeError, SetupError
from fedledger.incentive.onchain import TOKEN_UNIT, from_fixed_point
from fedledger.runlog import LedgerLog

if TYPE_CHECKING:
    from fedledger.node.client import CoordinatorClient

SUMMARY = "summary.md"
REWARD_SHARES = "reward_shares.png"
CONTRIBUTIONS = "contributions.png"
SHARE_PLACES = 2
"""Decimal places of the reward shares in the summary (percent); they sum to exactly 100."""


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class RunMetrics:
    """The global model's validation metrics after each round, as the coordinator reports them."""

    source: str  # the coordinator's URL
    by_round: dict[int, dict[str, float]]  # rounds that made a new model; a failed one did not

    @property
    def names(self) -> list[str]:
        """Every metric reported, in the order the coordinator lists them."""
        return list(dict.fromkeys(name for m in self.by_round.values() for name in m))


@dataclass(frozen=True)
class MetricsUnavailable:
    """Why a report has no validation metrics: it was written from the chain alone."""

    source: str  # the coordinator's URL
    reason: str

    @property
    def line(self) -> str:
        """The sentence the summary and the console give."""
        return (
            f"Validation metrics not available: {self.reason}; this report is written from "
            "the chain alone."
        )


@dataclass(frozen=True)
class OrganisationTotals:
    """One organisation over the whole run, from the ledger."""

    address: str
    reward: int  # totalRewardOf, in token units
    share: Fraction  # its part of all the rewards paid (0 when none were paid)
    score: int  # its scores (scoreOf) summed over the rounds, fixed point (1e18 = 1.0)
    flagged: list[tuple[int, list[str]]]  # (round, flag names) of each round it was flagged in
    epsilon: float | None  # the DP-SGD epsilon it has spent (None: no DP)


# ----------------------------------------------------------------------- pure parts


def short_address(address: str) -> str:
    """``0x1234…abcd``: an address short enough for a chart's axis."""
    return f"{address[:6]}…{address[-4:]}"


def tokens_text(units: int) -> str:
    """Token units as an exact decimal number of tokens (18 decimals), e.g. ``12.5``."""
    whole, fraction = divmod(units, TOKEN_UNIT)
    return f"{whole}.{fraction:018d}".rstrip("0").rstrip(".")


def percent_shares(amounts: list[int], places: int = SHARE_PLACES) -> list[str]:
    """Each amount's percentage of their sum, to ``places`` decimals, rounded by largest
    remainder (Hamilton's method) so that the shares written add up to exactly 100; all zero
    when the sum is."""
    total = sum(amounts)
    steps = 100 * 10**places  # 100% in steps of the last decimal place
    if total == 0:
        return [_fixed(0, places) for _ in amounts]
    quotas = [Fraction(a * steps, total) for a in amounts]
    floors = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(amounts)), key=lambda i: (floors[i] - quotas[i], i))
    for i in by_remainder[: steps - sum(floors)]:
        floors[i] += 1
    return [_fixed(f, places) for f in floors]


def _fixed(steps: int, places: int) -> str:
    whole, part = divmod(steps, 10**places)
    return f"{whole}.{part:0{places}d}" if places else str(whole)


def organisation_totals(log: LedgerLog) -> list[OrganisationTotals]:
    """Each organisation's rewards, share of them, summed score, flags and epsilon spent."""
    paid = sum(log.total_rewards.values())
    totals = []
    for address in log.organisations:
        rows = [row for row in log.rows if row.organisation == address]
        epsilons = [row.epsilon for row in rows if row.epsilon is not None]
        retired = log.retired.get(address)
        if retired is not None and retired.epsilon is not None:
            epsilons.append(retired.epsilon)
        reward = log.total_rewards[address]
        totals.append(
            OrganisationTotals(
                address=address,
                reward=reward,
                share=Fraction(reward, paid) if paid else Fraction(0),
                score=sum(int(row.score) for row in rows),
                flagged=[(row.round, row.flags) for row in rows if row.flags],
                epsilon=max(epsilons) if epsilons else None,  # spent so far: it only grows
            )
        )
    return totals


def metric_file(metric: str) -> str:
    """The chart file of a validation metric, named after it (``accuracy.png``)."""
    return re.sub(r"[^a-z0-9_]+", "_", metric.lower()).strip("_") + ".png"


def _round_axes(figure: Figure, title: str, ylabel: str) -> Axes:
    ax = figure.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return ax


def _mark_rounds(ax: Axes, log: LedgerLog) -> None:
    """Every round of the ledger on the x axis, failed ones shaded."""
    for i, r in enumerate(r for r in log.rounds if r.failed):
        ax.axvspan(
            r.round_id - 0.5, r.round_id + 0.5, color="0.85", label=None if i else "failed round"
        )
    if log.rounds:
        ax.set_xlim(0.5, len(log.rounds) + 0.5)


def metric_figure(metric: str, log: LedgerLog, metrics: RunMetrics) -> Figure:
    """The global model's ``metric`` on the validation set after each round (none after a
    failed round: the model did not change)."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = _round_axes(figure, f"Global model: validation {metric}", metric)
    points = sorted((r, m[metric]) for r, m in metrics.by_round.items() if metric in m)
    ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=metric)
    _mark_rounds(ax, log)
    if any(r.failed for r in log.rounds):
        ax.legend(fontsize="small", loc="best")
    return figure


def reward_shares_figure(totals: list[OrganisationTotals]) -> Figure:
    """Each organisation's share of all the rewards paid, as bars labelled in percent."""
    figure = Figure(figsize=(max(5.0, 1.3 * len(totals) + 2), 4), layout="constrained")
    ax = figure.add_subplot()
    paid = sum(t.reward for t in totals)
    ax.set_title(
        f"Share of the rewards paid ({paid / TOKEN_UNIT:,.2f} FLR in all)"
        if paid
        else "Share of the rewards paid (none paid yet)"
    )
    ax.set_ylabel("share of all rewards (%)")
    shares = [float(t.share) * 100 for t in totals]
    bars = ax.bar([short_address(t.address) for t in totals], shares, color="tab:green")
    ax.bar_label(bars, labels=[f"{s:.1f}%" for s in shares], padding=2)
    ax.set_ylim(0, max([*shares, 1.0]) * 1.15)
    ax.tick_params(axis="x", labelrotation=30 if len(totals) > 4 else 0)
    return figure


def contributions_figure(log: LedgerLog) -> Figure:
    """Each organisation's Shapley score per round (where it was scored), flagged rounds
    marked with a red cross, failed rounds shaded."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = _round_axes(figure, "Shapley contribution per round (scoreOf)", "score")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    flagged: list[tuple[int, float]] = []
    for address in log.organisations:
        rows = [row for row in log.rows if row.organisation == address]
        values = [row.value if row.settled else math.nan for row in rows]  # nan: a gap
        ax.plot([row.round for row in rows], values, marker=".", label=short_address(address))
        flagged += [(row.round, row.value if row.settled else 0.0) for row in rows if row.flags]
    if flagged:
        ax.scatter(
            [r for r, _ in flagged],
            [v for _, v in flagged],
            marker="x",
            s=80,
            color="tab:red",
            zorder=3,
            label="flagged",
        )
    _mark_rounds(ax, log)
    if log.organisations:
        ax.legend(fontsize="small", loc="best")
    return figure


def final_metrics(metrics: RunMetrics) -> tuple[int, dict[str, float]] | None:
    """The last round that made a model, and its metrics (None before any did)."""
    if not metrics.by_round:
        return None
    last = max(metrics.by_round)
    return last, metrics.by_round[last]


def summary_markdown(
    log: LedgerLog,
    metrics: RunMetrics | MetricsUnavailable,
    totals: list[OrganisationTotals],
    images: list[str],
) -> str:
    """The summary: ledger, chain, rounds, final metrics, a table per organisation and per
    round (token amounts exact, in FLR), and the charts linked."""
    settled = sum(r.state == "finalized" and not r.failed for r in log.rounds)
    failed = sum(r.failed for r in log.rounds)
    paid = sum(log.total_rewards.values())
    lines = [
        "# fedledger run report",
        "",
        f"- Ledger: `{log.ledger}` on chain {log.chain_id}",
        f"- Rounds: {len(log.rounds)} on the ledger; {settled} settled, {failed} failed, "
        f"{len(log.rounds) - settled - failed} open",
        f"- Rewards paid: {tokens_text(paid)} FLR in all",
    ]
    if isinstance(metrics, MetricsUnavailable):
        lines.append(f"- **{metrics.line}**")
    elif (final := final_metrics(metrics)) is None:
        lines.append(f"- Validation metrics: no round has made a model yet ({metrics.source})")
    else:
        round_id, values = final
        shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
        lines.append(f"- Final validation metrics (round {round_id}): {shown} ({metrics.source})")

    lines += ["", "## Organisations", "", *_organisation_table(totals)]
    lines += ["", "## Rounds", "", *_round_table(log, metrics)]
    lines += ["", "## Charts", ""]
    lines += [f"![{Path(image).stem.replace('_', ' ')}]({image})" for image in images]
    return "\n".join(lines) + "\n"


def _organisation_table(totals: list[OrganisationTotals]) -> list[str]:
    private = any(t.epsilon is not None for t in totals)
    header = ["organisation", "total reward (FLR)", "share", "summed score", "rounds flagged"]
    header += ["epsilon spent"] if private else []
    lines = [_row(header), _rule(header, left=(0, 4))]
    for total, share in zip(totals, percent_shares([t.reward for t in totals]), strict=True):
        flagged = "; ".join(f"{r} ({', '.join(names)})" for r, names in total.flagged)
        cells = [
            f"`{total.address}`",
            tokens_text(total.reward),
            f"{share}%",
            f"{from_fixed_point(total.score):+.6f}",
            flagged or "-",
        ]
        if private:
            cells.append("-" if total.epsilon is None else f"{total.epsilon:.3f}")
        lines.append(_row(cells))
    return lines


def _round_table(log: LedgerLog, metrics: RunMetrics | MetricsUnavailable) -> list[str]:
    by_round = metrics.by_round if isinstance(metrics, RunMetrics) else {}
    names = metrics.names if isinstance(metrics, RunMetrics) else []
    header = ["round", "state", "paid (FLR)", *names]
    lines = [_row(header), _rule(header, left=(1,))]
    for r in log.rounds:
        state = "failed" if r.failed else ("settled" if r.state == "finalized" else r.state)
        values = by_round.get(r.round_id, {})
        cells = [f"{values[n]:.4f}" if n in values else "-" for n in names]
        lines.append(_row([str(r.round_id), state, tokens_text(r.total_reward), *cells]))
    return lines


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(header: list[str], left: tuple[int, ...]) -> str:
    return "|" + "|".join("---" if i in left else "---:" for i in range(len(header))) + "|"


# ------------------------------------------------------------------------- the edges


def read_metrics(client: CoordinatorClient, log: LedgerLog) -> RunMetrics | MetricsUnavailable:
    """Each settled round's validation metrics from the coordinator's API (``GET
    /v1/rounds/{id}``), or why there are none: it did not answer, or serves another ledger."""
    source = client.base_url
    try:
        health = client.health()
        if health.ledger.lower() != log.ledger.lower():
            return MetricsUnavailable(
                source,
                f"the coordinator at {source} serves ledger {health.ledger}, not {log.ledger}",
            )
        by_round: dict[int, dict[str, float]] = {}
        for r in log.rounds:
            if r.state != "finalized" or r.failed:
                continue
            result = client.round_result(r.round_id)
            if result.status != wire.RoundStatus.FINALIZED:
                continue
            values = dict(result.validation_metrics)
            if result.validation_accuracy is not None:  # a classification task's, always there
                values.setdefault("accuracy", result.validation_accuracy)
            by_round[r.round_id] = values
    except (NodeError, SetupError) as exc:
        return MetricsUnavailable(source, f"the coordinator at {source} did not answer ({exc})")
    return RunMetrics(source, by_round)


def save_png(figure: Figure, path: Path) -> None:
    """Render ``figure`` with the Agg backend (no display, no global pyplot state) to ``path``."""
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=120)


def write_report(out: Path, log: LedgerLog, metrics: RunMetrics | MetricsUnavailable) -> list[Path]:
    """Write the charts and ``summary.md`` into ``out`` (created); returns the files written,
    the summary last."""
    out.mkdir(parents=True, exist_ok=True)
    totals = organisation_totals(log)
    figures: dict[str, Figure] = {}
    if isinstance(metrics, RunMetrics):
        figures |= {metric_file(name): metric_figure(name, log, metrics) for name in metrics.names}
    figures[REWARD_SHARES] = reward_shares_figure(totals)
    figures[CONTRIBUTIONS] = contributions_figure(log)
    written = []
    for name, figure in figures.items():
        save_png(figure, out / name)
        written.append(out / name)
    summary = out / SUMMARY
    summary.write_text(summary_markdown(log, metrics, totals, list(figures)))
    written.append(summary)
    return written

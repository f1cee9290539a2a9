"""The coordinator's Prometheus metrics, in a registry of its own, and ``GET /metrics``.

Nothing here is labelled by organisation: the endpoint is public, like ``/v1/health``.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fedledger.coordinator.results import RoundSummary
from fedledger.errors import ErrorCode
from fedledger.incentive.onchain import TOKEN_UNIT

ROUND_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Histogram buckets for closing a round: valuing K updates may take from seconds to minutes."""


class CoordinatorMetrics:
    """Counters, gauges and histograms of one coordinator, kept in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rounds_ended = Counter(
            "fedledger_rounds_ended",
            "Rounds ended, by outcome: settled (a new model, rewards paid) or failed.",
            ["outcome"],
            registry=r,
        )
        self.current_round = Gauge(
            "fedledger_current_round",
            "The id of the latest round opened (0: none yet).",
            registry=r,
        )
        self.uploads = Counter(
            "fedledger_uploads",
            "Uploads handled, by result (accepted, duplicate, refused) and, when refused, the "
            "error code answered.",
            ["result", "code"],
            registry=r,
        )
        self.upload_seconds = Histogram(
            "fedledger_upload_seconds",
            "Time to verify and store an upload (after its body was read), by result.",
            ["result"],
            registry=r,
        )
        self.chain_calls = Counter(
            "fedledger_chain_calls",
            "Calls to the chain, by contract function (or JSON-RPC method) and outcome (ok, error).",
            ["function", "outcome"],
            registry=r,
        )
        self.chain_call_seconds = Histogram(
            "fedledger_chain_call_seconds",
            "Time a chain call took (a transaction until its receipt), by function.",
            ["function"],
            registry=r,
        )
        self.round_close_seconds = Histogram(
            "fedledger_round_close_seconds",
            "Time to close a round: load the updates, screen, value, aggregate, settle, record.",
            registry=r,
            buckets=ROUND_BUCKETS_S,
        )
        self.round_valuation_seconds = Histogram(
            "fedledger_round_valuation_seconds",
            "Time to close a round's books: screening, Shapley valuation and aggregation.",
            registry=r,
            buckets=ROUND_BUCKETS_S,
        )
        self.tokens_paid = Counter(
            "fedledger_tokens_paid",
            "Reward tokens (FLR) paid by settled rounds.",
            registry=r,
        )
        self.flags = Counter(
            "fedledger_flags",
            "Updates flagged, by flag name (one update may carry several).",
            ["flag"],
            registry=r,
        )
        # Series that exist from the start, at zero, so that rates work from the first scrape.
        for outcome in ("settled", "failed"):
            self.rounds_ended.labels(outcome=outcome)
        for result in ("accepted", "duplicate"):
            self.uploads.labels(result=result, code="")

    def upload_handled(self, *, created: bool, seconds: float) -> None:
        """An upload stored (``created``) or recognised as an identical re-upload."""
        result = "accepted" if created else "duplicate"
        self.uploads.labels(result=result, code="").inc()
        self.upload_seconds.labels(result=result).observe(seconds)

    def upload_refused(self, code: ErrorCode, *, seconds: float) -> None:
        """An upload refused with ``code``."""
        self.uploads.labels(result="refused", code=code.value).inc()
        self.upload_seconds.labels(result="refused").observe(seconds)

    def chain_call(self, function: str, seconds: float, ok: bool) -> None:
        """A chain call made by the coordinator's ledger client (its ``on_call`` observer)."""
        self.chain_calls.labels(function=function, outcome="ok" if ok else "error").inc()
        self.chain_call_seconds.labels(function=function).observe(seconds)

    def round_ended(self, summary: RoundSummary) -> None:
        """A round settled or failed: its outcome, payout and flags."""
        self.rounds_ended.labels(outcome=summary.outcome).inc()
        self.tokens_paid.inc(summary.paid_units / TOKEN_UNIT)
        for flag, count in summary.flags.items():
            self.flags.labels(flag=flag).inc(count)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)


def metrics_router(metrics: CoordinatorMetrics) -> APIRouter:
    """``GET /metrics``: ``metrics`` for a Prometheus scraper."""
    router = APIRouter()

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    def scrape() -> Response:
        """The coordinator's metrics in the Prometheus text format (nothing per organisation)."""
        return Response(content=metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router

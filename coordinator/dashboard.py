"""The operator's dashboard: the page at ``/dashboard``, its files and the public JSON it polls."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from fedledger import wire
from fedledger.coordinator.results import for_non_members
from fedledger.coordinator.service import RoundService
from fedledger.errors import CoordinatorError, ErrorCode

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The page and its script and style sheet (package data: installed with the package)."""

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
"""The files the page loads, by name, with their media types: nothing else is served."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page may load its own files and call this server, and nothing else."""

ENDED = (wire.RoundStatus.FINALIZED, wire.RoundStatus.FAILED)
"""A round's last statuses: its result never changes after."""


def _service(request: Request) -> RoundService:
    # As api.get_service (which cannot be imported here: api includes this router).
    service: RoundService = request.app.state.service
    return service


Service = Annotated[RoundService, Depends(_service)]

router = APIRouter()

_ended: weakref.WeakKeyDictionary[RoundService, dict[int, wire.RoundResult]] = (
    weakref.WeakKeyDictionary()
)
"""Public results of ended rounds, by service and round: they never change, and the page asks
for every round every few seconds."""


def public_results(service: RoundService) -> list[wire.RoundResult]:
    """Every round's result, oldest first, as a reader who is not a member sees it."""
    latest = service.store.latest_round()
    if latest is None:
        return []
    ended = _ended.setdefault(service, {})
    results: list[wire.RoundResult] = []
    for round_id in range(1, latest.round_id + 1):
        result = ended.get(round_id)
        if result is None:
            try:
                result = for_non_members(service.round_result(round_id))
            except CoordinatorError as exc:
                if exc.code != ErrorCode.UNKNOWN_ROUND:
                    raise
                continue  # not in this data directory: nothing to show
            if result.status in ENDED:
                ended[round_id] = result
        results.append(result)
    return results


def round_summary(result: wire.RoundResult) -> wire.RoundSummary:
    """A round's status, metrics and totals."""
    accepted = [o for o in result.organisations if o.status == wire.UploadStatus.ACCEPTED]
    return wire.RoundSummary(
        round_id=result.round_id,
        status=result.status,
        deadline=result.deadline,
        validation_metrics=result.validation_metrics,
        validation_gain=result.validation_gain,
        reason=result.reason,
        uploads=len(accepted),
        flagged=sum(1 for o in accepted if o.flags),
        total_reward=str(sum(int(o.reward) for o in accepted)),
        settlement=result.settlement,
    )


def dashboard_round(result: wire.RoundResult) -> wire.DashboardRound:
    """A round's summary with each organisation's public result."""
    return wire.DashboardRound(
        **round_summary(result).model_dump(), organisations=result.organisations
    )


def organisation_totals(results: Sequence[wire.RoundResult]) -> list[wire.OrganisationTotal]:
    """Each organisation's values, scores, rewards and flags summed over the finalized rounds
    of ``results``, the most epsilon it reported in any round; by address, case-blind."""
    totals: dict[str, wire.OrganisationTotal] = {}
    for result in results:
        for o in result.organisations:
            key = o.organisation.lower()
            total = totals.get(key) or wire.OrganisationTotal(organisation=o.organisation)
            update: dict[str, object] = {}
            if o.epsilon is not None and (total.epsilon is None or o.epsilon > total.epsilon):
                update["epsilon"] = o.epsilon
            if o.status == wire.UploadStatus.RETIRED:
                update["retired"] = True
            if result.status == wire.RoundStatus.FINALIZED:
                update["value"] = total.value + o.value
                update["score"] = str(int(total.score) + int(o.score))
                update["reward"] = str(int(total.reward) + int(o.reward))
                if o.flags:
                    update["rounds_flagged"] = total.rounds_flagged + 1
                    update["flag_reasons"] = [
                        *total.flag_reasons,
                        *(r for r in o.flag_reasons if r not in total.flag_reasons),
                    ]
            totals[key] = total.model_copy(update=update)
    return [totals[key] for key in sorted(totals)]


def _file(name: str, media_type: str) -> Response:
    return Response(
        content=(STATIC_DIR / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/dashboard", include_in_schema=False)
def page() -> Response:
    """The dashboard page (its script polls ``GET /v1/dashboard`` and ``GET /v1/health``)."""
    response = _file("dashboard.html", "text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@router.get("/dashboard/{name}", include_in_schema=False)
def page_file(name: str) -> Response:
    """The page's script or style sheet."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise CoordinatorError(ErrorCode.NOT_FOUND, f"the dashboard has no file {name!r}")
    return _file(name, media_type)


@router.get(f"{wire.API_PREFIX}/rounds", response_model=list[wire.RoundSummary])
def rounds(svc: Service) -> list[wire.RoundSummary]:
    """Every round so far, oldest first: status, deadline, the new model's validation metrics
    and what it paid and flagged."""
    return [round_summary(r) for r in public_results(svc)]


@router.get(f"{wire.API_PREFIX}/dashboard", response_model=wire.Dashboard)
def dashboard(svc: Service) -> wire.Dashboard:
    """Everything the dashboard shows but health: every round with each organisation's
    public result (no sample counts, norms or aggregation membership), and each organisation's
    totals over the finalized rounds. Reads the coordinator's records only, never the chain."""
    results = public_results(svc)
    privacy = svc.spec.privacy if svc.spec is not None else None
    return wire.Dashboard(
        task=svc.settings.pricing.task,
        metric=svc.settings.pricing.metric,
        total_rounds=svc.settings.total_rounds,
        training=svc.training_status(),
        epsilon_budget=privacy.epsilon if privacy is not None else None,
        rounds=[dashboard_round(r) for r in results],
        organisations=organisation_totals(results),
    )

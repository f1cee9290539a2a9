"""The dashboard's JSON (``/v1/rounds``, ``/v1/dashboard``), its files, and ``/docs`` served
from bundled files: public reads only, nothing fetched from another server."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from fedledger import wire
from fedledger.coordinator.dashboard import ASSETS, STATIC_DIR, organisation_totals
from harness import Harness

EXTERNAL = re.compile(r"https?://[^\s\"'`)<>]*", re.IGNORECASE)
NAMESPACES = {"http://www.w3.org/2000/svg"}
"""URLs that name an XML namespace (createElementNS): identifiers, never fetched."""


class _References(HTMLParser):
    """Every ``src`` and ``href`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]


def _references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


def _cheat_round(harness: Harness) -> None:
    """Round 1: organisations 0 and 1 honest, organisation 2 uploads 3 x organisation 0's
    update (flagged copied_update); round 2 opens and organisation 0 uploads to it."""
    honest = [harness.trained_delta(k) for k in range(2)]
    copied = {name: 3.0 * t for name, t in honest[0].items()}
    harness.round_with_cheat(1, [*honest, copied], "rescaled copy")
    harness.service.step()  # opens round 2
    assert harness.post(harness.make_upload(harness.orgs[0])).status_code == 201


def test_rounds_list_status_deadline_metrics_and_totals(harness: Harness) -> None:
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs[:2])
    ]:
        assert harness.post(upload).status_code == 201
    (open_round,) = harness.client.get("/v1/rounds").json()
    assert open_round == {
        "round_id": 1,
        "status": "open",
        "deadline": harness.service.current().deadline,
        "validation_metrics": {},
        "validation_gain": None,
        "reason": None,
        "uploads": 2,
        "flagged": 0,
        "total_reward": "0",
        "settlement": None,
    }
    settings = harness.service.settings
    harness.advance(settings.round_timeout_s + settings.upload_grace_s + 1)
    harness.service.step()  # the deadline: round 1 closes with two of three
    harness.service.step()  # round 2 opens
    first, second = harness.client.get("/v1/rounds").json()
    result = harness.client.get("/v1/rounds/1").json()
    assert first["status"] == "finalized" and second["status"] == "open"
    assert first["validation_metrics"] == result["validation_metrics"]
    assert set(first["validation_metrics"]) == {"neg_log_loss", "accuracy"}
    assert first["validation_gain"] == result["validation_gain"]
    assert int(first["total_reward"]) == harness.ledger.get_round(1).total_reward > 0
    assert first["uploads"] == 2 and first["settlement"] == "direct"
    assert second["uploads"] == 0 and second["deadline"] == harness.service.current().deadline


def test_dashboard_shows_what_anonymous_readers_see_and_sums_the_ledger(
    harness: Harness,
) -> None:
    _cheat_round(harness)
    # A member's signed read request changes nothing: the dashboard is public.
    anonymous_headers: dict[str, str] = {}
    for headers in (anonymous_headers, harness.read_headers()):
        response = harness.client.get("/v1/dashboard", headers=headers)
        assert response.status_code == 200, response.text
        board = response.json()
        for round_ in board["rounds"]:
            assert round_["organisations"], round_
            for org in round_["organisations"]:
                assert org["num_samples"] is None and org["norm"] is None
                assert org["aggregated"] is None
    anonymous = harness.client.get("/v1/rounds/1").json()
    assert board["rounds"][0]["organisations"] == anonymous["organisations"]
    assert board["task"] == "digits" and board["metric"] == "neg_log_loss"
    assert board["total_rounds"] == 3 and board["training"] == "running"
    assert board["epsilon_budget"] is None
    assert [(r["round_id"], r["status"], r["uploads"]) for r in board["rounds"]] == [
        (1, "finalized", 3),
        (2, "open", 1),
    ]
    assert board["rounds"][0]["flagged"] == 1

    totals = {t["organisation"]: t for t in board["organisations"]}
    assert sorted(totals) == sorted(o.address for o in harness.orgs)
    for org in harness.orgs:
        assert int(totals[org.address]["reward"]) == harness.ledger.total_reward_of(org.address)
        assert int(totals[org.address]["score"]) == harness.ledger.score_of(1, org.address)
    cheat = totals[harness.orgs[2].address]
    assert cheat["rounds_flagged"] == 1 and cheat["flag_reasons"] == ["copied_update"]
    assert cheat["reward"] == "0"
    assert all(totals[o.address]["rounds_flagged"] == 0 for o in harness.orgs[:2])


def test_an_ended_round_is_shown_as_it_ended(harness: Harness) -> None:
    """Ended rounds are kept between polls; an open one is read afresh each time."""
    assert harness.client.get("/v1/dashboard").json()["rounds"][0]["status"] == "open"
    # every member commits first: uploads wait for the commit phase to end
    for upload in [
        harness.make_upload(org, harness.trained_delta(k)) for k, org in enumerate(harness.orgs)
    ]:
        assert harness.post(upload).status_code == 201
    assert harness.client.get("/v1/dashboard").json()["rounds"][0]["uploads"] == 3
    harness.service.step()
    first = harness.client.get("/v1/dashboard").json()["rounds"][0]
    assert first["status"] == "finalized"
    again = harness.client.get("/v1/dashboard").json()["rounds"][0]
    assert again == first


def _round(
    round_id: int, status: wire.RoundStatus, *organisations: wire.OrganisationResult
) -> wire.RoundResult:
    return wire.RoundResult(
        round_id=round_id,
        status=status,
        model_hash="0x" + "00" * 32,
        deadline=1_000 * round_id,
        organisations=list(organisations),
    )


def _upload(organisation: str, **fields: object) -> wire.OrganisationResult:
    return wire.OrganisationResult.model_validate(
        {"organisation": organisation, "status": "accepted", **fields}
    )


def test_totals_count_finalized_rounds_and_keep_the_most_epsilon_spent() -> None:
    a = "0xAAAA000000000000000000000000000000000001"
    b = "0x0000000000000000000000000000000000000002"
    negative, zero = "negative_contribution", "zero_update"
    finalized, failed = wire.RoundStatus.FINALIZED, wire.RoundStatus.FAILED
    results = [
        _round(
            1,
            finalized,
            _upload(a, value=0.5, score=str(5 * 10**17), reward="7", epsilon=1.0),
            _upload(b, value=-0.25, score=str(-25 * 10**16), flags=4, flag_reasons=[negative]),
        ),
        # Failed: the coordinator's flags and values, nothing settled: not in the totals.
        _round(2, failed, _upload(a.lower(), flags=2, epsilon=2.0), _upload(b, epsilon=2.5)),
        _round(
            3,
            finalized,
            _upload(
                a,
                value=0.25,
                score=str(25 * 10**16),
                reward="5",
                epsilon=2.25,
                flags=5,
                flag_reasons=[zero, negative],
            ),
            _upload(b, status="retired", epsilon=3.0),
        ),
        _round(4, wire.RoundStatus.OPEN, _upload(a)),
    ]
    first, second = organisation_totals(results)
    assert first.organisation == b and second.organisation == a  # by address, case-blind
    assert (second.value, second.score, second.reward) == (0.75, str(75 * 10**16), "12")
    assert second.rounds_flagged == 1 and second.flag_reasons == [zero, negative]
    assert second.epsilon == 2.25 and not second.retired
    assert (first.value, first.score, first.reward) == (-0.25, str(-25 * 10**16), "0")
    assert first.rounds_flagged == 1 and first.flag_reasons == [negative]
    assert first.epsilon == 3.0 and first.retired


def test_the_page_loads_its_own_files_under_a_strict_policy(harness: Harness) -> None:
    page = harness.client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    loaded = [u for u in _references(page.text) if not u.startswith("data:")]
    assert "dashboard/dashboard.js" in loaded and "dashboard/dashboard.css" in loaded
    for url in loaded:  # relative: the page works under any prefix a proxy puts it behind
        assert not url.startswith(("/", "http:", "https:")), url
    for name, media_type in ASSETS.items():
        response = harness.client.get(f"/dashboard/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert response.content == (STATIC_DIR / name).read_bytes()
    for other in ("dashboard.html", "..%2Fapi.py", "secret.txt"):
        response = harness.client.get(f"/dashboard/{other}")
        assert (response.status_code, response.json()["code"]) == (404, "not_found")


def test_the_page_names_no_other_server() -> None:
    for name in ("dashboard.html", *ASSETS):
        text = (STATIC_DIR / name).read_text()
        assert set(EXTERNAL.findall(text)) <= NAMESPACES, name
        assert "@import" not in text and "url(" not in text, name


def test_docs_and_redoc_use_bundled_files(harness: Harness) -> None:
    for path in ("/docs", "/redoc"):
        html = harness.client.get(path)
        assert html.status_code == 200, path
        assert not EXTERNAL.findall(html.text), (path, EXTERNAL.findall(html.text))
        referenced = _references(html.text)
        assert referenced, path
        for url in referenced:
            assert url.startswith("/"), (path, url)
            response = harness.client.get(url)
            assert response.status_code == 200, url
            assert len(response.content) > 1000, url
    schema = harness.client.get("/openapi.json").json()
    assert {"/v1/rounds", "/v1/dashboard"} <= set(schema["paths"])
    assert "/dashboard" not in schema["paths"]

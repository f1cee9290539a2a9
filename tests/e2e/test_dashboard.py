"""The dashboard in a real browser (Debian's chromium, headless) over real HTTP: rounds, the
metric chart, rewards as the ledger has them, flags with their reasons, health, a live update
while the page is open, and not one request to another server; ``/docs`` likewise."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from fastapi import FastAPI, Request, Response

from fedledger.coordinator.api import create_app
from fedledger.demo import serve_in_thread
from fedledger.incentive.onchain import TOKEN_UNIT, RoundState
from harness import Harness, Upload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VIRTUAL_TIME_MS = 10_000
"""How long the page runs, in the browser's virtual time (it pauses while requests wait)."""


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail(
            "chromium is not on PATH: install it (`apt-get install -y chromium`; .ci/run does)"
        )
    return found


@dataclass
class Page:
    """What headless chromium rendered, and every request the page itself made."""

    dom: Node
    requests: list[str]  # URLs the page (not the browser's own services) requested


def _load(url: str, out: Path, *, timeout_s: float = 120) -> Page:
    """Load ``url`` in headless chromium for VIRTUAL_TIME_MS and return the DOM it rendered."""
    out.mkdir(parents=True, exist_ok=True)
    net_log = out / "net-log.json"
    done = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={out / 'profile'}", f"--log-net-log={net_log}",
            f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return Page(dom=_parse(done.stdout), requests=_page_requests(net_log, url))


def _page_requests(net_log: Path, url: str) -> list[str]:
    """The URLs requested on behalf of the page: the document, and everything it initiated
    (the browser's own services, which initiate from no origin, are left out)."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    requests = []
    for event in log["events"]:
        params = event.get("params", {})
        if event["type"] == start_job and (
            params.get("initiator") == origin or params.get("url") == url
        ):
            requests.append(params["url"])
    return requests


# ------------------------------------------------------------------- the DOM


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str, **attrs: str) -> list[Node]:
        """Descendants named ``tag`` with these attributes (``class_`` matches one class)."""
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if child.tag == tag and all(
                value in child.attrs.get("class", "").split()
                if name == "class_"
                else child.attrs.get(name.replace("_", "-")) == value
                for name, value in attrs.items()
            ):
                found.append(child)
            found += child.all(tag, **attrs)
        return found

    def one(self, tag: str, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]

    def cell(self, name: str) -> str:
        """The text of this row's cell of class ``name``."""
        return self.one("td", class_=name).text()


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def _parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# ------------------------------------------------------------ the federation


class PollGate:
    """Holds the page's second poll until the test says go: what the page shows at the end
    must then come from a poll made after the federation moved on, without a reload."""

    PATHS = ("/v1/dashboard", "/v1/health")

    def __init__(self) -> None:
        self.served = dict.fromkeys(self.PATHS, 0)
        self.first_poll = threading.Event()
        self.go = threading.Event()
        self._lock = threading.Lock()

    async def __call__(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if path not in self.served:
            return await call_next(request)
        if self.first_poll.is_set():
            await anyio.to_thread.run_sync(self.go.wait, 120)
        response = await call_next(request)
        with self._lock:
            self.served[path] += 1
            if all(self.served.values()):
                self.first_poll.set()
        return response


def _upload_round(harness: Harness, orgs: range, *, now: range | None = None) -> list[Upload]:
    """Organisations ``orgs`` commit a real update of the current round's model (every
    commitment first: uploads wait for the commit phase to end), then those in ``now`` (all
    by default) upload it; returns the uploads not yet sent."""
    current = harness.service.current()
    base = harness.model(current.model_hash)
    uploads = {
        k: harness.make_upload(harness.orgs[k], harness.trained_delta(k, base)) for k in orgs
    }
    for k in orgs if now is None else now:
        assert harness.post(uploads.pop(k)).status_code == 201
    return list(uploads.values())


@pytest.fixture
def federation(make_harness: Callable[..., Harness]) -> tuple[Harness, list[Upload]]:
    """Round 1: organisation 2 uploads a rescaled copy of organisation 0's update (flagged
    copied_update, unpaid). Round 2: three honest updates. Round 3: open, all committed, one
    upload in (the other two returned, to be sent while the page is open)."""
    harness = make_harness(total_rounds=4)
    honest = [harness.trained_delta(k) for k in range(2)]
    copied = {name: 3.0 * t for name, t in honest[0].items()}
    harness.round_with_cheat(1, [*honest, copied], "rescaled copy")
    harness.service.step()  # opens round 2
    _upload_round(harness, range(3))
    harness.service.step()  # closes round 2
    harness.service.step()  # opens round 3
    return harness, _upload_round(harness, range(3), now=range(1))


@pytest.fixture
def served(federation: tuple[Harness, list[Upload]]) -> Iterator[tuple[str, PollGate]]:
    gate = PollGate()
    app: FastAPI = create_app(federation[0].service)
    app.middleware("http")(gate)
    with serve_in_thread(app) as url:
        yield url, gate


def _utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def test_the_dashboard_shows_the_federation_and_follows_it(
    federation: tuple[Harness, list[Upload]], served: tuple[str, PollGate], tmp_path: Path
) -> None:
    harness, late = federation
    url, gate = served
    outcome: list[Page | BaseException] = []

    def browse() -> None:
        try:
            outcome.append(_load(f"{url}/dashboard", tmp_path))
        except BaseException as exc:  # handed to the test's thread below
            outcome.append(exc)

    browser = threading.Thread(target=browse, name="chromium")
    browser.start()
    try:
        deadline = time.monotonic() + 60
        while not gate.first_poll.wait(0.1) and browser.is_alive():
            assert time.monotonic() < deadline, "the page never polled v1/dashboard and v1/health"
        if gate.first_poll.is_set():
            # While the page is open: round 3 closes with three updates and round 4 opens.
            for upload in late:
                assert harness.post(upload).status_code == 201
            harness.service.step()
            harness.service.step()
    finally:
        gate.go.set()
        browser.join(timeout=150)
    assert outcome, "chromium did not finish"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    page = outcome[0]
    assert gate.first_poll.is_set(), "the page never polled v1/dashboard and v1/health"
    dom = page.dom
    ledger = harness.ledger
    assert gate.served["/v1/dashboard"] >= 2  # it polled again, and showed what changed

    # Rounds: newest first, with status and deadline; round 4 open and counting down.
    rows = [r for r in dom.one("table", id="rounds").all("tr") if "data-round" in r.attrs]
    assert [r.attrs["data-round"] for r in rows] == ["4", "3", "2", "1"]
    assert [r.cell("status") for r in rows] == ["open", "finalized", "finalized", "finalized"]
    for row in rows:
        deadline = harness.service.round_result(int(row.attrs["data-round"])).deadline
        assert row.cell("deadline").startswith(_utc(deadline))
    assert "closes in" in rows[0].cell("deadline")
    assert [r.cell("flagged") for r in rows] == ["0", "0", "0", "1"]
    for row in rows[1:]:
        round_id = int(row.attrs["data-round"])
        assert Decimal(row.cell("paid")) * TOKEN_UNIT == ledger.get_round(round_id).total_reward
        accuracy = harness.service.round_result(round_id).validation_metrics["accuracy"]
        assert f"accuracy {accuracy:.4f}" in row.cell("metrics")
    assert dom.one("p", id="progress").text() == "training running: round 4 of 4, open"

    # The chart: one point per settled round, in round order.
    settled = [r for r in range(1, 5) if ledger.get_round(r).state == RoundState.FINALIZED]
    assert settled == [1, 2, 3]
    points = dom.one("div", id="chart-plot").all("circle", class_="point")
    assert [int(p.attrs["data-round"]) for p in points] == settled
    assert dom.one("span", id="chart-metric").text() == "neg_log_loss"

    # Each organisation's total reward, as the ledger has it, to the last token unit.
    totals = {r.attrs["data-organisation"]: r for r in dom.one("table", id="totals").all("tr")[1:]}
    assert sorted(totals) == sorted(ledger.organisations())
    for address, row in totals.items():
        paid = ledger.total_reward_of(address)
        assert Decimal(row.cell("reward")) * TOKEN_UNIT == paid
        assert row.one("td", class_="reward").attrs["title"] == f"{paid} token units"
    cheat = totals[harness.orgs[2].address]
    assert cheat.cell("flags") == "copied_update" and cheat.cell("rounds-flagged") == "1"
    assert all(totals[o.address].cell("rounds-flagged") == "0" for o in harness.orgs[:2])

    # Round 1's detail: the flag and the reason for it.
    flagged = dom.one("details", id="round-1").one("tr", data_organisation=harness.orgs[2].address)
    assert flagged.cell("flags") == "copied_update"
    assert "rescaled copy" in flagged.cell("note")
    assert Decimal(flagged.cell("reward")) == 0 == ledger.reward_of(1, harness.orgs[2].address)

    # Health, and no DP in this task: no epsilon column.
    assert dom.one("dd", id="health-status").text() == "ok"
    assert f"chain id {ledger.chain_id()}" in dom.one("dd", id="health-chain").text()
    assert dom.one("dd", id="health-ledger").text() == ledger.address
    assert "no-dp" in dom.one("body").attrs["class"].split()

    # Nothing came from anywhere but this server.
    assert page.requests, "the net log recorded no request of the page"
    for requested in page.requests:
        assert requested.startswith(f"{url}/"), requested
    paths = {urlsplit(r).path for r in page.requests}
    assert {"/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"} <= paths
    assert {"/v1/dashboard", "/v1/health"} <= paths


def test_docs_render_from_the_servers_own_files(harness: Harness, tmp_path: Path) -> None:
    with serve_in_thread(create_app(harness.service)) as url:
        page = _load(f"{url}/docs", tmp_path)
    rendered = page.dom.one("div", id="swagger-ui").text()
    assert "fedledger coordinator" in rendered
    assert "/v1/dashboard" in rendered and "/v1/rounds/{round_id}/updates" in rendered
    for requested in page.requests:
        assert requested.startswith(f"{url}/"), requested
    assert f"{url}/openapi.json" in page.requests

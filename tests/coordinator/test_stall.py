"""Nobody stalls the coordinator: long polls hold no thread, an upload's headers are verified
before its body is read, and every connection, body and wait is bounded.

Real server (uvicorn with the coordinator's protocol) on loopback, raw sockets where the
client misbehaves at the byte level. Nothing here times the server: each test asserts what was
answered, with which code, and whether the connection was closed.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from fedledger.coordinator.api import create_app
from fedledger.demo import serve_in_thread
from harness import Harness, Upload

POLLS = 60  # more than the 40 worker threads that synchronous handlers share


@contextmanager
def served(harness: Harness) -> Iterator[tuple[str, str, int]]:
    with serve_in_thread(create_app(harness.service)) as url:
        host, port = url.removeprefix("http://").split(":")
        yield url, host, int(port)


def head(method: str, path: str, headers: dict[str, str], extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: coordinator"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def answer_then_close(sock: socket.socket) -> tuple[int, dict[str, object], bool]:
    """Read one response, then whether the server closed the connection after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in header.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(header.split(b" ")[1]), json.loads(body[:length]), closed(sock)


def closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (an orderly end of stream within the socket timeout)."""
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def wait_until(condition: Callable[[], object], what: str) -> None:
    event = threading.Event()
    for _ in range(2000):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def committed_upload(harness: Harness, k: int = 0) -> Upload:
    """An upload by organisation ``k`` whose commitment is on-chain, the commit phase over."""
    upload = harness.make_upload(harness.orgs[k], seed=k)
    harness.end_commit_phase()
    return upload


def test_long_polls_hold_no_thread_while_others_are_answered(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(max_waits_per_client=POLLS)
    for k, org in enumerate(harness.orgs):  # the commit phase ends when every member committed
        harness.org_ledger(org).commit_update(1, bytes([k + 1]) * 32, 1)
    upload = harness.make_upload(harness.orgs[0], commit=False)
    watch = harness.service.watch
    with served(harness) as (url, _, _):
        answers: list[httpx.Response] = []

        def poll() -> None:
            params = {"after_round": 1, "after_status": "open", "wait_s": 25}
            answers.append(httpx.get(f"{url}/v1/rounds/current", params=params, timeout=60))

        pollers = [threading.Thread(target=poll, daemon=True) for _ in range(POLLS)]
        for poller in pollers:
            poller.start()
        wait_until(lambda: watch.waiting == POLLS, f"{POLLS} polls to be held")

        # Every other request is answered while all the polls are held.
        assert httpx.get(f"{url}/v1/health", timeout=20).json()["status"] == "ok"
        assert httpx.get(f"{url}/v1/rounds/1", timeout=20).status_code == 200
        upload_response = httpx.post(
            f"{url}/v1/rounds/1/updates", content=upload.body, headers=upload.headers, timeout=20
        )
        assert upload_response.status_code == 409  # our commitment is another hash: judged
        assert upload_response.json()["code"] == "commitment_mismatch"
        assert watch.waiting == POLLS and answers == []

        harness.advance(harness.service.settings.round_timeout_s + 10)
        harness.service.step()  # the round moves on: every poll is answered with it
        for poller in pollers:
            poller.join(timeout=30)
    assert len(answers) == POLLS and {r.status_code for r in answers} == {200}
    assert {(r.json()["round_id"], r.json()["status"]) for r in answers} != {(1, "open")}
    assert watch.waiting == 0


def test_a_client_over_its_share_of_long_polls_is_told_to_come_back(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(max_waits_per_client=2)
    watch = harness.service.watch
    params = {"after_round": 1, "after_status": "open", "wait_s": 25}
    with served(harness) as (url, _, _):
        held: list[httpx.Response] = []
        pollers = [
            threading.Thread(
                target=lambda: held.append(
                    httpx.get(f"{url}/v1/rounds/current", params=params, timeout=60)
                ),
                daemon=True,
            )
            for _ in range(2)
        ]
        for poller in pollers:
            poller.start()
        wait_until(lambda: watch.waiting == 2, "two polls to be held")
        third = httpx.get(f"{url}/v1/rounds/current", params=params, timeout=20)
        assert third.status_code == 429 and third.json()["code"] == "too_many_waits"
        assert third.headers["retry-after"] == "1"
        # A poll without a wait, and one that knows an older state, are still answered.
        assert httpx.get(f"{url}/v1/rounds/current", timeout=20).status_code == 200
        stale = {**params, "after_status": "closing"}
        assert httpx.get(f"{url}/v1/rounds/current", params=stale, timeout=20).status_code == 200
        harness.advance(harness.service.settings.round_timeout_s + 10)
        harness.service.step()  # the round moves on: the held polls are answered
        for poller in pollers:
            poller.join(timeout=30)
    assert [r.status_code for r in held] == [200, 200]


def test_an_unsigned_upload_is_refused_before_its_body_is_read(harness: Harness) -> None:
    with served(harness) as (_, host, port), socket.create_connection((host, port), 10) as sock:
        sock.sendall(head("POST", "/v1/rounds/1/updates", {}, "Content-Length: 1000000\r\n"))
        status, body, was_closed = answer_then_close(sock)  # not one body byte sent
    assert (status, body["code"]) == (401, "unsigned")
    assert was_closed  # the 60 MiB the client meant to send are never read


def test_an_upload_not_committed_is_refused_before_its_body_is_read(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0], commit=False)
    with served(harness) as (_, host, port), socket.create_connection((host, port), 10) as sock:
        sock.sendall(head("POST", "/v1/rounds/1/updates", upload.headers, "Content-Length: 9\r\n"))
        status, body, was_closed = answer_then_close(sock)
    assert (status, body["code"], was_closed) == (409, "not_committed", True)


def test_a_body_that_stops_arriving_is_cut_off(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(body_idle_timeout_s=0.5)
    upload = committed_upload(harness)
    with served(harness) as (_, host, port), socket.create_connection((host, port), 10) as sock:
        length = f"Content-Length: {len(upload.body)}\r\n"
        sock.sendall(head("POST", "/v1/rounds/1/updates", upload.headers, length))
        sock.sendall(upload.body[:10])  # and nothing more
        status, body, was_closed = answer_then_close(sock)
    assert (status, body["code"], was_closed) == (408, "body_timeout", True)
    assert body["details"] == {"received": 10}
    assert harness.service.store.updates_for(1) == []
    assert harness.post(upload).status_code == 201  # the organisation can still upload


def test_a_body_slower_than_the_whole_body_deadline_is_cut_off(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(body_idle_timeout_s=5.0, body_timeout_s=0.5)
    upload = committed_upload(harness)
    with served(harness) as (_, host, port), socket.create_connection((host, port), 10) as sock:
        length = f"Content-Length: {len(upload.body)}\r\n"
        sock.sendall(head("POST", "/v1/rounds/1/updates", upload.headers, length))
        dripped, stop = 0, threading.Event()
        while not stop.wait(0.1) and dripped < len(upload.body):  # a byte every 0.1 s
            try:
                sock.sendall(upload.body[dripped : dripped + 1])
            except OSError:
                break
            dripped += 1
            if dripped >= 5:
                stop.set()
        status, body, _ = answer_then_close(sock)
    assert (status, body["code"]) == (408, "body_timeout")
    assert "longer than 0.5 s" in str(body["message"])


@pytest.mark.parametrize(
    "sent", [b"", b"POST /v1/rounds/1/updates HTTP/1.1\r\nHost: coordinator\r\n"]
)
def test_a_connection_without_complete_headers_is_closed(
    make_harness: Callable[..., Harness], sent: bytes
) -> None:
    harness = make_harness(header_timeout_s=0.5)
    with served(harness) as (url, host, port), socket.create_connection((host, port), 10) as sock:
        sock.sendall(sent)
        assert closed(sock), "the server kept a connection whose request never completed"
        assert httpx.get(f"{url}/v1/health", timeout=20).status_code == 200


def test_a_client_gone_mid_body_is_one_log_line(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    upload = committed_upload(harness)
    caplog.set_level(logging.INFO, logger="fedledger.coordinator")  # whatever set it before
    with served(harness) as (url, host, port):
        with socket.create_connection((host, port), 10) as sock:
            length = f"Content-Length: {len(upload.body)}\r\n"
            sock.sendall(head("POST", "/v1/rounds/1/updates", upload.headers, length))
            sock.sendall(upload.body[:10])
        wait_until(
            lambda: any("disconnected" in r.getMessage() for r in caplog.records),
            "the disconnect to be logged",
        )
        assert httpx.get(f"{url}/v1/health", timeout=20).status_code == 200
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert harness.service.store.updates_for(1) == []


def test_uploads_received_at_once_are_capped_one_per_organisation(
    make_harness: Callable[..., Harness],
) -> None:
    harness = make_harness(max_concurrent_uploads=1)
    first, second = harness.make_upload(harness.orgs[0]), harness.make_upload(harness.orgs[1])
    harness.end_commit_phase()
    app = create_app(harness.service)
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), 10)
        length = f"Content-Length: {len(first.body)}\r\n"
        sock.sendall(head("POST", "/v1/rounds/1/updates", first.headers, length))
        sock.sendall(first.body[:10])  # holds the one slot while its body trickles in
        wait_until(lambda: app.state.uploads.held == 1, "the first upload to hold its slot")

        def post(upload: Upload) -> httpx.Response:
            return httpx.post(
                f"{url}/v1/rounds/1/updates",
                content=upload.body,
                headers=upload.headers,
                timeout=20,
            )

        busy = post(second)
        assert busy.status_code == 503 and busy.json()["code"] == "busy"
        assert busy.headers["retry-after"] == "1"
        again = post(first)  # the same organisation on a second connection
        assert (again.status_code, again.json()["code"]) == (409, "upload_in_progress")
        sock.sendall(first.body[10:])  # the first body completes and frees the slot
        status, receipt, _ = answer_then_close(sock)
        sock.close()
        assert status == 201 and receipt["organisation"] == harness.orgs[0].address
        assert post(second).status_code == 201


def test_connections_beyond_the_cap_are_answered_503(make_harness: Callable[..., Harness]) -> None:
    harness = make_harness(max_connections=3)
    with served(harness) as (url, host, port):
        idle = [socket.create_connection((host, port), 10) for _ in range(3)]
        try:
            over = httpx.get(f"{url}/v1/health", timeout=20)
            assert over.status_code == 503
        finally:
            for sock in idle:
                sock.close()
        wait_until(
            lambda: httpx.get(f"{url}/v1/health", timeout=20).status_code == 200,
            "the connections to be released",
        )

"""Oversize bodies are refused with 413 before they are buffered, whatever the Content-Length says.

Raw sockets against the real server: the client declares a size honestly, not at all (chunked)
or falsely, and the answer must come while most of the body is still unsent.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from fedledger.coordinator.api import create_app
from fedledger.demo import serve_in_thread
from harness import Harness

HUGE = 64 << 20  # what the client would send if it were allowed to finish


Server = tuple[str, int, dict[str, str], bytes]  # host, port, a signed upload's headers and body


@pytest.fixture
def server(harness: Harness) -> Iterator[Server]:
    upload = harness.make_upload(harness.orgs[0])
    harness.end_commit_phase()  # bodies are read only once the headers pass every check
    with serve_in_thread(create_app(harness.service)) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port), upload.headers, upload.body


@contextmanager
def connection(host: str, port: int) -> Iterator[socket.socket]:
    sock = socket.create_connection((host, port), timeout=10)
    try:
        yield sock
    finally:
        sock.close()


def request_head(host: str, headers: dict[str, str], extra: str) -> bytes:
    lines = ["POST /v1/rounds/1/updates HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def send_until_answered(sock: socket.socket, chunk: bytes, total: int) -> tuple[bytes, int]:
    """Send up to ``total`` bytes in chunks; stop as soon as the server answers."""
    sent = 0
    sock.setblocking(False)
    answer = b""
    while sent < total:
        try:
            answer += sock.recv(65536)
            if answer:
                break
        except BlockingIOError:
            pass
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.setblocking(True)
    sock.settimeout(10)
    return read_response(sock, answer), sent


def read_response(sock: socket.socket, answer: bytes = b"") -> bytes:
    """Read one whole HTTP response (headers and a Content-Length body)."""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    return answer


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def parse(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    start, end = body.find(b"{"), body.rfind(b"}")
    return status, json.loads(body[start : end + 1])


def test_honest_oversize_length_is_refused_before_the_body(
    server: Server,
) -> None:
    host, port, headers, _ = server
    with connection(host, port) as sock:
        sock.sendall(request_head(host, headers, f"Content-Length: {HUGE}\r\n"))
        status, body = parse(read_response(sock))  # not one body byte sent
    assert status == 413 and body["code"] == "too_large"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_chunked_oversize_body_is_cut_off_past_its_header(server: Server) -> None:
    """The signed update's own bytes, then more: its safetensors header fixes the body's
    length, and the body is refused once it goes past it."""
    host, port, headers, update = server
    with connection(host, port) as sock:
        sock.sendall(request_head(host, headers, "Transfer-Encoding: chunked\r\n"))
        sock.sendall(_chunk(update))
        answer, sent = send_until_answered(sock, _chunk(b"\0" * 65536), HUGE)
    status, body = parse(answer)
    assert status == 413 and body["code"] == "too_large"
    assert body["details"]["limit_bytes"] == len(update)
    assert sent < HUGE // 4  # answered long before the client finished: nothing near HUGE buffered


def test_chunked_body_without_a_safetensors_header_is_refused_at_its_first_bytes(
    server: Server,
) -> None:
    """Zeros declare an empty header, which is not safetensors: refused before the rest."""
    host, port, headers, _ = server
    with connection(host, port) as sock:
        sock.sendall(request_head(host, headers, "Transfer-Encoding: chunked\r\n"))
        answer, sent = send_until_answered(sock, _chunk(b"\0" * 65536), HUGE)
    status, body = parse(answer)
    assert status == 422 and body["code"] == "not_safetensors"
    assert sent < HUGE // 4


def test_chunked_body_is_cut_off_at_the_operator_s_limit(
    make_harness: Callable[..., Harness],
) -> None:
    """A model whose updates exceed ``max_upload_bytes``: a well-formed update, sent chunked
    (no length declared), is refused at the limit, not buffered whole."""
    harness = make_harness(max_upload_bytes=1024)
    upload = harness.make_upload(harness.orgs[0])
    assert len(upload.body) > 4 * 1024
    harness.end_commit_phase()
    with serve_in_thread(create_app(harness.service)) as url:
        host, port = url.removeprefix("http://").split(":")
        with connection(host, int(port)) as sock:
            sock.sendall(request_head(host, upload.headers, "Transfer-Encoding: chunked\r\n"))
            answer, _ = send_until_answered(sock, _chunk(upload.body[:512]), len(upload.body))
    status, body = parse(answer)
    assert status == 413 and body["code"] == "too_large"
    assert body["details"]["limit_bytes"] == 1024


def test_a_header_listing_thousands_of_tensors_is_refused_at_its_first_bytes(
    make_harness: Callable[..., Harness],
) -> None:
    """A registered organisation commits to, signs and sends a 22 MB body whose header lists
    400,000 zero-size tensors: answered from the header's 8-byte length, while almost all of
    it is unsent, in a short message; nothing is stored."""
    harness = make_harness(max_upload_bytes=64 << 20)
    entry = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = b"{" + b",".join(entry % k for k in range(400_000)) + b"}"
    hostile = len(header).to_bytes(8, "little") + header
    upload = harness.make_upload(harness.orgs[0], body=hostile)
    harness.end_commit_phase()
    with serve_in_thread(create_app(harness.service)) as url:
        host, port = url.removeprefix("http://").split(":")
        with connection(host, int(port)) as sock:
            head = request_head(host, upload.headers, f"Content-Length: {len(hostile)}\r\n")
            sock.sendall(head)
            answer, sent = send_until_answered(sock, hostile[:65536], len(hostile))
    status, body = parse(answer)
    assert status == 422 and body["code"] == "tensor_mismatch", body
    assert len(answer) < 1000 and sent < len(hostile) // 4
    assert harness.service.store.get_update(upload.round_id, harness.orgs[0].address) is None


def test_lying_small_length_reads_only_what_was_declared(
    server: Server,
) -> None:
    host, port, headers, update = server
    assert len(update) > 1000
    with connection(host, port) as sock:
        sock.sendall(request_head(host, headers, "Content-Length: 1000\r\n"))
        answer, _ = send_until_answered(sock, update, HUGE)
    status, body = parse(answer)
    # The server takes the 1,000 declared bytes (the update's header and the start of its
    # tensors) and judges them: they are not what was signed.
    assert status == 401 and body["code"] == "body_hash_mismatch"


def test_missing_length_without_chunking_is_an_empty_body(
    server: Server,
) -> None:
    host, port, headers, _ = server
    with connection(host, port) as sock:
        sock.sendall(request_head(host, headers, ""))
        status, body = parse(read_response(sock))
    assert status == 401 and body["code"] == "body_hash_mismatch"

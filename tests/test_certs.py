"""The consortium's certificates: what `fedledger certs` writes, and every check made before a
coordinator serves or a node connects."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedledger.certs import (
    PASSPHRASE_ENV,
    check_pair,
    client_context,
    create_ca,
    issue,
    load_certificate,
)
from fedledger.errors import ErrorCode, SetupError
from fedledger.node.client import check_transport, is_loopback


def _refused(code: ErrorCode, fragment: str, action: object) -> None:
    with pytest.raises(SetupError) as info:
        action()  # type: ignore[operator]
    assert info.value.code is code
    assert fragment in info.value.message, info.value.message


def test_a_server_certificate_names_its_hosts_and_a_client_one_is_for_clients(
    tmp_path: Path,
) -> None:
    ca = create_ca(tmp_path / "ca")
    server = issue(tmp_path / "ca", tmp_path / "s", "coordinator", hosts=["10.0.0.7", "fl.example"])
    client = issue(tmp_path / "ca", tmp_path / "c", "hospital-a")
    cert = check_pair(server.cert, server.key)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    usage = check_pair(client.cert, client.key).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    )
    assert list(usage.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    root = load_certificate(ca.cert)
    assert cert.issuer == root.subject and cert.verify_directly_issued_by(root) is None
    assert {p.stat().st_mode & 0o777 for p in (ca.key, server.key, client.key)} == {0o600}
    context = client_context(ca.cert, client.cert, client.key)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_a_ca_is_never_overwritten(tmp_path: Path) -> None:
    create_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    _refused(ErrorCode.BAD_CERTIFICATE, "already holds a CA", lambda: create_ca(tmp_path))
    assert (tmp_path / "ca.key").read_bytes() == before


def test_an_encrypted_ca_key_needs_its_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    create_ca(tmp_path / "ca")
    assert b"ENCRYPTED" in (tmp_path / "ca" / "ca.key").read_bytes()
    issue(tmp_path / "ca", tmp_path / "org", "a")  # with the passphrase
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    _refused(
        ErrorCode.BAD_CERTIFICATE,
        PASSPHRASE_ENV,
        lambda: issue(tmp_path / "ca", tmp_path / "org", "b"),
    )


def test_expired_not_yet_valid_garbage_and_mismatched_files_are_refused(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca")
    one = issue(tmp_path / "ca", tmp_path / "o", "one", days=30)
    other = issue(tmp_path / "ca", tmp_path / "o", "other")
    now = dt.datetime.now(dt.UTC)
    _refused(
        ErrorCode.BAD_CERTIFICATE,
        "expired on",
        lambda: load_certificate(one.cert, now=now + dt.timedelta(days=31)),
    )
    _refused(
        ErrorCode.BAD_CERTIFICATE,
        "is not valid before",
        lambda: load_certificate(one.cert, now=now - dt.timedelta(days=1)),
    )
    _refused(
        ErrorCode.BAD_CERTIFICATE, "does not belong to", lambda: check_pair(one.cert, other.key)
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    _refused(
        ErrorCode.BAD_CERTIFICATE, "is not a PEM certificate", lambda: load_certificate(garbage)
    )
    _refused(
        ErrorCode.BAD_CERTIFICATE,
        "is not an unencrypted PEM key",
        lambda: check_pair(one.cert, garbage),
    )
    _refused(
        ErrorCode.BAD_CERTIFICATE,
        "both --client-cert and --client-key",
        lambda: client_context(tmp_path / "ca" / "ca.pem", one.cert, None),
    )


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        ("https://fl.example", True),
        ("http://fl.example:8000", False),
        ("http://10.0.0.7:8000", False),
    ],
)
def test_plain_http_only_on_this_machine(url: str, allowed: bool) -> None:
    assert is_loopback(url) == (url.startswith("http://") and allowed)
    if allowed:
        check_transport(url)
    else:
        _refused(ErrorCode.INSECURE_TRANSPORT, "refusing plain HTTP", lambda: check_transport(url))
        check_transport(url, insecure=True)

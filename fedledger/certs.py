"""A consortium's TLS certificates: its CA, the coordinator's server certificate, each member's
client certificate (``cryptography``'s X.509 builder), and the checks made before serving.

Keys are ECDSA P-256, written with mode 0600. The CA key is encrypted with the passphrase in
``FEDLEDGER_CA_PASSPHRASE`` when it is set (it is then needed to issue); keep it off the
coordinator's machine either way: only ``ca.pem`` is distributed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes as PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedledger.errors import ErrorCode, SetupError

PASSPHRASE_ENV = "FEDLEDGER_CA_PASSPHRASE"
CA_DAYS = 3650
LEAF_DAYS = 397  # what browsers accept for a server certificate; renew yearly


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as written."""

    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def create_ca(
    out_dir: Path, *, name: str = "fedledger consortium CA", days: int = CA_DAYS
) -> Issued:
    """A self-signed CA (``ca.pem``, ``ca.key``) in ``out_dir``; refuses to overwrite one."""
    issued = Issued(out_dir / "ca.pem", out_dir / "ca.key")
    if issued.cert.exists() or issued.key.exists():
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE, f"{out_dir} already holds a CA; not overwriting it"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True,
        crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(issued.key, key, _passphrase())
    _write_cert(issued.cert, cert)
    return issued


def _load_key(path: Path, password: bytes | None, *, what: str, unloadable: str) -> PrivateKey:
    """The PEM private key at ``path``; refused as unreadable, or as ``unloadable`` says."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=password)
    except OSError as exc:
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE, f"cannot read {what} {path}: {exc.strerror}"
        ) from None
    except (ValueError, TypeError) as exc:
        raise SetupError(ErrorCode.BAD_CERTIFICATE, f"{path} {unloadable} ({exc})") from None


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_certificate(ca_dir / "ca.pem")
    key = _load_key(
        ca_dir / "ca.key",
        _passphrase(),
        what="the CA key",
        unloadable=f"does not load; an encrypted CA key needs {PASSPHRASE_ENV}",
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SetupError(ErrorCode.BAD_CERTIFICATE, f"{ca_dir / 'ca.key'} is not an EC key")
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    *,
    hosts: Sequence[str] = (),
    days: int = LEAF_DAYS,
) -> Issued:
    """A certificate signed by the CA in ``ca_dir``: a server certificate for ``hosts`` (DNS
    names or IP addresses) when any are given, else an organisation's client certificate
    named ``name``. Written as ``NAME.pem`` and ``NAME.key`` in ``out_dir``."""
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    issued = Issued(out_dir / f"{name}.pem", out_dir / f"{name}.key")
    _write_key(issued.key, key, None)
    _write_cert(issued.cert, cert)
    return issued


def load_certificate(path: Path, *, now: dt.datetime | None = None) -> x509.Certificate:
    """The PEM certificate at ``path``, refused if unreadable, not PEM, or outside its validity."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE, f"cannot read the certificate {path}: {exc.strerror}"
        ) from None
    except ValueError as exc:
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE, f"{path} is not a PEM certificate ({exc})"
        ) from None
    now = now or _now()
    if now > cert.not_valid_after_utc:
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE,
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a new one "
            "(`fedledger certs issue`)",
        )
    if now < cert.not_valid_before_utc:
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE,
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
        )
    return cert


def check_pair(cert_path: Path, key_path: Path) -> x509.Certificate:
    """The certificate at ``cert_path``, checked (``load_certificate``) and matched to the
    unencrypted private key at ``key_path``."""
    cert = load_certificate(cert_path)
    key = _load_key(key_path, None, what="the key", unloadable="is not an unencrypted PEM key")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ) != cert.public_key().public_bytes(serialization.Encoding.PEM, public):
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE,
            f"the key {key_path} does not belong to the certificate {cert_path}",
        )
    return cert


def client_context(
    ca_cert: Path | None, client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext:
    """What a node verifies the coordinator with: the consortium CA (or the system's), and its
    own certificate for mutual TLS; every file checked first."""
    if (client_cert is None) != (client_key is None):
        raise SetupError(
            ErrorCode.BAD_CERTIFICATE, "give both --client-cert and --client-key, or neither"
        )
    if ca_cert is not None:
        load_certificate(ca_cert)
    context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    if client_cert is not None and client_key is not None:
        check_pair(client_cert, client_key)
        context.load_cert_chain(str(client_cert), str(client_key))
    return context

"""TLS and mutual TLS with real processes: certificates from `fedledger certs`, the coordinator
over HTTPS asking for client certificates, a node that has one, and clients that are refused."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedledger.devnet.anvil import AnvilProcess, free_port
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import RoundState

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedledger", *args]


def _run(
    *args: str, key: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300", "PYTHONUNBUFFERED": "1"}
    env.pop("FEDLEDGER_KEY", None)
    if key:
        env["FEDLEDGER_KEY"] = key
    return subprocess.run(_cli(*args), capture_output=True, text=True, timeout=timeout, env=env)


def _certs(root: Path) -> Path:
    for args in (
        ("ca", "--out", str(root / "ca")),
        ("issue", "coordinator", "--ca", str(root / "ca"), "--host", "127.0.0.1",
         "--host", "localhost", "--out", str(root / "server")),
        ("issue", "hospital-a", "--ca", str(root / "ca"), "--out", str(root / "org")),
        ("ca", "--out", str(root / "rogue")),  # another CA: its certificates mean nothing here
        ("issue", "intruder", "--ca", str(root / "rogue"), "--out", str(root / "intruder")),
    ):  # fmt: skip
        made = _run("certs", *args)
        assert made.returncode == 0, made.stdout + made.stderr
    assert (root / "org" / "hospital-a.key").stat().st_mode & 0o077 == 0  # keys are private
    return root


def _context(root: Path, client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(root / "ca" / "ca.pem"))
    if client is not None:
        context.load_cert_chain(str(root / f"{client}.pem"), str(root / f"{client}.key"))
    return context


def test_a_round_over_mutual_tls_and_clients_without_a_valid_certificate_refused(
    anvil: AnvilProcess, tmp_path: Path
) -> None:
    root = _certs(tmp_path / "pki")
    deployment = deploy_devnet(connect(anvil.rpc_url), 1, rpc_url=anvil.rpc_url)
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    assert deployment.accounts is not None
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    log = tmp_path / "coordinator.log"
    env = {**os.environ, "FEDLEDGER_KEY": str(deployment.accounts.coordinator.private_key)}
    coordinator = subprocess.Popen(
        _cli(
            "coordinator", "serve", "--deployment", str(deployment_file),
            "--data-dir", str(tmp_path / "coordinator"), "--port", str(port),
            "--rounds", "1", "--quorum", "1", "--round-timeout", "120",
            "--tls-cert", str(root / "server" / "coordinator.pem"),
            "--tls-key", str(root / "server" / "coordinator.key"),
            "--client-ca", str(root / "ca" / "ca.pem"),
        ),
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        member = _context(root, "org/hospital-a")
        _wait_https(f"{url}/v1/health", member, coordinator, log)

        # Refused at the handshake: no client certificate, one from another CA; and a client
        # that does not trust the coordinator's CA refuses the coordinator.
        for context in (_context(root, None), _context(root, "intruder/intruder")):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{url}/v1/health", verify=context, timeout=10).raise_for_status()
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/v1/health", timeout=10)
        # Plain HTTP to the TLS port gets nothing served.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10).raise_for_status()

        org_key = deployment.accounts.organisations[0].private_key
        node_args = ("node", "run", "--coordinator", url, "--deployment", str(deployment_file))
        untrusting = _run(*node_args, key=org_key, timeout=60)
        assert untrusting.returncode == 1
        assert "does not verify" in untrusting.stderr and "--ca-cert" in untrusting.stderr

        node = _run(
            *node_args,
            "--ca-cert", str(root / "ca" / "ca.pem"),
            "--client-cert", str(root / "org" / "hospital-a.pem"),
            "--client-key", str(root / "org" / "hospital-a.key"),
            key=org_key, timeout=240,
        )  # fmt: skip
        assert node.returncode == 0, node.stdout + node.stderr
        assert "round 1: uploaded" in node.stdout
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=30)
    ledger = LedgerClient(connect(anvil.rpc_url), deployment.ledger)
    assert ledger.get_round(1).state == RoundState.FINALIZED
    assert ledger.commitment_of(1, deployment.accounts.organisations[0].address) is not None


def _wait_https(
    url: str, context: ssl.SSLContext, proc: subprocess.Popen[bytes], log: Path
) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the coordinator exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, verify=context, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"no answer from {url}:\n{log.read_text()}")


def test_bad_certificates_stop_the_coordinator_before_it_serves(tmp_path: Path) -> None:
    root = _certs(tmp_path / "pki")
    server = root / "server"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        (server / "coordinator.pem", root / "org" / "hospital-a.key", "does not belong to"),
        (garbage, server / "coordinator.key", "is not a PEM certificate"),
        (tmp_path / "missing.pem", server / "coordinator.key", "cannot read the certificate"),
    ]
    for cert, key, message in cases:
        refused = _run(
            "coordinator", "serve", "--deployment", str(tmp_path / "none.json"),
            "--tls-cert", str(cert), "--tls-key", str(key),
            key="0x" + "11" * 32,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "error [bad_certificate]:" in refused.stderr and message in refused.stderr, (
            refused.stderr
        )
        assert "Traceback" not in refused.stderr


def test_a_node_refuses_plain_http_to_another_host_unless_told(tmp_path: Path) -> None:
    refused = _run(
        "node", "run", "--coordinator", "http://coordinator.example:8000",
        "--deployment", str(tmp_path / "none.json"), key="0x" + "11" * 32,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "refusing plain HTTP to coordinator.example" in refused.stderr
    assert "--insecure" in refused.stderr

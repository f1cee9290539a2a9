"""``fedledger claim`` as an organisation runs it: a coordinator on loopback whose rounds settle
by Merkle root, a real anvil, the organisation's keystore."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedledger.coordinator.api import create_app
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.service import RoundService
from fedledger.demo import serve_in_thread
from fedledger.devnet.anvil import AnvilProcess
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect, devnet_account
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import TOKEN_UNIT
from fedledger.keys import write_keystore
from fedledger.node.claims import Claim, claim_round
from fedledger.node.client import CoordinatorClient
from harness import Harness

pytestmark = [pytest.mark.e2e]

ORGS = 3


def _claim(
    deployment: Path, url: str, keystore: Path, password: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedledger", "claim", "--deployment", str(deployment),
         "--coordinator", url, "--keystore", str(keystore), "--password-file", str(password)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_claim_takes_exactly_the_unclaimed_rewards_then_nothing(
    anvil: AnvilProcess, tmp_path: Path
) -> None:
    w3 = connect(anvil.rpc_url)
    deployment = deploy_devnet(w3, ORGS, rpc_url=anvil.rpc_url)
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    clock = [float(w3.eth.get_block("latest")["timestamp"])]
    settings = CoordinatorSettings(
        data_dir=tmp_path / "coordinator",
        total_rounds=2,
        round_timeout_s=600,
        max_upload_bytes=1 << 20,
        pricing=PricingPolicy(claims_above=0, min_aggregated=1),  # every round by root
    )
    service = RoundService(
        settings, LedgerClient(w3, deployment.ledger, devnet_account(1)), clock=lambda: clock[0]
    )
    service.start(background=False)
    try:
        harness = Harness(
            service=service,
            client=TestClient(create_app(service)),
            ledger=LedgerClient(w3, deployment.ledger),
            orgs=[devnet_account(2 + k) for k in range(ORGS)],
            outsider=devnet_account(2 + ORGS),
            clock=clock,
        )
        rewards: dict[int, int] = {}
        org = harness.orgs[0]
        for round_id in (1, 2):
            if round_id > 1:
                service.step()  # opens it
            base = harness.model(harness.client.get("/v1/rounds/current").json()["model_hash"])
            # every member commits first: uploads wait for the commit phase to end
            for upload in [
                harness.make_upload(member, harness.trained_delta(k, base))
                for k, member in enumerate(harness.orgs)
            ]:
                assert harness.post(upload).status_code == 201  # type: ignore[attr-defined]
            service.step()
            result = harness.member_result(round_id)
            assert result["settlement"] == "claims"
            (mine,) = (o for o in result["organisations"] if o["organisation"] == org.address)
            rewards[round_id] = int(mine["reward"])
        assert rewards[1] > 0 and rewards[2] > 0
        password = tmp_path / "password"
        password.write_text("hospital a\n")
        keystore = tmp_path / "hospital_a.json"
        write_keystore(org, keystore, "hospital a")
        ledger = harness.org_ledger(org)
        with serve_in_thread(create_app(service)) as url:
            with CoordinatorClient(url) as client:  # round 1 was claimed before, by the node
                assert isinstance(claim_round(ledger, client, ledger.get_round(1)), Claim)
            first = _claim(deployment_file, url, keystore, password)
            second = _claim(deployment_file, url, keystore, password)
    finally:
        service.stop()
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 2"]
    assert f"round 2: claimed {rewards[2] / TOKEN_UNIT:,.4f} FLR ({rewards[2]} token units" in (
        first.stdout
    )
    assert (
        f"{org.address}: claimed 1 round(s), {rewards[2] / TOKEN_UNIT:,.4f} FLR in all "
        f"({rewards[2]} token units)"
    ) in first.stdout
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{org.address}: nothing to claim" in second.stdout and "round " not in second.stdout
    assert harness.ledger.balance_of(org.address) == rewards[1] + rewards[2]
    assert harness.ledger.get_round(2).claimed_reward == rewards[2]  # the others' still wait

"""On a chain that takes JSON-RPC batches (anvil), the coordinator reads a round's commitments
in one batch once its commit phase is over, not one read per upload, and checks every upload
against them as strictly as before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedledger.coordinator.api import create_app
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.service import RoundService
from fedledger.devnet.anvil import AnvilProcess, start_anvil
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect, devnet_account
from fedledger.incentive.ledger import LedgerClient
from harness import Harness

pytestmark = [pytest.mark.e2e]

ORGS = 3


@pytest.fixture
def anvil() -> Iterator[AnvilProcess]:
    process = start_anvil(accounts=ORGS + 3)
    yield process
    process.stop()


def _calls(service: RoundService, function: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "fedledger_chain_calls_total", {"function": function, "outcome": "ok"}
    )
    return value or 0.0


def test_a_rounds_commitments_are_read_in_one_batch(anvil: AnvilProcess, tmp_path: Path) -> None:
    deployment = deploy_devnet(connect(anvil.rpc_url), ORGS)
    service = RoundService(
        CoordinatorSettings(
            data_dir=tmp_path / "coordinator",
            total_rounds=1,
            round_timeout_s=600,
            pricing=PricingPolicy(min_aggregated=1),
        ),
        LedgerClient(connect(anvil.rpc_url), deployment.ledger, devnet_account(1)),
    )
    service.start(background=False)
    try:
        chain = LedgerClient(connect(anvil.rpc_url), deployment.ledger)
        orgs = [devnet_account(2 + k) for k in range(ORGS)]
        harness = Harness(
            service, TestClient(create_app(service)), chain, orgs, devnet_account(5), [time.time()]
        )
        uploads = [harness.make_upload(org, seed=k) for k, org in enumerate(orgs[:-1])]
        # The last one commits to one update and signs another.
        committed = harness.make_upload(orgs[-1], seed=7)
        cheat = harness.make_upload(orgs[-1], seed=8, commit=False)
        assert chain.commits_closed(1)  # every member committed

        before = _calls(service, "commitmentOf")
        statuses = [harness.post(u, wait_for_commits=False).status_code for u in uploads]  # type: ignore[attr-defined]
        refused = harness.post(cheat, wait_for_commits=False)
        accepted = harness.post(committed, wait_for_commits=False)
        stored = {u.organisation.lower() for u in service.store.updates_for(1)}
    finally:
        service.stop()

    assert statuses == [201, 201]
    assert refused.status_code == 409  # type: ignore[attr-defined]
    assert refused.json()["code"] == "commitment_mismatch"  # type: ignore[attr-defined]
    assert accepted.status_code == 201  # type: ignore[attr-defined]
    # Four uploads: at most the first read alone (before the coordinator had seen the commit
    # phase end), then every member's commitment in one batch.
    assert _calls(service, "commitmentOf") - before <= 1
    assert _calls(service, "batch:commitmentOf") == 1
    assert stored == {o.address.lower() for o in orgs}

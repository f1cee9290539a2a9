"""The chain goes away (anvil frozen with SIGSTOP) and comes back: nothing unverified is accepted."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedledger.coordinator.api import create_app
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.service import RoundService
from fedledger.demo import serve_in_thread
from fedledger.devnet.anvil import AnvilProcess, start_anvil
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect, devnet_account
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import RoundState
from fedledger.node.client import CoordinatorClient
from fedledger.node.runner import NodeRunner
from fedledger.node.training import TrainConfig
from fedledger.tasks import get_task
from harness import Harness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def anvil() -> Iterator[AnvilProcess]:
    process = start_anvil(accounts=5)
    yield process
    os.kill(process.pid, signal.SIGCONT)
    process.stop()


@pytest.fixture
def service(anvil: AnvilProcess, tmp_path: Path) -> Iterator[RoundService]:
    deployment = deploy_devnet(connect(anvil.rpc_url), 1)
    svc = RoundService(
        CoordinatorSettings(data_dir=tmp_path / "coordinator", total_rounds=1, round_timeout_s=600),
        LedgerClient(connect(anvil.rpc_url, timeout_s=1), deployment.ledger, devnet_account(1)),
    )
    svc.start(background=False)
    yield svc
    svc.stop()


def freeze(anvil: AnvilProcess) -> None:
    os.kill(anvil.pid, signal.SIGSTOP)


def thaw(anvil: AnvilProcess) -> None:
    os.kill(anvil.pid, signal.SIGCONT)


def test_coordinator_answers_503_while_the_chain_is_down(
    anvil: AnvilProcess, service: RoundService
) -> None:
    org = devnet_account(2)
    chain = LedgerClient(connect(anvil.rpc_url), service.ledger.address)
    body, digest = encode_tensors(
        {n: t * 0 + 0.01 for n, t in get_task("digits").build_model().state_dict().items()}
    )
    chain.with_account(org).commit_update(1, digest, 10)
    harness = Harness(
        service, TestClient(create_app(service)), chain, [org], devnet_account(4), [time.time()]
    )
    upload = harness.make_upload(org, body=body, num_samples=10, commit=False)

    freeze(anvil)
    try:
        response = harness.post(upload)
    finally:
        thaw(anvil)
    assert response.status_code == 503  # type: ignore[attr-defined]
    assert response.json()["code"] == "chain_unavailable"  # type: ignore[attr-defined]
    assert int(response.headers["retry-after"]) > 0  # type: ignore[attr-defined]
    assert service.store.updates_for(1) == []  # nothing accepted that could not be verified

    response = harness.post(upload)  # the chain is back
    assert response.status_code == 201  # type: ignore[attr-defined]


def test_node_retries_with_backoff_until_the_chain_returns(
    anvil: AnvilProcess, service: RoundService, caplog: pytest.LogCaptureFixture
) -> None:
    service.start_driver()
    task = get_task("digits")
    with serve_in_thread(create_app(service)) as url:
        runner = NodeRunner(
            CoordinatorClient(url),
            LedgerClient(
                connect(anvil.rpc_url, timeout_s=1), service.ledger.address, devnet_account(2)
            ),
            task,
            task.partition(0, 1),
            TrainConfig(epochs=1),
            poll_interval_s=0.1,
        )
        freeze(anvil)
        outcomes: list[object] = []
        with caplog.at_level(logging.WARNING, logger="fedledger.node"):
            worker = threading.Thread(target=lambda: outcomes.extend(runner.run()))
            worker.start()
            time.sleep(4)
            thaw(anvil)
            worker.join(timeout=120)
    assert not worker.is_alive()
    assert any("retrying" in record.getMessage() for record in caplog.records)
    assert len(outcomes) == 1
    assert service.ledger.get_round(1).state == RoundState.FINALIZED

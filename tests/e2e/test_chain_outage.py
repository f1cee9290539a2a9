"""The chain goes away (anvil frozen with SIGSTOP) and comes back: nothing unverified is accepted."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedledger.coordinator.api import create_app
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.service import RoundService
from fedledger.demo import serve_in_thread
from fedledger.devnet.anvil import AnvilProcess, start_anvil
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect, devnet_account
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import RoundState
from fedledger.node.client import CoordinatorClient
from fedledger.node.runner import NodeRunner, RoundOutcome
from fedledger.tasks import DigitsTask
from harness import Harness, OneEpochDigits

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
        CoordinatorSettings(
            data_dir=tmp_path / "coordinator",
            total_rounds=1,
            round_timeout_s=600,
            pricing=PricingPolicy(min_aggregated=1),  # one organisation: publish its model
        ),
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
        {n: t * 0 + 0.01 for n, t in DigitsTask().build_model().state_dict().items()}
    )
    chain.with_account(org).commit_update(1, digest, 10)
    harness = Harness(
        service, TestClient(create_app(service)), chain, [org], devnet_account(4), [time.time()]
    )
    upload = harness.make_upload(org, body=body, num_samples=10, commit=False)

    # The only member committed: the commit phase is over (the harness's own wait for it
    # reads the chain, which is about to freeze).
    assert chain.commits_closed(1)
    freeze(anvil)
    try:
        response = harness.post(upload, wait_for_commits=False)
    finally:
        thaw(anvil)
    assert response.status_code == 503  # type: ignore[attr-defined]
    assert response.json()["code"] == "chain_unavailable"  # type: ignore[attr-defined]
    assert int(response.headers["retry-after"]) > 0  # type: ignore[attr-defined]
    assert service.store.updates_for(1) == []  # nothing accepted that could not be verified

    response = harness.post(upload, wait_for_commits=False)  # the chain is back
    assert response.status_code == 201  # type: ignore[attr-defined]


class _Retries(logging.Handler):
    """The delays of the node's "...; retrying in X s" warnings, as they are logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.delays_s: list[float] = []
        self._logged = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"retrying in ([0-9.]+) s", record.getMessage())
        if match:
            with self._logged:
                self.delays_s.append(float(match.group(1)))
                self._logged.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self._logged:
            return self._logged.wait_for(lambda: len(self.delays_s) >= count, timeout_s)


def test_node_retries_with_backoff_until_the_chain_returns(
    anvil: AnvilProcess, service: RoundService, caplog: pytest.LogCaptureFixture
) -> None:
    """While the chain is down the node keeps retrying, each time waiting longer, and uploads
    nothing; once the chain is back it takes part in the round, which is settled on-chain."""
    service.start_driver()
    task = OneEpochDigits()
    org = devnet_account(2)
    retries = _Retries()
    node_log = logging.getLogger("fedledger.node")
    with serve_in_thread(create_app(service)) as url:
        runner = NodeRunner(
            CoordinatorClient(url),
            LedgerClient(connect(anvil.rpc_url, timeout_s=1), service.ledger.address, org),
            task,
            task.load_data("0/1"),
            poll_interval_s=0.1,
        )
        outcomes: list[RoundOutcome] = []
        worker = threading.Thread(target=lambda: outcomes.extend(runner.run()), daemon=True)
        with caplog.at_level(logging.WARNING, logger="fedledger.node"):
            node_log.addHandler(retries)
            try:
                freeze(anvil)
                try:
                    worker.start()
                    # Three failed attempts against the frozen chain, however long they take.
                    assert retries.wait_for(3, timeout_s=60), retries.delays_s
                    assert worker.is_alive() and outcomes == []
                    assert service.store.updates_for(1) == []  # nothing got through
                finally:
                    thaw(anvil)
                worker.join(timeout=120)
            finally:
                node_log.removeHandler(retries)
    assert not worker.is_alive(), "the node did not finish once the chain was back"
    first = retries.delays_s[:3]
    assert first[0] < first[1] < first[2], f"no backoff: {first}"
    assert first[0] == pytest.approx(0.1)  # starts at the poll interval

    [outcome] = outcomes
    assert outcome.round_id == 1
    stored = service.store.updates_for(1)
    assert [(u.organisation.lower(), u.update_hash) for u in stored] == [
        (org.address.lower(), outcome.update_hash)
    ]
    committed = service.ledger.commitment_of(1, org.address)
    assert committed is not None
    assert "0x" + committed.update_hash.hex() == outcome.update_hash
    record = service.ledger.get_round(1)
    assert record.state == RoundState.FINALIZED
    assert service.ledger.reward_of(1, org.address) == record.total_reward > 0

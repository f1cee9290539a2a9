"""Shared fixtures: a coordinator harness on a fresh in-process chain."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from harness import Harness


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    from fastapi.testclient import TestClient

    from fedledger.coordinator.api import create_app
    from fedledger.coordinator.config import CoordinatorSettings
    from fedledger.coordinator.policy import PricingPolicy
    from fedledger.coordinator.service import RoundService
    from fedledger.devnet.deploy import deploy_devnet
    from fedledger.devnet.embedded import embedded_web3
    from fedledger.incentive.chain import devnet_account
    from fedledger.incentive.ledger import LedgerClient
    from harness import NUM_ORGS, Harness

    services: list[RoundService] = []

    def build(**settings: object) -> Harness:
        from fedledger.tasks import load_spec

        w3 = embedded_web3(NUM_ORGS + 3)
        spec = settings.get("task_spec")
        deployment = deploy_devnet(
            w3, NUM_ORGS, task_spec=load_spec(spec).hash if isinstance(spec, Path) else None
        )
        clock = [float(w3.eth.get_block("latest")["timestamp"])]
        defaults: dict[str, object] = {
            "data_dir": tmp_path / f"coordinator{len(services)}",
            "total_rounds": 3,
            "round_timeout_s": 600,
            "quorum": 1,
            "max_upload_bytes": 1 << 20,
            # Three members: tests that leave some out still publish a model (the consortium
            # minimum, min_aggregated = 3 by default, has its own tests).
            "pricing": PricingPolicy(min_aggregated=1),
        }
        service = RoundService(
            CoordinatorSettings(**{**defaults, **settings}),  # type: ignore[arg-type]
            LedgerClient(w3, deployment.ledger, devnet_account(1)),
            clock=lambda: clock[0],
        )
        service.start(background=False)
        services.append(service)
        return Harness(
            service=service,
            client=TestClient(create_app(service)),
            ledger=LedgerClient(w3, deployment.ledger),
            orgs=[devnet_account(2 + k) for k in range(NUM_ORGS)],
            outsider=devnet_account(2 + NUM_ORGS),
            clock=clock,
        )

    yield build
    for service in services:
        service.stop()


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()

"""A node logs what it prints (uploads, settled rounds, the end) under ``fedledger.node``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from fedledger.coordinator.api import create_app
from fedledger.demo import serve_in_thread
from fedledger.node.client import CoordinatorClient
from fedledger.node.runner import NodeRunner
from harness import Harness, OneEpochDigits


def test_a_node_logs_each_upload_each_settled_round_and_the_end(
    make_harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedledger.node")
    harness = make_harness(total_rounds=1)
    harness.service.start_driver()
    task = OneEpochDigits()
    with serve_in_thread(create_app(harness.service)) as url:
        runners = [
            NodeRunner(
                CoordinatorClient(url),
                harness.org_ledger(org),
                task,
                task.load_data(f"{k}/{len(harness.orgs)}"),
                seed=k,
                poll_interval_s=0.02,
                clock=lambda: harness.clock[0],
            )
            for k, org in enumerate(harness.orgs)
        ]
        threads = [threading.Thread(target=r.run) for r in runners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads)

    records = [r for r in caplog.records if r.name == "fedledger.node"]
    by_kind: dict[str, dict[str, dict[str, object]]] = {"uploaded": {}, "settled": {}, "done": {}}
    for record in records:
        fields = vars(record)
        message = record.getMessage()
        kind = (
            "uploaded"
            if message.startswith("round 1: uploaded")
            else "settled"
            if message.startswith("round 1 settled")
            else "done"
            if message.startswith("training done after round 1")
            else None
        )
        if kind is not None:
            assert fields["organisation"] not in by_kind[kind], f"logged twice: {message}"
            by_kind[kind][str(fields["organisation"])] = fields
    addresses = {org.address for org in harness.orgs}
    assert {kind: set(found) for kind, found in by_kind.items()} == {
        "uploaded": addresses,
        "settled": addresses,
        "done": addresses,
    }
    validation = dict(harness.service.round_result(1).validation_metrics)
    for org in harness.orgs:
        uploaded, settled = by_kind["uploaded"][org.address], by_kind["settled"][org.address]
        committed = harness.ledger.commitment_of(1, org.address)
        assert committed is not None
        assert uploaded["update_hash"] == "0x" + committed.update_hash.hex()
        assert uploaded["num_samples"] == committed.num_samples
        assert settled["reward_units"] == str(harness.ledger.reward_of(1, org.address))
        assert settled["validation"] == validation != {}
        assert by_kind["done"][org.address]["rounds_taken_part"] == 1

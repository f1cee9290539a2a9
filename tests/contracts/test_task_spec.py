"""The task spec on the ledger: the admin records its hash before round 1, no round opens without
one, and a coordinator, a node or an auditor holding another spec is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from eth_hash.auto import keccak

from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.service import RoundService
from fedledger.devnet.deploy import deploy_devnet
from fedledger.devnet.embedded import embedded_web3
from fedledger.errors import ContractRevert, ErrorCode, TaskError
from fedledger.incentive.chain import devnet_account
from fedledger.incentive.ledger import LedgerClient
from fedledger.tasks import BUILTIN_DIGITS

if TYPE_CHECKING:
    from tests.contracts.conftest import Chain

ADMIN_ROLE = b"\x00" * 32
ExpectRevert = Callable[..., object]
OpenRound = Callable[..., tuple[int, int]]


def test_a_devnet_records_the_built_in_spec_and_the_admin_may_replace_it_before_round_1(
    chain: Chain, admin_ledger: LedgerClient, expect_revert: ExpectRevert
) -> None:
    builtin = keccak(BUILTIN_DIGITS.read_bytes())
    assert chain.ledger.task_spec() == builtin
    other = keccak(b"version = 1\n")
    receipt = admin_ledger.set_task_spec(other)
    events = chain.ledger.contract.events.TaskSpecSet().process_receipt(receipt)
    assert [dict(e["args"]) for e in events] == [{"previousSpecHash": builtin, "specHash": other}]
    assert chain.ledger.task_spec() == other
    expect_revert(lambda: admin_ledger.set_task_spec(b"\x00" * 32), "ZeroHash")


def test_only_the_admin_records_the_spec(
    chain: Chain, coordinator_ledger: LedgerClient, expect_revert: ExpectRevert
) -> None:
    expect_revert(
        lambda: coordinator_ledger.set_task_spec(b"\x01" * 32),
        "AccessControlUnauthorizedAccount",
        chain.coordinator.address,
        ADMIN_ROLE,
    )


def test_the_spec_is_frozen_once_round_1_opens(
    admin_ledger: LedgerClient, open_round: OpenRound, expect_revert: ExpectRevert
) -> None:
    open_round()
    expect_revert(lambda: admin_ledger.set_task_spec(b"\x01" * 32), "TaskSpecFrozen", 1)


def test_no_round_opens_before_a_spec_is_recorded() -> None:
    w3 = embedded_web3(num_accounts=3)
    admin, coordinator = devnet_account(0), devnet_account(1)
    ledger, _ = LedgerClient.deploy(w3, admin, coordinator.address)
    assert ledger.task_spec() == b"\x00" * 32
    as_coordinator = ledger.with_account(coordinator)
    deadline = int(w3.eth.get_block("latest")["timestamp"]) + 600
    with pytest.raises(ContractRevert) as refused:
        as_coordinator.open_round(1, b"\x11" * 32, deadline)
    assert refused.value.error == "TaskSpecUnset"
    ledger.set_task_spec(b"\x01" * 32)
    as_coordinator.open_round(1, b"\x11" * 32, deadline)
    assert ledger.round_count() == 1


def test_a_coordinator_with_another_spec_refuses_to_start(chain: Chain, tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_bytes(BUILTIN_DIGITS.read_bytes().replace(b"epochs = 3", b"epochs = 2"))
    settings = CoordinatorSettings(data_dir=tmp_path / "coordinator", task_spec=spec)
    service = RoundService(settings, chain.as_(chain.coordinator))
    with pytest.raises(TaskError) as refused:
        service.start(background=False)
    assert refused.value.code is ErrorCode.SPEC_MISMATCH
    assert refused.value.details["spec_hash"] == "0x" + keccak(spec.read_bytes()).hex()
    assert "start with the consortium's spec file" in refused.value.message
    assert not (tmp_path / "coordinator").exists()  # refused before touching the data dir


def test_a_coordinator_on_a_ledger_without_a_spec_says_how_to_record_one(tmp_path: Path) -> None:
    w3 = embedded_web3(num_accounts=3)
    admin, coordinator = devnet_account(0), devnet_account(1)
    ledger, _ = LedgerClient.deploy(w3, admin, coordinator.address)
    service = RoundService(
        CoordinatorSettings(data_dir=tmp_path / "c"), ledger.with_account(coordinator)
    )
    with pytest.raises(TaskError, match="fedledger task-spec") as refused:
        service.start(background=False)
    assert refused.value.code is ErrorCode.SPEC_MISMATCH


def test_a_regression_metric_cannot_value_a_classification_task(tmp_path: Path) -> None:
    from fedledger.coordinator.policy import PricingPolicy
    from fedledger.errors import CoordinatorError

    w3 = embedded_web3(num_accounts=3)
    deployment = deploy_devnet(w3, 1)
    settings = CoordinatorSettings(data_dir=tmp_path / "c", pricing=PricingPolicy(metric="neg_mse"))
    service = RoundService(settings, LedgerClient(w3, deployment.ledger, devnet_account(1)))
    with pytest.raises(CoordinatorError, match="cannot value the classification task") as refused:
        service.start(background=False)
    assert refused.value.code is ErrorCode.INVALID_POLICY

"""The node checks the coordinator's receipt of each upload (over loopback HTTP, on the in-process
chain) and keeps it on disk; a receipt that proves nothing is refused with ``bad_receipt``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedledger.coordinator.api import create_app
from fedledger.demo import serve_in_thread
from fedledger.errors import ErrorCode, ReceiptError
from fedledger.incentive.commitment import keccak
from fedledger.node.client import CoordinatorClient
from fedledger.node.runner import NodeRunner
from fedledger.receipts import ReceiptBox, ReceiptSigner, read_receipt, verify_receipt
from harness import Harness, OneEpochDigits


def _runner(harness: Harness, url: str, box: ReceiptBox) -> NodeRunner:
    """Organisation 0's node, keeping its receipts in ``box``."""
    task = OneEpochDigits()
    return NodeRunner(
        CoordinatorClient(url),
        harness.org_ledger(harness.orgs[0]),
        task,
        task.load_data(f"0/{len(harness.orgs)}"),
        receipts=box,
        poll_interval_s=0.02,
        clock=lambda: harness.clock[0],
    )


def _others_commit(harness: Harness) -> None:
    """Organisations 1 and 2 commit: node 0's commitment then ends the commit phase."""
    for k in (1, 2):
        harness.make_upload(harness.orgs[k], seed=k)


def test_a_node_checks_each_receipt_and_keeps_it_across_restarts(
    harness: Harness, tmp_path: Path
) -> None:
    _others_commit(harness)
    box = ReceiptBox(tmp_path / "receipts")
    with serve_in_thread(create_app(harness.service)) as url:
        node = _runner(harness, url, box)
        outcome = node.take_part(node.client.current_round())
        assert outcome is not None and outcome.receipt is not None
        kept = read_receipt(tmp_path / "receipts" / "round-0001.json")
        # A restarted node (same folder) re-uploads: the original receipt, kept the same.
        restarted = _runner(harness, url, ReceiptBox(tmp_path / "receipts"))
        again = restarted.take_part(restarted.client.current_round())
    assert (
        again is not None
        and again.duplicate
        and again.receipt == outcome.receipt.model_copy(update={"duplicate": True})
    )
    assert kept == outcome.receipt and ReceiptBox(tmp_path / "receipts").get(1) == kept
    committed = harness.ledger.commitment_of(1, harness.orgs[0].address)
    assert committed is not None and kept.update_hash == "0x" + committed.update_hash.hex()
    stored = harness.service.store.get_update(1, harness.orgs[0].address)
    assert stored is not None and stored.update_hash == kept.update_hash
    blob = harness.service.store.get_blob(stored.update_hash)
    assert blob is not None and keccak(blob) == committed.update_hash
    account = harness.service.ledger.account
    assert account is not None
    chain_id = harness.ledger.chain_id()
    assert verify_receipt(kept, harness.ledger, chain_id=chain_id) == account.address


@pytest.mark.parametrize("forgery", ["outsider_key", "other_chain"])
def test_a_node_refuses_a_receipt_that_proves_nothing(
    harness: Harness, tmp_path: Path, forgery: str
) -> None:
    """A coordinator signing with a key that lacks COORDINATOR_ROLE, or signing for another
    chain: the node refuses the receipt with ``bad_receipt`` and keeps nothing."""
    chain_id = harness.ledger.chain_id()
    coordinator = harness.service.ledger.account
    assert coordinator is not None
    harness.service.receipt_signer = (
        ReceiptSigner(harness.outsider, chain_id=chain_id, ledger=harness.ledger.address)
        if forgery == "outsider_key"
        else ReceiptSigner(coordinator, chain_id=chain_id + 1, ledger=harness.ledger.address)
    )
    _others_commit(harness)
    box = ReceiptBox(tmp_path / "receipts")
    with serve_in_thread(create_app(harness.service)) as url:
        node = _runner(harness, url, box)
        with pytest.raises(ReceiptError) as refused:
            node.take_part(node.client.current_round())
    assert refused.value.code is ErrorCode.BAD_RECEIPT
    assert box.get(1) is None and not (tmp_path / "receipts").exists()
    assert 1 not in node.done_rounds
    # The coordinator did store it: only the receipt was wrong.
    assert harness.service.store.get_update(1, harness.orgs[0].address) is not None

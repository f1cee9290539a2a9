"""Upload receipts: the coordinator signs each one with its key, over exactly the fields it shows;
``verify_receipt`` takes only those signed by an account holding COORDINATOR_ROLE on this ledger."""

from __future__ import annotations

import pytest

from fedledger import wire
from fedledger.errors import ErrorCode, ReceiptError
from fedledger.incentive.signing import UploadAuthorization, recover_receipt_signer
from fedledger.receipts import ReceiptSigner, check_acknowledges, verify_receipt
from harness import Harness


def _receipt(harness: Harness, k: int = 0) -> tuple[wire.UploadReceipt, UploadAuthorization]:
    upload = harness.make_upload(harness.orgs[k], seed=k)
    response = harness.post(upload)
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    receipt = wire.UploadReceipt.model_validate(response.json())  # type: ignore[attr-defined]
    auth = UploadAuthorization(
        organisation=harness.orgs[k].address,
        round_id=upload.round_id,
        update_hash=upload.digest,
        num_samples=100,
        nonce=0,
        expiry=0,
    )
    return receipt, auth


def test_an_upload_s_receipt_is_signed_by_the_coordinator_over_what_it_shows(
    harness: Harness,
) -> None:
    receipt, auth = _receipt(harness)
    coordinator = harness.service.ledger.account
    assert coordinator is not None
    chain_id = harness.ledger.chain_id()
    assert (receipt.chain_id, receipt.ledger) == (chain_id, harness.ledger.address)
    assert receipt.coordinator == coordinator.address
    signer = recover_receipt_signer(
        receipt.acknowledgement(), receipt.signature, chain_id=chain_id, ledger=receipt.ledger
    )
    assert signer == coordinator.address
    assert verify_receipt(receipt, harness.ledger, chain_id=chain_id) == coordinator.address
    check_acknowledges(receipt, auth)
    stored = harness.service.store.get_update(1, harness.orgs[0].address)
    assert stored is not None and receipt.received_at == int(stored.received_at)


def test_a_re_upload_gets_the_original_receipt_signed_the_same(harness: Harness) -> None:
    upload = harness.make_upload(harness.orgs[0])
    first = harness.post(upload).json()  # type: ignore[attr-defined]
    harness.advance(30)  # later: the receipt still says when the original was received
    again = harness.make_upload(harness.orgs[0], body=upload.body, commit=False)
    response = harness.post(again)
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert response.json() == {**first, "duplicate": True}  # type: ignore[attr-defined]


def test_receipts_that_do_not_prove_themselves_are_refused(harness: Harness) -> None:
    """Each field altered, another chain or ledger, a signer without the role, a signature that
    is not one: every one is ``bad_receipt``."""
    receipt, _ = _receipt(harness)
    chain_id = harness.ledger.chain_id()
    other_ledger = harness.outsider.address  # any other address stands for another ledger
    forged = {
        "round": receipt.model_copy(update={"round_id": 2}),
        "organisation": receipt.model_copy(update={"organisation": harness.orgs[1].address}),
        "hash": receipt.model_copy(update={"update_hash": "0x" + "11" * 32}),
        "samples": receipt.model_copy(update={"num_samples": receipt.num_samples + 1}),
        "received_at": receipt.model_copy(update={"received_at": receipt.received_at - 1}),
        "another chain, shown": receipt.model_copy(update={"chain_id": chain_id + 1}),
        "another ledger, shown": receipt.model_copy(update={"ledger": other_ledger}),
        "outsider's key": ReceiptSigner(
            harness.outsider, chain_id=chain_id, ledger=harness.ledger.address
        ).receipt(receipt.acknowledgement()),
        "organisation's own key": ReceiptSigner(
            harness.orgs[0], chain_id=chain_id, ledger=harness.ledger.address
        ).receipt(receipt.acknowledgement()),
        "not a signature": receipt.model_copy(update={"signature": "0x" + "11" * 64}),
        "hash not 32 bytes": receipt.model_copy(update={"update_hash": "0x1234"}),
    }
    for case, bad in forged.items():
        with pytest.raises(ReceiptError) as refused:
            verify_receipt(bad, harness.ledger, chain_id=chain_id)
        assert refused.value.code is ErrorCode.BAD_RECEIPT, case
    # Signed by the coordinator's key, but for another chain: the role is no help there.
    account = harness.service.ledger.account
    assert account is not None
    elsewhere = ReceiptSigner(account, chain_id=chain_id + 1, ledger=harness.ledger.address)
    moved = elsewhere.receipt(receipt.acknowledgement()).model_copy(update={"chain_id": chain_id})
    with pytest.raises(ReceiptError, match="recovers to") as refused:
        verify_receipt(moved, harness.ledger, chain_id=chain_id)
    assert refused.value.code is ErrorCode.BAD_RECEIPT
    assert verify_receipt(receipt, harness.ledger, chain_id=chain_id) == account.address


def test_a_receipt_for_other_fields_than_the_upload_is_a_mismatch(harness: Harness) -> None:
    receipt, auth = _receipt(harness)
    other = UploadAuthorization(
        organisation=auth.organisation,
        round_id=auth.round_id,
        update_hash=bytes(32),
        num_samples=auth.num_samples + 1,
        nonce=0,
        expiry=0,
    )
    with pytest.raises(ReceiptError) as refused:
        check_acknowledges(receipt, other)
    assert refused.value.code is ErrorCode.RECEIPT_MISMATCH
    assert refused.value.details["fields"] == ["update_hash", "num_samples"]

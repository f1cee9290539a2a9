"""Upload receipts: the coordinator signs one for each upload it stores, nodes check and keep them,
``fedledger audit --receipt`` proves with them an acknowledged upload the coordinator dropped.

Shared by the coordinator (which signs) and the node and the audit (which verify), as the wire
schemas are: a receipt is only worth something if both sides read it the same way.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from eth_account.signers.local import LocalAccount
from pydantic import ValidationError
from web3 import Web3

from fedledger import wire
from fedledger.errors import ErrorCode, ReceiptError, SignatureError
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.signing import (
    UploadAcknowledgement,
    UploadAuthorization,
    recover_receipt_signer,
    sign_receipt,
)


class ReceiptSigner:
    """The coordinator's key and the domain it signs receipts in (its chain and ledger)."""

    def __init__(self, account: LocalAccount, *, chain_id: int, ledger: str) -> None:
        self.account = account
        self.chain_id = chain_id
        self.ledger = Web3.to_checksum_address(ledger)

    def receipt(self, ack: UploadAcknowledgement, *, duplicate: bool = False) -> wire.UploadReceipt:
        """The signed receipt of ``ack``; the same receipt, signature included, each time it is
        asked for the same upload (signatures are deterministic), so a re-upload gets the
        original."""
        signature = sign_receipt(self.account, ack, chain_id=self.chain_id, ledger=self.ledger)
        return wire.UploadReceipt(
            round_id=ack.round_id,
            organisation=Web3.to_checksum_address(ack.organisation),
            update_hash="0x" + ack.update_hash.hex(),
            num_samples=ack.num_samples,
            received_at=ack.received_at,
            chain_id=self.chain_id,
            ledger=self.ledger,
            coordinator=self.account.address,
            signature=signature,
            duplicate=duplicate,
        )


def verify_receipt(receipt: wire.UploadReceipt, ledger: LedgerClient, *, chain_id: int) -> str:
    """The coordinator that signed ``receipt``, once it is known to hold ``COORDINATOR_ROLE`` on
    ``ledger`` (on ``chain_id``); ``bad_receipt`` otherwise: a receipt signed for another chain
    or ledger, by another key than the one it names, or by an account without the role proves
    nothing about the upload."""
    where = f"the receipt of round {receipt.round_id} for {receipt.organisation}"
    if receipt.chain_id != chain_id or receipt.ledger.lower() != ledger.address.lower():
        raise ReceiptError(
            ErrorCode.BAD_RECEIPT,
            f"{where} was signed for chain {receipt.chain_id}, ledger {receipt.ledger}, "
            f"not chain {chain_id}, ledger {ledger.address}",
        )
    try:
        signer = recover_receipt_signer(
            receipt.acknowledgement(), receipt.signature, chain_id=chain_id, ledger=ledger.address
        )
    except (SignatureError, ValueError) as exc:
        raise ReceiptError(ErrorCode.BAD_RECEIPT, f"{where} is malformed: {exc}") from exc
    if signer.lower() != receipt.coordinator.lower():
        raise ReceiptError(
            ErrorCode.BAD_RECEIPT,
            f"{where} names coordinator {receipt.coordinator}, but its signature recovers to "
            f"{signer}: a field was altered after signing, or another key signed it",
            signer=signer,
        )
    if not ledger.has_coordinator_role(signer):
        raise ReceiptError(
            ErrorCode.BAD_RECEIPT,
            f"{where} is signed by {signer}, which does not hold COORDINATOR_ROLE on ledger "
            f"{ledger.address}: it proves nothing",
            signer=signer,
        )
    return signer


def check_acknowledges(receipt: wire.UploadReceipt, auth: UploadAuthorization) -> None:
    """Refuse (``receipt_mismatch``) a receipt whose signed fields are not those of ``auth``, the
    upload it answers: it would prove another upload than this one."""
    expected = {
        "round_id": auth.round_id,
        "organisation": auth.organisation.lower(),
        "update_hash": "0x" + auth.update_hash.hex(),
        "num_samples": auth.num_samples,
    }
    shown = {
        "round_id": receipt.round_id,
        "organisation": receipt.organisation.lower(),
        "update_hash": receipt.update_hash.lower(),
        "num_samples": receipt.num_samples,
    }
    differ = [f"{k} {shown[k]} != {v}" for k, v in expected.items() if shown[k] != v]
    if differ:
        raise ReceiptError(
            ErrorCode.RECEIPT_MISMATCH,
            f"the coordinator's receipt for the upload of round {auth.round_id} acknowledges "
            f"another upload: {'; '.join(differ)} (receipt != uploaded)",
            fields=[d.split(" ", 1)[0] for d in differ],
        )


def read_receipt(path: Path) -> wire.UploadReceipt:
    """A receipt kept as a JSON file; ``bad_receipt`` when it cannot be read as one."""
    try:
        return wire.UploadReceipt.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ReceiptError(
            ErrorCode.BAD_RECEIPT, f"{path}: cannot read the receipt ({exc.strerror})"
        ) from exc
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) or "(file)" for e in exc.errors())
        raise ReceiptError(
            ErrorCode.BAD_RECEIPT, f"{path}: not a signed upload receipt (check {fields})"
        ) from exc


class ReceiptBox:
    """A node's receipts, one JSON file a round (``round-NNNN.json``) in ``folder``: what proves,
    after any restart, which uploads the coordinator acknowledged. Written atomically (temp file,
    fsync, rename), so a crash leaves the file whole or absent."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, round_id: int) -> Path:
        return self.folder / f"round-{round_id:04d}.json"

    def keep(self, receipt: wire.UploadReceipt) -> Path:
        """Write ``receipt`` (its signed fields, domain, signer and signature) to its file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(receipt.round_id)
        text = json.dumps(receipt.model_dump(mode="json", exclude={"duplicate"}), indent=2)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def get(self, round_id: int) -> wire.UploadReceipt | None:
        """The receipt kept for ``round_id``, if any."""
        path = self.path(round_id)
        return read_receipt(path) if path.exists() else None

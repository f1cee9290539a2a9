"""Receipt files: a node's ``ReceiptBox`` writes one a round and reads it back whole; a file that
is not a signed receipt is ``bad_receipt``; ``fedledger audit --receipt`` takes the receipts'
round and refuses receipts of another one (no chain needed for any of it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedledger.cli import app
from fedledger.errors import ErrorCode, ReceiptError
from fedledger.incentive.chain import devnet_account
from fedledger.incentive.signing import UploadAcknowledgement
from fedledger.receipts import ReceiptBox, ReceiptSigner, read_receipt

LEDGER = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def _receipt(round_id: int = 3) -> object:
    ack = UploadAcknowledgement(
        round_id=round_id,
        organisation=devnet_account(2).address,
        update_hash=bytes(range(32)),
        num_samples=120,
        received_at=1_800_000_000,
    )
    return ReceiptSigner(devnet_account(1), chain_id=31337, ledger=LEDGER).receipt(
        ack, duplicate=True
    )


def test_a_receipt_box_keeps_one_file_a_round_and_reads_it_back(tmp_path: Path) -> None:
    box = ReceiptBox(tmp_path / "receipts")
    receipt = _receipt()
    path = box.keep(receipt)  # type: ignore[arg-type]
    assert path == tmp_path / "receipts" / "round-0003.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["round-0003.json"]  # no temp file
    # What was signed, its domain, signer and signature; not the unsigned duplicate flag.
    assert '"duplicate"' not in path.read_text()
    assert read_receipt(path) == receipt.model_copy(update={"duplicate": False})  # type: ignore[attr-defined]
    assert ReceiptBox(tmp_path / "receipts").get(3) == read_receipt(path)
    assert box.get(4) is None


@pytest.mark.parametrize(
    "content", [b"", b"not json", b'{"round_id": 3}', b"[]"], ids=["empty", "text", "part", "list"]
)
def test_a_file_that_is_not_a_signed_receipt_is_bad_receipt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "round-0003.json"
    path.write_bytes(content)
    with pytest.raises(ReceiptError) as refused:
        read_receipt(path)
    assert refused.value.code is ErrorCode.BAD_RECEIPT
    assert str(path) in refused.value.message


def test_audit_takes_the_round_of_its_receipts_and_refuses_mixed_ones(tmp_path: Path) -> None:
    box = ReceiptBox(tmp_path)
    third, fourth = box.keep(_receipt(3)), box.keep(_receipt(4))  # type: ignore[arg-type]
    runner = CliRunner()
    deployment = ["--deployment", str(tmp_path / "none.json")]
    refused = runner.invoke(app, ["audit", *deployment])
    assert refused.exit_code == 1 and "give --round, or --receipt files" in refused.output
    mixed = runner.invoke(app, ["audit", "--receipt", str(third), "--receipt", str(fourth)])
    assert mixed.exit_code == 1 and "rounds [3, 4]" in mixed.output
    other = runner.invoke(app, ["audit", "--round", "2", "--receipt", str(third), *deployment])
    assert other.exit_code == 1 and "is a receipt for round 3, not round 2" in other.output
    # One round's receipt: past the arguments, to the deployment file (absent here).
    taken = runner.invoke(app, ["audit", "--receipt", str(third), *deployment])
    assert taken.exit_code == 1 and "no deployment file at" in taken.output

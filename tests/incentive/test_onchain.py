"""The on-chain encodings: flag bits as documented for auditors, method names, hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedledger.incentive.onchain import (
    FORFEITING,
    Flag,
    RoundState,
    decode_method,
    encode_method,
    flag_names,
    hex32,
)

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_flag_bits_are_the_ones_documented_for_auditors() -> None:
    row = next(line for line in ARCHITECTURE.read_text().splitlines() if "| flags (" in line)
    documented = row.rsplit("|", 2)[-2].strip()
    assert documented == ", ".join(f"{int(f)} {f.name.lower()}" for f in Flag if f.name)
    assert sum(Flag) == FORFEITING  # every flag costs the round's reward today


def test_flag_bits_are_documented_on_the_ledger_for_readers_of_the_contract_alone() -> None:
    source = (ARCHITECTURE.parents[1] / "contracts" / "FedLedger.sol").read_text()
    natspec = " ".join(
        line.strip().removeprefix("/// @dev").removeprefix("///").strip()
        for line in source.split("function flagsOf(")[0].splitlines()[-4:-1]
    )
    assert natspec.startswith(
        "Bits: " + ", ".join(f"{int(f)} {f.name.lower()}" for f in Flag if f.name)
    )


def test_flag_names_lowest_bit_first() -> None:
    assert flag_names(int(Flag.COPIED_UPDATE | Flag.NORM_CLIPPED)) == [
        "norm_clipped",
        "copied_update",
    ]
    assert flag_names(0) == []


def test_method_names_round_trip_and_refuse_what_does_not_fit() -> None:
    raw = encode_method("stratified-kernel:neg_log_loss")
    assert len(raw) == 32 and decode_method(raw) == "stratified-kernel:neg_log_loss"
    assert decode_method(b"\x00" * 32) == ""
    for bad in ("", "x" * 33, "accuracy\u00e9"):
        with pytest.raises(ValueError):
            encode_method(bad)


def test_hashes_and_states() -> None:
    assert hex32(bytes(range(32))) == "0x" + bytes(range(32)).hex()
    assert [s.value for s in RoundState] == [0, 1, 2]

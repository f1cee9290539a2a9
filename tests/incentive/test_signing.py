"""EIP-712 upload authorisations and receipts: round trip, binding to domain and fields, malformed
signatures."""

from __future__ import annotations

import dataclasses

import pytest
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_keys import keys
from hypothesis import given
from hypothesis import strategies as st
from web3 import Web3

from fedledger.errors import SignatureError
from fedledger.incentive.chain import devnet_account
from fedledger.incentive.signing import (
    SECP256K1_N,
    UploadAcknowledgement,
    UploadAuthorization,
    recover_receipt_signer,
    recover_signer,
    sign_receipt,
    sign_upload,
    typed_data,
)

ANVIL_CHAIN_ID = 31337
ETH_TESTER_CHAIN_ID = 131277322940537
LEDGER = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER_LEDGER = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
ORG = devnet_account(2)
OTHER_ORG = devnet_account(3)


def authorization(**changes: object) -> UploadAuthorization:
    base = UploadAuthorization(
        organisation=ORG.address,
        round_id=4,
        update_hash=bytes(range(32)),
        num_samples=1_000,
        nonce=123_456_789,
        expiry=1_800_000_000,
    )
    return dataclasses.replace(base, **changes)


def sign(account: LocalAccount, auth: UploadAuthorization) -> str:
    return str(sign_upload(account, auth, chain_id=ANVIL_CHAIN_ID, ledger=LEDGER))


def recover(
    auth: UploadAuthorization,
    signature: str,
    *,
    chain_id: int = ANVIL_CHAIN_ID,
    ledger: str = LEDGER,
) -> str:
    return str(recover_signer(auth, signature, chain_id=chain_id, ledger=ledger))


uint256 = st.integers(min_value=0, max_value=2**256 - 1)
authorizations = st.builds(
    UploadAuthorization,
    organisation=st.sampled_from([ORG.address, OTHER_ORG.address]),
    round_id=uint256,
    update_hash=st.binary(min_size=32, max_size=32),
    num_samples=uint256,
    nonce=uint256,
    expiry=uint256,
)


# ------------------------------------------------------------------ round trip


@given(authorizations, st.sampled_from([ANVIL_CHAIN_ID, ETH_TESTER_CHAIN_ID, 1]))
def test_recover_returns_the_signer(auth: UploadAuthorization, chain_id: int) -> None:
    signature = sign_upload(ORG, auth, chain_id=chain_id, ledger=LEDGER)
    assert recover_signer(auth, signature, chain_id=chain_id, ledger=LEDGER) == ORG.address


def test_signature_is_65_bytes_of_0x_hex() -> None:
    signature = sign(ORG, authorization())
    assert signature.startswith("0x")
    assert len(bytes.fromhex(signature[2:])) == 65


def test_recover_accepts_signature_without_0x_and_lower_case_ledger() -> None:
    auth = authorization()
    signature = sign(ORG, auth)
    assert recover(auth, signature[2:], ledger=LEDGER.lower()) == ORG.address


def test_recover_identifies_whoever_signed() -> None:
    auth = authorization()  # names ORG, but OTHER_ORG signs it
    assert recover(auth, sign(OTHER_ORG, auth)) == OTHER_ORG.address


def test_signing_is_deterministic() -> None:
    assert sign(ORG, authorization()) == sign(ORG, authorization())


def test_new_nonces_are_128_bit_and_fresh() -> None:
    nonces = {UploadAuthorization.new_nonce() for _ in range(64)}
    assert len(nonces) == 64
    assert all(0 <= n < 2**128 for n in nonces)


# ------------------------------------------------------------------ binding


def test_signature_is_bound_to_the_chain_id() -> None:
    auth = authorization()
    signature = sign(ORG, auth)
    assert recover(auth, signature, chain_id=ETH_TESTER_CHAIN_ID) != ORG.address
    assert recover(auth, signature, chain_id=ANVIL_CHAIN_ID + 1) != ORG.address


def test_signature_is_bound_to_the_ledger_address() -> None:
    auth = authorization()
    assert recover(auth, sign(ORG, auth), ledger=OTHER_LEDGER) != ORG.address


@pytest.mark.parametrize(
    "changes",
    [
        {"round_id": 5},
        {"update_hash": bytes(range(1, 33))},
        {"update_hash": bytes(31) + b"\x01"},
        {"num_samples": 1_001},
        {"nonce": 123_456_790},
        {"expiry": 1_800_000_001},
        {"organisation": OTHER_ORG.address},
    ],
    ids=["round", "hash", "hash-last-byte", "samples", "nonce", "expiry", "organisation"],
)
def test_any_changed_field_breaks_the_signature(changes: dict[str, object]) -> None:
    signature = sign(ORG, authorization())
    assert recover(authorization(**changes), signature) != ORG.address


@given(authorizations, authorizations)
def test_signature_does_not_carry_over_to_another_authorization(
    signed: UploadAuthorization, other: UploadAuthorization
) -> None:
    signature = sign(ORG, signed)
    recovered = recover(other, signature)
    assert (recovered == ORG.address) == (other == signed)


# ------------------------------------------------------------------ malformed signatures


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "0x",
        "0x" + "11" * 64,
        "0x" + "11" * 66,
        "0x" + "1" * 129,
        "0x" + "zz" * 65,
        "0x" + "11" * 64 + "g1",
        "not a signature",
        "0x" + "11" * 64 + "05",  # v is neither 27/28 nor 0/1
    ],
    ids=[
        "empty",
        "bare-0x",
        "64-bytes",
        "66-bytes",
        "odd-length",
        "non-hex",
        "bad-last-byte",
        "text",
        "bad-v",
    ],
)
def test_malformed_signatures_raise_bad_signature(signature: str) -> None:
    with pytest.raises(SignatureError) as info:
        recover(authorization(), signature)
    assert info.value.code == "bad_signature"


def test_a_signature_truncated_by_one_byte_is_malformed() -> None:
    signature = sign(ORG, authorization())
    with pytest.raises(SignatureError) as info:
        recover(authorization(), signature[:-2])
    assert info.value.code == "bad_signature"


def test_the_high_s_twin_of_a_valid_signature_is_refused() -> None:
    """(r, n - s) with v flipped verifies too (secp256k1 malleability); EIP-2 takes low s only."""
    auth = authorization()
    raw = bytes.fromhex(sign(ORG, auth).removeprefix("0x"))
    r, s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
    assert s <= SECP256K1_N // 2  # eth-account signs low s
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28
    # The twin is a valid signature of the same signer as far as bare ECDSA goes ...
    digest = bytes(Web3.keccak(b"\x19\x01" + _domain_and_struct(auth)))
    recovered = keys.Signature(vrs=((v - 27) ^ 1, int.from_bytes(r, "big"), SECP256K1_N - s))
    assert recovered.recover_public_key_from_msg_hash(digest).to_checksum_address() == ORG.address
    # ... and the coordinator refuses it all the same.
    with pytest.raises(SignatureError) as info:
        recover(auth, "0x" + twin.hex())
    assert info.value.code == "bad_signature"
    assert "low s" in str(info.value)
    assert recover(auth, "0x" + raw.hex()) == ORG.address


def _domain_and_struct(auth: UploadAuthorization) -> bytes:
    signable = encode_typed_data(
        full_message=typed_data(auth, chain_id=ANVIL_CHAIN_ID, ledger=LEDGER)
    )
    return bytes(signable.header) + bytes(signable.body)


# ------------------------------------------------------------------ receipts

COORDINATOR = devnet_account(1)


def acknowledgement(**changes: object) -> UploadAcknowledgement:
    base = UploadAcknowledgement(
        round_id=4,
        organisation=ORG.address,
        update_hash=bytes(range(32)),
        num_samples=1_000,
        received_at=1_800_000_000,
    )
    return dataclasses.replace(base, **changes)


def test_a_receipt_recovers_to_the_coordinator_that_signed_it() -> None:
    ack = acknowledgement()
    signature = sign_receipt(COORDINATOR, ack, chain_id=ANVIL_CHAIN_ID, ledger=LEDGER)
    assert len(bytes.fromhex(signature.removeprefix("0x"))) == 65
    recovered = recover_receipt_signer(ack, signature, chain_id=ANVIL_CHAIN_ID, ledger=LEDGER)
    assert recovered == COORDINATOR.address
    # Signed again, the same receipt: a re-upload gets the original, signature and all.
    assert sign_receipt(COORDINATOR, ack, chain_id=ANVIL_CHAIN_ID, ledger=LEDGER) == signature


@pytest.mark.parametrize(
    ("changes", "chain_id", "ledger"),
    [
        ({"round_id": 5}, ANVIL_CHAIN_ID, LEDGER),
        ({"organisation": OTHER_ORG.address}, ANVIL_CHAIN_ID, LEDGER),
        ({"update_hash": bytes(31) + b"\x01"}, ANVIL_CHAIN_ID, LEDGER),
        ({"num_samples": 999}, ANVIL_CHAIN_ID, LEDGER),
        ({"received_at": 1_800_000_001}, ANVIL_CHAIN_ID, LEDGER),
        ({}, ETH_TESTER_CHAIN_ID, LEDGER),
        ({}, ANVIL_CHAIN_ID, OTHER_LEDGER),
    ],
    ids=["round", "organisation", "hash", "samples", "received-at", "chain-id", "ledger"],
)
def test_any_changed_field_or_domain_breaks_a_receipt(
    changes: dict[str, object], chain_id: int, ledger: str
) -> None:
    signature = sign_receipt(COORDINATOR, acknowledgement(), chain_id=ANVIL_CHAIN_ID, ledger=LEDGER)
    recovered = recover_receipt_signer(
        acknowledgement(**changes), signature, chain_id=chain_id, ledger=ledger
    )
    assert recovered != COORDINATOR.address


def test_a_receipt_is_not_an_upload_authorisation() -> None:
    """Other types, other digests: a coordinator's receipt cannot pass for anything else."""
    auth = authorization(round_id=4, num_samples=1_000)
    signature = sign_receipt(COORDINATOR, acknowledgement(), chain_id=ANVIL_CHAIN_ID, ledger=LEDGER)
    assert recover(auth, signature) != COORDINATOR.address


def test_the_high_s_twin_of_a_receipt_signature_is_refused() -> None:
    ack = acknowledgement()
    raw = bytes.fromhex(
        sign_receipt(COORDINATOR, ack, chain_id=ANVIL_CHAIN_ID, ledger=LEDGER).removeprefix("0x")
    )
    s = int.from_bytes(raw[32:64], "big")
    twin = raw[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - raw[64]])
    with pytest.raises(SignatureError) as info:
        recover_receipt_signer(ack, "0x" + twin.hex(), chain_id=ANVIL_CHAIN_ID, ledger=LEDGER)
    assert info.value.code == "bad_signature"

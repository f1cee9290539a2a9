"""EIP-712 signed messages, bound to the chain id and the ledger contract: an organisation's upload
authorisation and read request, the coordinator's receipt for an upload."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from web3 import Web3

from fedledger.errors import ErrorCode, SignatureError

DOMAIN_NAME = "fedledger"
DOMAIN_VERSION = "1"

_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]

READ_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": _DOMAIN_TYPE,
    "Read": [
        {"name": "reader", "type": "address"},
        {"name": "expiry", "type": "uint256"},
    ],
}
"""A member's request to read the round results only members see (sample counts, who was
aggregated): who reads, until when, for which ledger on which chain."""

UPLOAD_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": _DOMAIN_TYPE,
    "Upload": [
        {"name": "organisation", "type": "address"},
        {"name": "roundId", "type": "uint256"},
        {"name": "updateHash", "type": "bytes32"},
        {"name": "numSamples", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
        {"name": "expiry", "type": "uint256"},
    ],
}

RECEIPT_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": _DOMAIN_TYPE,
    "Receipt": [
        {"name": "roundId", "type": "uint256"},
        {"name": "organisation", "type": "address"},
        {"name": "updateHash", "type": "bytes32"},
        {"name": "numSamples", "type": "uint256"},
        {"name": "receivedAt", "type": "uint256"},
    ],
}
"""The coordinator's acknowledgement that it stored an upload: signed with its key, so that an
organisation holding it can prove an upload the coordinator later dropped."""


@dataclass(frozen=True)
class UploadAuthorization:
    """What an organisation signs to upload an update: who, which round, which bytes, until when."""

    organisation: str
    round_id: int
    update_hash: bytes
    num_samples: int
    nonce: int
    expiry: int  # unix seconds

    @staticmethod
    def new_nonce() -> int:
        """A fresh random 128-bit nonce (replays are refused per organisation and nonce)."""
        return secrets.randbits(128)


@dataclass(frozen=True)
class UploadAcknowledgement:
    """What the coordinator signs when it has durably stored an upload: whose, for which round,
    which bytes and sample count, and when it received them."""

    round_id: int
    organisation: str
    update_hash: bytes
    num_samples: int
    received_at: int  # unix seconds


def _domain(chain_id: int, ledger: str) -> dict[str, Any]:
    return {
        "name": DOMAIN_NAME,
        "version": DOMAIN_VERSION,
        "chainId": chain_id,
        "verifyingContract": Web3.to_checksum_address(ledger),
    }


def typed_data(auth: UploadAuthorization, *, chain_id: int, ledger: str) -> dict[str, Any]:
    """The full EIP-712 message for ``auth`` in the domain of ``ledger`` on ``chain_id``."""
    return {
        "types": UPLOAD_TYPES,
        "primaryType": "Upload",
        "domain": _domain(chain_id, ledger),
        "message": {
            "organisation": Web3.to_checksum_address(auth.organisation),
            "roundId": auth.round_id,
            "updateHash": auth.update_hash,
            "numSamples": auth.num_samples,
            "nonce": auth.nonce,
            "expiry": auth.expiry,
        },
    }


def read_typed_data(reader: str, expiry: int, *, chain_id: int, ledger: str) -> dict[str, Any]:
    """The full EIP-712 message of a member's read request."""
    return {
        "types": READ_TYPES,
        "primaryType": "Read",
        "domain": _domain(chain_id, ledger),
        "message": {"reader": Web3.to_checksum_address(reader), "expiry": expiry},
    }


def receipt_typed_data(ack: UploadAcknowledgement, *, chain_id: int, ledger: str) -> dict[str, Any]:
    """The full EIP-712 message of the coordinator's receipt ``ack``."""
    return {
        "types": RECEIPT_TYPES,
        "primaryType": "Receipt",
        "domain": _domain(chain_id, ledger),
        "message": {
            "roundId": ack.round_id,
            "organisation": Web3.to_checksum_address(ack.organisation),
            "updateHash": ack.update_hash,
            "numSamples": ack.num_samples,
            "receivedAt": ack.received_at,
        },
    }


def _sign(account: LocalAccount, message: dict[str, Any]) -> str:
    signed = account.sign_message(encode_typed_data(full_message=message))
    return "0x" + bytes(signed.signature).hex()


def sign_upload(
    account: LocalAccount, auth: UploadAuthorization, *, chain_id: int, ledger: str
) -> str:
    """Sign ``auth`` with ``account``; returns the 65-byte signature as 0x-hex."""
    return _sign(account, typed_data(auth, chain_id=chain_id, ledger=ledger))


def sign_read(account: LocalAccount, expiry: int, *, chain_id: int, ledger: str) -> str:
    """``account``'s signature of a read request valid until ``expiry`` (unix seconds)."""
    return _sign(
        account, read_typed_data(account.address, expiry, chain_id=chain_id, ledger=ledger)
    )


def sign_receipt(
    account: LocalAccount, ack: UploadAcknowledgement, *, chain_id: int, ledger: str
) -> str:
    """The coordinator's (``account``'s) signature of the receipt ``ack``, as 0x-hex.

    Deterministic (RFC 6979 nonces): the same receipt signed again is the same signature."""
    return _sign(account, receipt_typed_data(ack, chain_id=chain_id, ledger=ledger))


def recover_signer(auth: UploadAuthorization, signature: str, *, chain_id: int, ledger: str) -> str:
    """The checksum address that signed ``auth``; SignatureError ``bad_signature`` if malformed."""
    return _recover(typed_data(auth, chain_id=chain_id, ledger=ledger), signature)


def recover_reader(reader: str, expiry: int, signature: str, *, chain_id: int, ledger: str) -> str:
    """The checksum address that signed a read request; SignatureError if malformed."""
    return _recover(read_typed_data(reader, expiry, chain_id=chain_id, ledger=ledger), signature)


def recover_receipt_signer(
    ack: UploadAcknowledgement, signature: str, *, chain_id: int, ledger: str
) -> str:
    """The checksum address that signed the receipt ``ack``; SignatureError if malformed."""
    return _recover(receipt_typed_data(ack, chain_id=chain_id, ledger=ledger), signature)


# The order of secp256k1: a signature (r, s) has a twin (r, n - s) that verifies as well, so
# only the low half of s is taken (EIP-2), as Ethereum takes it for transactions.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _recover(message: dict[str, Any], signature: str) -> str:
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        if len(raw) != 65:
            raise ValueError(f"a signature is 65 bytes, got {len(raw)}")
        if int.from_bytes(raw[32:64], "big") > SECP256K1_N // 2:
            raise ValueError("its s is in the upper half of the curve order (EIP-2: low s only)")
        signable = encode_typed_data(full_message=message)
        signer: str = Account.recover_message(signable, signature=raw)
    except Exception as exc:  # eth-keys raises several types for a malformed signature
        raise SignatureError(
            ErrorCode.BAD_SIGNATURE, f"the signature does not verify: {exc}"
        ) from exc
    return Web3.to_checksum_address(signer)

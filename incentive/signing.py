"""EIP-712 signed upload authorisations, bound to the chain id and the ledger contract."""

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

UPLOAD_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Upload": [
        {"name": "organisation", "type": "address"},
        {"name": "roundId", "type": "uint256"},
        {"name": "updateHash", "type": "bytes32"},
        {"name": "numSamples", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
        {"name": "expiry", "type": "uint256"},
    ],
}


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


def typed_data(auth: UploadAuthorization, *, chain_id: int, ledger: str) -> dict[str, Any]:
    """The full EIP-712 message for ``auth`` in the domain of ``ledger`` on ``chain_id``."""
    return {
        "types": UPLOAD_TYPES,
        "primaryType": "Upload",
        "domain": {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": Web3.to_checksum_address(ledger),
        },
        "message": {
            "organisation": Web3.to_checksum_address(auth.organisation),
            "roundId": auth.round_id,
            "updateHash": auth.update_hash,
            "numSamples": auth.num_samples,
            "nonce": auth.nonce,
            "expiry": auth.expiry,
        },
    }


def sign_upload(
    account: LocalAccount, auth: UploadAuthorization, *, chain_id: int, ledger: str
) -> str:
    """Sign ``auth`` with ``account``; returns the 65-byte signature as 0x-hex."""
    signable = encode_typed_data(full_message=typed_data(auth, chain_id=chain_id, ledger=ledger))
    signed = account.sign_message(signable)
    return "0x" + bytes(signed.signature).hex()


def recover_signer(auth: UploadAuthorization, signature: str, *, chain_id: int, ledger: str) -> str:
    """The checksum address that signed ``auth``; SignatureError ``bad_signature`` if malformed."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        if len(raw) != 65:
            raise ValueError(f"a signature is 65 bytes, got {len(raw)}")
        signable = encode_typed_data(
            full_message=typed_data(auth, chain_id=chain_id, ledger=ledger)
        )
        signer: str = Account.recover_message(signable, signature=raw)
    except Exception as exc:  # eth-keys raises several types for a malformed signature
        raise SignatureError(
            ErrorCode.BAD_SIGNATURE, f"the signature does not verify: {exc}"
        ) from exc
    return Web3.to_checksum_address(signer)

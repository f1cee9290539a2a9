"""Connecting to a chain, sending transactions from local keys, and decoding custom-error reverts."""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.abi import function_signature_to_4byte_selector
from web3 import Web3
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError, Web3Exception
from web3.types import TxReceipt

from fedledger.errors import ChainError, ContractRevert

T = TypeVar("T")

DEVNET_MNEMONIC = "test test test test test test test test test test test junk"
"""The well-known anvil/hardhat mnemonic: its keys are public, use it only on a local devnet."""

_account_locks: dict[str, threading.Lock] = {}
_account_locks_guard = threading.Lock()


def connect(rpc_url: str, *, timeout_s: float = 30.0) -> Web3:
    """A Web3 connected to a JSON-RPC endpoint over HTTP.

    web3's own silent retries are off: callers retry with their own backoff and say so, and
    the coordinator answers 503 at once rather than hanging while the chain is down.
    """
    provider = Web3.HTTPProvider(
        rpc_url, request_kwargs={"timeout": timeout_s}, exception_retry_configuration=None
    )
    return Web3(provider)


def devnet_account(index: int) -> LocalAccount:
    """Account ``index`` of the devnet mnemonic (the same keys anvil funds)."""
    Account.enable_unaudited_hdwallet_features()
    account: LocalAccount = Account.from_mnemonic(
        DEVNET_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}"
    )
    return account


def account_from_key(private_key: str) -> LocalAccount:
    """A signing account from a hex private key (with or without 0x)."""
    try:
        account: LocalAccount = Account.from_key(private_key)
    except (ValueError, TypeError) as exc:
        raise ChainError("the private key is not a 32-byte hex string") from exc
    return account


def _lock_for(address: str) -> threading.Lock:
    with _account_locks_guard:
        return _account_locks.setdefault(address.lower(), threading.Lock())


def error_selectors(abis: Iterable[list[dict[str, Any]]]) -> dict[bytes, tuple[str, list[str]]]:
    """Map each custom error's 4-byte selector to its name and argument types."""
    selectors: dict[bytes, tuple[str, list[str]]] = {}
    for abi in abis:
        for entry in abi:
            if entry.get("type") != "error":
                continue
            types = [_abi_type(i) for i in entry.get("inputs", [])]
            signature = f"{entry['name']}({','.join(types)})"
            selectors[function_signature_to_4byte_selector(signature)] = (entry["name"], types)
    return selectors


def _abi_type(param: Mapping[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in param["components"])
        return f"({inner}){kind[5:]}"
    return kind


_HEX_DATA = re.compile(r"0x[0-9a-fA-F]{8,}")
_BYTES_REPR = re.compile(r"b'((?:[^'\\]|\\.)*)'|b\"((?:[^\"\\]|\\.)*)\"")


def revert_data(exc: BaseException) -> bytes | None:
    """The raw revert data (selector + arguments) carried by a web3 or eth-tester exception."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        return bytes.fromhex(data[2:])
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    text = str(exc)
    match = _BYTES_REPR.search(text)
    if match:  # eth-tester: "execution reverted: b'\x12...'"
        literal = match.group(1) if match.group(1) is not None else match.group(2)
        decoded: bytes = literal.encode("latin-1").decode("unicode_escape").encode("latin-1")
        return decoded
    hex_match = _HEX_DATA.search(text)
    if hex_match:
        return bytes.fromhex(hex_match.group(0)[2:])
    return None


def decode_revert(
    exc: BaseException, selectors: Mapping[bytes, tuple[str, list[str]]]
) -> ContractRevert:
    """Turn a revert from anvil (ContractCustomError) or eth-tester (TransactionFailed) into one type."""
    from eth_abi.abi import decode as abi_decode

    data = revert_data(exc)
    if data and len(data) >= 4 and data[:4] in selectors:
        name, types = selectors[data[:4]]
        try:
            args = tuple(abi_decode(types, data[4:]))
        except Exception:  # malformed arguments: keep the name, drop the arguments
            args = ()
        plain = tuple(_plain(kind, arg) for kind, arg in zip(types, args, strict=False))
        return ContractRevert(name, plain, raw="0x" + data.hex())
    return ContractRevert("", (), raw=str(exc))


def _plain(kind: str, value: object) -> object:
    if kind == "address" and isinstance(value, str):
        return Web3.to_checksum_address(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return value


def is_revert(exc: BaseException) -> bool:
    """Whether ``exc`` is a contract revert (as opposed to a transport or node failure)."""
    if isinstance(exc, ContractLogicError | ContractCustomError):
        return True
    return type(exc).__name__ == "TransactionFailed"


_CHAIN_IDS: weakref.WeakKeyDictionary[Web3, int] = weakref.WeakKeyDictionary()


def chain_id_of(w3: Web3) -> int:
    """The chain id of ``w3``'s endpoint, asked once per connection (it cannot change)."""
    cached = _CHAIN_IDS.get(w3)
    if cached is None:
        cached = _CHAIN_IDS[w3] = int(w3.eth.chain_id)
    return cached


def send_transaction(
    w3: Web3,
    account: LocalAccount,
    call: ContractFunction | ContractConstructor,
    selectors: Mapping[bytes, tuple[str, list[str]]],
    *,
    gas: int | None = None,
    timeout_s: float = 120.0,
) -> TxReceipt:
    """Sign ``call`` with ``account``'s key, send it and wait for a successful receipt.

    One lock per account keeps its nonces in sequence inside this process. A revert (at
    gas estimation or in the mined transaction) raises ContractRevert with the decoded error.
    """
    with _lock_for(account.address):
        try:
            params: dict[str, Any] = {
                "from": account.address,
                "nonce": w3.eth.get_transaction_count(account.address, "pending"),
                "chainId": chain_id_of(w3),
            }
            if gas is not None:
                params["gas"] = gas
            tx = call.build_transaction(params)  # type: ignore[arg-type]
            signed = account.sign_transaction(cast(dict[str, Any], tx))
            tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout_s)
        except Exception as exc:
            if is_revert(exc):
                raise decode_revert(exc, selectors) from exc
            if isinstance(exc, ChainError):
                raise
            raise ChainError(f"transaction {_name(call)} failed: {exc}") from exc
    if receipt["status"] != 1:
        reason = _replay_revert(w3, account.address, call, selectors, receipt["blockNumber"])
        raise reason
    return receipt


def _name(call: ContractFunction | ContractConstructor) -> str:
    return call.fn_name if isinstance(call, ContractFunction) else "constructor"


def _replay_revert(
    w3: Web3,
    sender: str,
    call: ContractFunction | ContractConstructor,
    selectors: Mapping[bytes, tuple[str, list[str]]],
    block: int,
) -> ContractRevert:
    """Find out why a mined transaction failed by replaying it as a call at its block."""
    if isinstance(call, ContractFunction):
        try:
            call.call({"from": sender}, block_identifier=max(block - 1, 0))
        except Exception as exc:
            if is_revert(exc):
                return decode_revert(exc, selectors)
    return ContractRevert("", (), raw=f"{_name(call)} mined with status 0 in block {block}")


def call_view(fn: Callable[[], T], selectors: Mapping[bytes, tuple[str, list[str]]]) -> T:
    """Run a read-only contract call, mapping reverts and transport failures to incentive errors."""
    try:
        return fn()
    except Exception as exc:
        if is_revert(exc):
            raise decode_revert(exc, selectors) from exc
        if isinstance(exc, Web3Exception | OSError | ValueError):
            raise ChainError(f"chain read failed: {exc}") from exc
        raise


def wait_for_rpc(w3: Web3, *, timeout_s: float = 10.0) -> None:
    """Block until the endpoint answers, or raise ChainError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _ = w3.eth.block_number
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise ChainError(
                    f"no answer from the chain within {timeout_s:.0f} s: {exc}"
                ) from exc
            time.sleep(0.05)

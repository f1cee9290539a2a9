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
from eth_typing import ChecksumAddress
from eth_utils.abi import function_signature_to_4byte_selector
from web3 import Web3
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError, Web3Exception
from web3.types import RPCEndpoint, TxReceipt

from fedledger.errors import ChainError, ContractRevert

T = TypeVar("T")

DEVNET_MNEMONIC = "test test test test test test test test test test test junk"
"""The well-known anvil/hardhat mnemonic: its keys are public, use it only on a local devnet."""

_account_locks: dict[str, threading.Lock] = {}
_account_locks_guard = threading.Lock()


CACHED_REQUESTS = {RPCEndpoint("eth_chainId")}
"""What a connection asks the node once and then remembers (per thread)."""


class LeanFunctions:
    """``contract.functions`` for calls made many times: each function is bound to a contract
    whose ABI is that function's entry alone (built on first use, then kept).

    web3 looks a call's ABI entry up anew on every call, and validates the whole ABI as it does
    (a selector for each of its functions): for the ledger's 57 functions about 3 ms of CPU a
    call, as much as the call itself takes on anvil. Names must not be overloaded."""

    def __init__(self, w3: Web3, address: str, abi: list[dict[str, Any]]) -> None:
        self._w3 = w3
        self._address = Web3.to_checksum_address(address)
        entries = [e for e in abi if e.get("type") == "function"]
        self._entries = {e["name"]: e for e in entries}
        if len(self._entries) != len(entries):
            raise ValueError("LeanFunctions needs an ABI without overloaded functions")
        self._bound: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._bound:
            if name not in self._entries:
                raise AttributeError(f"the contract has no function {name!r}")
            contract = self._w3.eth.contract(address=self._address, abi=[self._entries[name]])
            self._bound[name] = getattr(contract.functions, name)
        return self._bound[name]


def connect(rpc_url: str, *, timeout_s: float = 30.0) -> Web3:
    """A Web3 connected to a JSON-RPC endpoint over HTTP.

    web3's own silent retries are off: callers retry with their own backoff and say so, and
    the coordinator answers 503 at once rather than hanging while the chain is down.

    The chain id is cached (per thread): web3's validation asks the node for it before every
    ``eth_call``, gas estimate and send, which doubled the round trips of every read.
    """
    provider = Web3.HTTPProvider(
        rpc_url,
        request_kwargs={"timeout": timeout_s},
        exception_retry_configuration=None,
        cache_allowed_requests=True,
        cacheable_requests=CACHED_REQUESTS,
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


_NONCES: weakref.WeakKeyDictionary[Web3, dict[str, int]] = weakref.WeakKeyDictionary()
"""Per connection, each account's next nonce as this process counts it."""

_FEES: weakref.WeakKeyDictionary[Web3, tuple[float, dict[str, int]]] = weakref.WeakKeyDictionary()
"""Per connection, the fee fields last read from the chain and when (``FEE_TTL_S``)."""

FEE_TTL_S = 2.0
"""How long fee data read from the chain is reused. A fee the chain has since outgrown is
refused at the send, and the transaction is signed again with fresh fees."""

RECEIPT_POLL_S = (0.002, 0.05)
"""The first and the longest wait between receipt polls (doubling from the first): a devnet
mines at once, a public chain in seconds; web3's default is a fixed 0.1 s."""

_SEND_ATTEMPTS = 3
_NONCE_REFUSALS = ("nonce", "already known", "replacement transaction underpriced")
_FEE_REFUSALS = ("fee", "underpriced", "base fee")


def _refused_for(exc: BaseException, reasons: tuple[str, ...]) -> bool:
    text = str(exc).lower()
    return any(reason in text for reason in reasons)


def _next_nonce(w3: Web3, address: ChecksumAddress) -> int:
    """The account's next nonce: read from the chain once (pending), then counted locally."""
    nonces = _NONCES.setdefault(w3, {})
    if address not in nonces:
        nonces[address] = int(w3.eth.get_transaction_count(address, "pending"))
    return nonces[address]


def _fees(w3: Web3) -> dict[str, int]:
    """EIP-1559 fee fields, read at most once every ``FEE_TTL_S`` per connection: web3's own
    rule (twice the latest base fee plus the suggested tip). Empty on a chain without a base
    fee: web3 then fills in what that chain takes."""
    cached = _FEES.get(w3)
    now = time.monotonic()
    if cached is not None and now - cached[0] < FEE_TTL_S:
        return cached[1]
    base = w3.eth.get_block("latest").get("baseFeePerGas")
    fees: dict[str, int] = {}
    if base is not None:
        tip = int(w3.eth.max_priority_fee)
        fees = {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * int(base) + tip}
    _FEES[w3] = (now, fees)
    return fees


def forget_account(w3: Web3, address: ChecksumAddress) -> None:
    """Drop the locally counted nonce of ``address`` (read again from the chain next time)."""
    _NONCES.get(w3, {}).pop(address, None)


def wait_for_receipt(w3: Web3, tx_hash: bytes, *, timeout_s: float) -> TxReceipt:
    """The receipt of ``tx_hash``, polled with a doubling wait from ``RECEIPT_POLL_S[0]``."""
    from web3.exceptions import TransactionNotFound

    deadline = time.monotonic() + timeout_s
    wait_s, longest = RECEIPT_POLL_S
    while True:
        try:
            receipt = w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            if receipt is not None:
                return receipt
        except TransactionNotFound:
            pass  # not mined yet (anvil may say so for a moment even under automine)
        if time.monotonic() + wait_s > deadline:
            raise ChainError(f"no receipt for 0x{bytes(tx_hash).hex()} within {timeout_s:g} s")
        time.sleep(wait_s)
        wait_s = min(2 * wait_s, longest)


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

    The critical path of a round is made of these, so the calls around the send are few: the
    nonce is counted locally (one lock per account keeps it in sequence in this process), the
    chain id is asked once per connection and fee data once every ``FEE_TTL_S``; the gas is
    estimated unless ``gas`` is given. The estimate is also the check that the call would not
    revert: a reverting call is refused there, before anything is mined or paid for (reusing a
    gas limit would save it, at the price of mining and paying for every revert). A send refused for its nonce (another process sent from
    the same account) or its fee reads them again from the chain and signs again, up to
    ``_SEND_ATTEMPTS`` times. A revert (at gas estimation or in the mined transaction) raises
    ContractRevert with the decoded error.
    """
    address = account.address
    with _lock_for(address):
        for attempt in range(1, _SEND_ATTEMPTS + 1):
            try:
                nonce = _next_nonce(w3, address)
                params: dict[str, Any] = {
                    "from": address,
                    "nonce": nonce,
                    "chainId": chain_id_of(w3),
                    **_fees(w3),
                }
                if gas is not None:
                    params["gas"] = gas
                tx = call.build_transaction(params)  # type: ignore[arg-type]
                signed = account.sign_transaction(cast(dict[str, Any], tx))
                tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
            except Exception as exc:
                forget_account(w3, address)  # whatever happened, ask the chain next time
                if is_revert(exc):
                    raise decode_revert(exc, selectors) from exc
                if isinstance(exc, ChainError):
                    raise
                # A stale nonce is refused at the send, or at the gas estimate on some nodes.
                retry = attempt < _SEND_ATTEMPTS
                if retry and _refused_for(exc, _NONCE_REFUSALS):
                    continue
                if retry and _refused_for(exc, _FEE_REFUSALS):
                    _FEES.pop(w3, None)
                    continue
                raise ChainError(f"transaction {_name(call)} failed: {exc}") from exc
            _NONCES.setdefault(w3, {})[address] = nonce + 1
            break
        receipt = wait_for_receipt(w3, tx_hash, timeout_s=timeout_s)
    if receipt["status"] != 1:
        reason = _replay_revert(w3, address, call, selectors, receipt["blockNumber"])
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
    """Find out why a mined transaction failed by replaying it as a call: at its own block
    first (a failed transaction changed nothing, and a revert that depends on the block's time,
    such as a deadline, shows only there), then at the block before."""
    if isinstance(call, ContractFunction):
        for at in (block, max(block - 1, 0)):
            try:
                call.call({"from": sender}, block_identifier=at)
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

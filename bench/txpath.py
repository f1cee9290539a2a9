"""The transaction path a round waits on, against web3's defaults, in one run on anvil.

Every node's commitment and the coordinator's settlement are transactions, sent one after the
other on a round's critical path. Measured here on anvil (automine), N transactions each
(``setRoundBudget`` from the admin's key, one storage write), in turn over one connection:

- **web3 defaults**: what fedledger did before: the nonce read from the chain (``pending``) for
  every transaction, fee data and a gas estimate filled in by ``build_transaction``, and the
  receipt awaited with ``wait_for_transaction_receipt`` (a fixed 0.1 s poll);
- **fedledger**: ``send_transaction`` as the ledger client calls it: the nonce counted
  locally, fee data reused for ``FEE_TTL_S``, the gas estimated, the receipt polled from 2 ms;
- **fedledger, fixed gas**: the same with the gas limit given, so not estimated: what the
  estimate costs. fedledger keeps the estimate: it is also the check that the call would not
  revert, and without it every revert would be mined and paid for.

Reported: ms a transaction (median, p90) and JSON-RPC calls a transaction, counted at the
provider. Then the signature alone: eth-keys' pure-Python secp256k1 against coincurve (which
eth-keys uses by itself once installed), on the same transaction.

Usage: python bench/txpath.py [--quick] [--transactions 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from web3 import HTTPProvider, Web3

from fedledger.devnet.anvil import start_anvil
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import (
    CACHED_REQUESTS,
    connect,
    devnet_account,
    send_transaction,
)
from fedledger.incentive.ledger import LedgerClient


class CountingProvider(HTTPProvider):
    """An HTTP provider that counts the JSON-RPC requests it sends (not those it answers from
    its cache)."""

    calls = 0

    def _make_request(self, method: Any, params: Any) -> Any:
        self.calls += 1
        return super()._make_request(method, params)


def web3_defaults(ledger: LedgerClient, value: int) -> None:
    """The transaction as web3's defaults send it (fedledger's path before it counted nonces)."""
    w3, account = ledger.w3, ledger.account
    assert account is not None
    call = ledger.contract.functions.setRoundBudget(value)
    tx = call.build_transaction(
        {
            "from": account.address,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
            "chainId": ledger.chain_id(),
        }
    )
    signed = account.sign_transaction(tx)  # type: ignore[arg-type]
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    assert receipt["status"] == 1


def fedledger_path(ledger: LedgerClient, value: int, *, gas: int | None = None) -> None:
    assert ledger.account is not None
    call = ledger.contract.functions.setRoundBudget(value)
    receipt = send_transaction(ledger.w3, ledger.account, call, ledger.selectors, gas=gas)
    assert receipt["status"] == 1


def measure(
    label: str, send: Callable[[int], None], count: int, counter: CountingProvider
) -> dict[str, Any]:
    send(1)  # warm: the first transaction reads what later ones reuse
    times: list[float] = []
    calls_before = counter.calls
    for k in range(count):
        started = time.perf_counter()
        send(2 + k)
        times.append(time.perf_counter() - started)
    times.sort()
    return {
        "path": label,
        "median_ms": 1000 * statistics.median(times),
        "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))],
        "rpc_calls": (counter.calls - calls_before) / count,
    }


def signing(count: int) -> list[tuple[str, float]]:
    """ms a secp256k1 signature with each backend of eth-keys, and a whole signed transaction
    with eth-account (which uses eth-keys' default backend)."""
    from eth_keys import KeyAPI

    account = devnet_account(0)
    rows = []
    for name in ("eth_keys.backends.NativeECCBackend", "eth_keys.backends.CoinCurveECCBackend"):
        keys = KeyAPI(name)
        key = keys.PrivateKey(account.key)
        started = time.perf_counter()
        for k in range(count):
            keys.ecdsa_sign(k.to_bytes(32, "big"), key)
        rows.append((name.rsplit(".", 1)[1], 1000 * (time.perf_counter() - started) / count))
    tx = {
        "to": account.address,
        "value": 1,
        "gas": 21_000,
        "maxFeePerGas": 10**9,
        "maxPriorityFeePerGas": 1,
        "chainId": 31337,
    }
    started = time.perf_counter()
    for k in range(count):
        account.sign_transaction({**tx, "nonce": k})
    default = type(KeyAPI().backend).__name__
    rows.append((f"sign_transaction ({default})", 1000 * (time.perf_counter() - started) / count))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 transactions a path")
    parser.add_argument("--transactions", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    count = 10 if args.quick else args.transactions
    anvil = start_anvil(accounts=4)
    try:
        deployment = deploy_devnet(connect(anvil.rpc_url), 1, rpc_url=anvil.rpc_url)
        plain = CountingProvider(anvil.rpc_url)  # web3's: the chain id asked before every call
        ledger = LedgerClient(Web3(plain), deployment.ledger, devnet_account(0))
        # fedledger's connection (``connect``): the chain id asked once
        counter = CountingProvider(
            anvil.rpc_url, cache_allowed_requests=True, cacheable_requests=CACHED_REQUESTS
        )
        ours = LedgerClient(Web3(counter), deployment.ledger, devnet_account(0))
        rows = [
            measure("web3 defaults", lambda v: web3_defaults(ledger, v), count, plain),
            measure("fedledger", lambda v: fedledger_path(ours, v), count, counter),
            measure(
                "fedledger, fixed gas",
                lambda v: fedledger_path(ours, v, gas=100_000),
                count,
                counter,
            ),
        ]
    finally:
        anvil.stop()
    print(f"anvil, {count} transactions a path (setRoundBudget), one connection\n")
    print(f"{'path':<24}{'median ms':>10}{'p90 ms':>10}{'RPC calls':>11}{'speed-up':>10}")
    print("-" * 65)
    base = rows[0]["median_ms"]
    for row in rows:
        print(
            f"{row['path']:<24}{row['median_ms']:>10.2f}{row['p90_ms']:>10.2f}"
            f"{row['rpc_calls']:>11.1f}{base / row['median_ms']:>9.1f}x"
        )
    print("\nsigning (ms a signature)")
    signatures = signing(20 if args.quick else 200)
    for name, ms in signatures:
        print(f"  {name:<40}{ms:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"paths": rows, "signing": dict(signatures)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

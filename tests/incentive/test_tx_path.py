"""The transaction path: nonces counted locally and recovered when another sender used them,
fees reused and refreshed when the chain outgrew them, a failed call consuming no nonce.

Two ``Web3`` connections to one in-process chain keep their counts apart exactly as two
processes do (the count is per connection), so "another process sent from this account" is
a second connection here.
"""

from __future__ import annotations

from typing import Any

import pytest
from web3 import Web3

from fedledger.devnet.deploy import deploy_devnet
from fedledger.devnet.embedded import LockedEthereumTesterProvider, embedded_web3
from fedledger.errors import ContractRevert
from fedledger.incentive import chain
from fedledger.incentive.chain import devnet_account
from fedledger.incentive.ledger import LedgerClient


@pytest.fixture
def ledgers() -> tuple[LedgerClient, LedgerClient]:
    """The admin's client on two connections to one chain."""
    w3 = embedded_web3(4)
    deployment = deploy_devnet(w3, 1)
    tester: Any = w3.provider.ethereum_tester  # type: ignore[attr-defined]
    other = Web3(LockedEthereumTesterProvider(tester))
    admin = devnet_account(0)
    return LedgerClient(w3, deployment.ledger, admin), LedgerClient(other, deployment.ledger, admin)


def _nonce(ledger: LedgerClient, receipt: Any) -> int:
    return int(ledger.w3.eth.get_transaction(receipt["transactionHash"])["nonce"])


def test_nonces_are_counted_locally_after_the_first_read(
    ledgers: tuple[LedgerClient, LedgerClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, _ = ledgers
    first = ledger.set_round_budget(10)
    reads: list[str] = []
    original = ledger.w3.eth.get_transaction_count
    monkeypatch.setattr(
        ledger.w3.eth,
        "get_transaction_count",
        lambda *a, **k: reads.append("read") or original(*a, **k),
    )
    second, third = ledger.set_round_budget(11), ledger.set_round_budget(12)
    assert [_nonce(ledger, r) for r in (first, second, third)] == [
        _nonce(ledger, first) + k for k in range(3)
    ]
    assert reads == []  # no nonce read once the account's count is known
    assert ledger.round_budget() == 12


def test_a_nonce_another_sender_used_is_recovered(
    ledgers: tuple[LedgerClient, LedgerClient],
) -> None:
    """Connection A counts its nonce; B sends twice from the same account; A's next send is
    refused for its stale nonce, reads the chain again and goes through."""
    a, b = ledgers
    a.set_round_budget(10)
    stale = chain._NONCES[a.w3][a.account.address]  # type: ignore[union-attr]
    b.set_round_budget(20)
    b.set_round_budget(30)
    receipt = a.set_round_budget(40)
    assert _nonce(a, receipt) == stale + 2
    assert a.round_budget() == b.round_budget() == 40


def test_a_reverted_call_consumes_no_nonce(ledgers: tuple[LedgerClient, LedgerClient]) -> None:
    ledger, _ = ledgers
    before = ledger.set_round_budget(10)
    with pytest.raises(ContractRevert):  # round 0 does not exist: refused at gas estimation
        ledger.extend_round(999, 60)
    after = ledger.set_round_budget(11)
    assert _nonce(ledger, after) == _nonce(ledger, before) + 1


def test_fees_the_chain_outgrew_are_read_again(
    ledgers: tuple[LedgerClient, LedgerClient],
) -> None:
    """A cached max fee below the chain's base fee is refused at the send; the transaction is
    signed again with fresh fees and mined."""
    ledger, _ = ledgers
    ledger.set_round_budget(10)
    base = int(ledger.w3.eth.get_block("latest")["baseFeePerGas"])
    assert base > 1
    chain._FEES[ledger.w3] = (1e18, {"maxPriorityFeePerGas": 0, "maxFeePerGas": 1})
    receipt = ledger.set_round_budget(11)
    assert receipt["status"] == 1 and ledger.round_budget() == 11
    assert chain._FEES[ledger.w3][1]["maxFeePerGas"] >= base


def test_lean_functions_answer_as_the_whole_contract_does(
    ledgers: tuple[LedgerClient, LedgerClient],
) -> None:
    """Each function bound to its own ABI entry reads and sends as the full contract does."""
    ledger, _ = ledgers
    ledger.set_round_budget(77)  # sent through the lean function
    assert ledger.functions.roundBudget().call() == 77
    assert ledger.contract.functions.roundBudget().call() == 77
    assert ledger.functions.roundBudget is ledger.functions.roundBudget  # built once
    with pytest.raises(AttributeError, match="no function 'noSuchThing'"):
        _ = ledger.functions.noSuchThing
    entry = {
        "type": "function",
        "name": "f",
        "inputs": [],
        "outputs": [],
        "stateMutability": "view",
    }
    overloaded = [entry, {**entry, "inputs": [{"name": "x", "type": "uint256"}]}]
    with pytest.raises(ValueError, match="overloaded"):
        chain.LeanFunctions(ledger.w3, ledger.address, overloaded)

"""Helpers shared by the tests that talk to the ledger on the in-process EVM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from web3.contract import Contract
from web3.logs import DISCARD
from web3.types import TxReceipt

from fedledger.errors import ContractRevert

ONE = 10**18  # fixed point 1.0

ExpectRevert = Callable[..., ContractRevert]
OpenRound = Callable[..., tuple[int, int]]


def events(contract: Contract, name: str, receipt: TxReceipt) -> list[dict[str, Any]]:
    """The ``name`` events that ``contract`` emitted in ``receipt``, as plain argument dicts."""
    logs = contract.events[name]().process_receipt(receipt, errors=DISCARD)
    assert all(log["address"] == contract.address for log in logs)
    return [dict(log["args"]) for log in logs]


def advance_past(w3: Any, deadline_s: int) -> int:
    """Move the in-process chain's time past ``deadline_s`` and mine a block; returns the new
    block's timestamp."""
    tester: Any = w3.provider.ethereum_tester
    pending_s = int(tester.get_block_by_number("pending")["timestamp"])
    if deadline_s + 1 > pending_s:
        tester.time_travel(deadline_s + 1)
    tester.mine_blocks(1)
    now_s = int(w3.eth.get_block("latest")["timestamp"])
    assert now_s > deadline_s
    return now_s


def close_commits(ledger: Any, round_id: int) -> int:
    """End round ``round_id``'s commit phase on ``ledger``'s in-process chain: chain time past
    the round's deadline, a block mined. Returns the new block's timestamp."""
    return advance_past(ledger.w3, ledger.get_round(round_id).deadline)

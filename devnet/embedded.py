"""The embedded chain: an in-process EVM (eth-tester + py-evm) shared safely between threads."""

from __future__ import annotations

import threading
from typing import Any

from eth_tester import EthereumTester, PyEVMBackend
from web3 import Web3
from web3.providers.eth_tester import EthereumTesterProvider
from web3.types import RPCEndpoint, RPCResponse

from fedledger.incentive.chain import DEVNET_MNEMONIC


class LockedEthereumTesterProvider(EthereumTesterProvider):
    """py-evm is not thread-safe: serialise every request (the demo's coordinator and nodes share it)."""

    def __init__(self, tester: EthereumTester) -> None:
        super().__init__(tester)
        self._lock = threading.RLock()

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        with self._lock:
            return super().make_request(method, params)


def embedded_web3(num_accounts: int = 10) -> Web3:
    """A Web3 on a fresh in-process chain whose funded accounts are the devnet mnemonic's first N."""
    backend = PyEVMBackend.from_mnemonic(
        DEVNET_MNEMONIC, num_accounts=num_accounts, hd_path="m/44'/60'/0'/0"
    )
    return Web3(LockedEthereumTesterProvider(EthereumTester(backend)))

"""Fixtures for the contract tests: a fresh in-process chain with a deployed ledger per test."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

import evm
from fedledger.devnet.deploy import deploy_devnet
from fedledger.devnet.embedded import embedded_web3
from fedledger.errors import ContractRevert
from fedledger.incentive.chain import devnet_account
from fedledger.incentive.deployment import Deployment
from fedledger.incentive.ledger import LedgerClient

NUM_ORGANISATIONS = 3
OUTSIDER_INDEX = 2 + NUM_ORGANISATIONS  # funded by the chain, never registered
ROUND_DURATION_S = 3600


@dataclass(frozen=True)
class Chain:
    """One fresh chain: accounts 0 admin, 1 coordinator, 2..4 organisations, 5 unregistered."""

    w3: Web3
    deployment: Deployment
    admin: LocalAccount
    coordinator: LocalAccount
    orgs: tuple[LocalAccount, ...]
    outsider: LocalAccount

    @property
    def ledger(self) -> LedgerClient:
        """A read-only client of the deployed ledger."""
        return LedgerClient(self.w3, self.deployment.ledger)

    def as_(self, account: LocalAccount) -> LedgerClient:
        """The deployed ledger, writing as ``account``."""
        return LedgerClient(self.w3, self.deployment.ledger, account)

    def now(self) -> int:
        """The latest block's timestamp (unix seconds)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])


def new_chain() -> Chain:
    """Start an in-process chain and deploy the ledger with three registered organisations."""
    w3 = embedded_web3(num_accounts=OUTSIDER_INDEX + 1)
    deployment = deploy_devnet(w3, num_organisations=NUM_ORGANISATIONS)
    return Chain(
        w3=w3,
        deployment=deployment,
        admin=devnet_account(0),
        coordinator=devnet_account(1),
        orgs=tuple(devnet_account(2 + i) for i in range(NUM_ORGANISATIONS)),
        outsider=devnet_account(OUTSIDER_INDEX),
    )


@pytest.fixture
def make_chain() -> Callable[[], Chain]:
    """A factory of fresh chains, for property tests that need one per example."""
    return new_chain


@pytest.fixture
def chain(make_chain: Callable[[], Chain]) -> Chain:
    return make_chain()


@pytest.fixture
def w3(chain: Chain) -> Web3:
    return chain.w3


@pytest.fixture
def admin(chain: Chain) -> LocalAccount:
    return chain.admin


@pytest.fixture
def coordinator(chain: Chain) -> LocalAccount:
    return chain.coordinator


@pytest.fixture
def orgs(chain: Chain) -> tuple[LocalAccount, ...]:
    return chain.orgs


@pytest.fixture
def outsider(chain: Chain) -> LocalAccount:
    return chain.outsider


@pytest.fixture
def ledger(chain: Chain) -> LedgerClient:
    """Read-only client."""
    return chain.ledger


@pytest.fixture
def admin_ledger(chain: Chain) -> LedgerClient:
    return chain.as_(chain.admin)


@pytest.fixture
def coordinator_ledger(chain: Chain) -> LedgerClient:
    return chain.as_(chain.coordinator)


@pytest.fixture
def org_ledgers(chain: Chain) -> tuple[LedgerClient, ...]:
    return tuple(chain.as_(org) for org in chain.orgs)


@pytest.fixture
def outsider_ledger(chain: Chain) -> LedgerClient:
    return chain.as_(chain.outsider)


@pytest.fixture
def set_next_block_time(w3: Web3) -> Callable[[int], None]:
    """Make the next mined block (and calls against the pending block) carry ``timestamp_s``."""
    tester: Any = w3.provider.ethereum_tester  # type: ignore[attr-defined]

    def set_time(timestamp_s: int) -> None:
        tester.time_travel(timestamp_s)

    return set_time


@pytest.fixture
def advance_past(w3: Web3) -> Callable[[int], int]:
    """Move chain time past ``deadline_s`` and mine a block; returns the new block's timestamp."""
    return functools.partial(evm.advance_past, w3)


@pytest.fixture
def open_round(chain: Chain, coordinator_ledger: LedgerClient) -> Callable[..., tuple[int, int]]:
    """Open the next round as the coordinator; returns ``(round_id, deadline_s)``."""

    def open_next(
        model_hash: bytes = b"\x11" * 32, duration_s: int = ROUND_DURATION_S
    ) -> tuple[int, int]:
        round_id = coordinator_ledger.round_count() + 1
        deadline_s = chain.now() + duration_s
        coordinator_ledger.open_round(round_id, model_hash, deadline_s)
        return round_id, deadline_s

    return open_next


@pytest.fixture
def ledger_state(chain: Chain, ledger: LedgerClient) -> Callable[[], dict[str, Any]]:
    """All the ledger and token views for the test's accounts, to compare before and after."""
    members = ledger.contract.functions.getRoleMembers
    coordinator_role = ledger.contract.functions.COORDINATOR_ROLE().call()
    admin_role = ledger.contract.functions.DEFAULT_ADMIN_ROLE().call()

    def snapshot() -> dict[str, Any]:
        count = ledger.round_count()
        state: dict[str, Any] = {
            "round_count": count,
            "rounds": [ledger.get_round(r) for r in range(count + 2)],
            "organisations": ledger.organisations(),
            "coordinators": members(coordinator_role).call(),
            "admins": members(admin_role).call(),
            "total_supply": ledger.total_supply(),
            "round_budget": ledger.round_budget(),
            "task_spec": ledger.task_spec(),
        }
        for account in (chain.admin, chain.coordinator):
            state[account.address] = ledger.balance_of(account.address)
        for account in (*chain.orgs, chain.outsider):
            address = account.address
            state[address] = {
                "balance": ledger.balance_of(address),
                "retirement": ledger.retirement_of(address),
                "total_reward": ledger.total_reward_of(address),
                "rounds": [
                    (
                        ledger.commitment_of(r, address),
                        ledger.score_of(r, address),
                        ledger.reward_of(r, address),
                        ledger.is_settled(r, address),
                        ledger.epsilon_of(r, address),
                    )
                    for r in range(1, count + 2)
                ],
            }
        return state

    return snapshot


def _normalise(value: object) -> object:
    """Compare revert arguments whatever their spelling: addresses lower-case, bytes as 0x-hex."""
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str) and value.startswith("0x"):
        return value.lower()
    return value


@pytest.fixture
def expect_revert(ledger_state: Callable[[], dict[str, Any]]) -> Callable[..., ContractRevert]:
    """Run ``action``; check it reverts with ``error(*args)`` and leaves the ledger unchanged."""

    def check(action: Callable[[], object], error: str, *args: object) -> ContractRevert:
        before = ledger_state()
        with pytest.raises(ContractRevert) as info:
            action()
        revert = info.value
        assert revert.error == error, revert
        assert [_normalise(a) for a in revert.error_args] == [_normalise(a) for a in args]
        assert ledger_state() == before
        return revert

    return check

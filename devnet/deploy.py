"""Deploy the contracts, register organisations and describe it all in a deployment file."""

from __future__ import annotations

from collections.abc import Sequence

from eth_account.signers.local import LocalAccount
from web3 import Web3

from fedledger.incentive.chain import devnet_account
from fedledger.incentive.deployment import AccountEntry, Deployment, DeploymentAccounts
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import DEFAULT_ROUND_BUDGET
from fedledger.tasks.spec import BUILTIN_DIGITS, spec_hash


def _entry(account: LocalAccount, *, with_key: bool) -> AccountEntry:
    return AccountEntry(
        address=account.address, private_key=account.key.hex() if with_key else None
    )


def deploy(
    w3: Web3,
    admin: LocalAccount,
    coordinator: LocalAccount | str,
    organisations: Sequence[LocalAccount | str] = (),
    *,
    rpc_url: str | None = None,
    include_keys: bool = False,
    round_budget: int = DEFAULT_ROUND_BUDGET,
    task_spec: bytes | None = None,
) -> Deployment:
    """Deploy a ledger + token from ``admin``, grant ``coordinator`` its role, register organisations.

    ``task_spec`` is the spec file's hash (default: the built-in digits task's spec).
    ``include_keys`` writes the private keys of the given LocalAccounts into the deployment
    (only for devnet accounts, whose keys are public anyway).
    """
    coordinator_address = coordinator if isinstance(coordinator, str) else coordinator.address
    ledger, _ = LedgerClient.deploy(
        w3,
        admin,
        coordinator_address,
        round_budget=round_budget,
        task_spec=task_spec if task_spec is not None else spec_hash(BUILTIN_DIGITS.read_bytes()),
    )
    org_entries: list[AccountEntry] = []
    for org in organisations:
        address = org if isinstance(org, str) else org.address
        ledger.register_organisation(address)
        org_entries.append(
            AccountEntry(address=address)
            if isinstance(org, str)
            else _entry(org, with_key=include_keys)
        )
    coordinator_entry = (
        AccountEntry(address=coordinator)
        if isinstance(coordinator, str)
        else _entry(coordinator, with_key=include_keys)
    )
    return Deployment(
        chain_id=int(w3.eth.chain_id),
        rpc_url=rpc_url,
        ledger=ledger.address,
        token=ledger.token_address,
        accounts=DeploymentAccounts(
            admin=_entry(admin, with_key=include_keys),
            coordinator=coordinator_entry,
            organisations=org_entries,
        ),
    )


def deploy_devnet(
    w3: Web3,
    num_organisations: int,
    *,
    rpc_url: str | None = None,
    round_budget: int = DEFAULT_ROUND_BUDGET,
    task_spec: bytes | None = None,
) -> Deployment:
    """Deploy on a devnet whose accounts come from the devnet mnemonic: 0 admin, 1 coordinator, 2.. organisations."""
    admin, coordinator = devnet_account(0), devnet_account(1)
    orgs = [devnet_account(2 + i) for i in range(num_organisations)]
    return deploy(
        w3,
        admin,
        coordinator,
        orgs,
        rpc_url=rpc_url,
        include_keys=True,
        round_budget=round_budget,
        task_spec=task_spec,
    )

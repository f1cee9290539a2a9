"""A devnet's state folder: anvil's pid, the chain it saves on exit, and the deployment on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from web3 import Web3

from fedledger.devnet.anvil import is_anvil
from fedledger.errors import DevnetError
from fedledger.incentive.deployment import Deployment


@dataclass(frozen=True)
class DevnetFolder:
    """The files ``fedledger devnet up`` keeps in its state folder."""

    root: Path

    @property
    def pid_file(self) -> Path:
        return self.root / "anvil.pid"

    @property
    def chain_state(self) -> Path:
        """anvil's ``--state`` file: loaded at start, written every second and on exit."""
        return self.root / "chain-state.json"

    @property
    def deployment_file(self) -> Path:
        return self.root / "deployment.json"

    def running_pid(self) -> int | None:
        """The pid of the devnet's anvil if it runs; a stale pid file (anvil gone, or the pid
        reused by another program) is removed."""
        if not self.pid_file.exists():
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except ValueError:
            pid = 0
        if pid > 0 and is_anvil(pid):
            return pid
        self.pid_file.unlink()
        return None

    def has_saved_chain(self) -> bool:
        return self.chain_state.is_file() and self.chain_state.stat().st_size > 0

    def discard_saved_chain(self) -> bool:
        """Forget the saved chain (``devnet up --fresh``); whether there was one."""
        had = self.chain_state.exists()
        self.chain_state.unlink(missing_ok=True)
        return had

    def check_resumable(self) -> None:
        """A saved chain is only resumed with the deployment file that describes it."""
        if self.has_saved_chain() and not self.deployment_file.exists():
            raise DevnetError(
                f"{self.chain_state} holds a saved chain but {self.deployment_file} is missing: "
                "restore it, or run `fedledger devnet up --fresh` to start a new chain"
            )


def resume_deployment(folder: DevnetFolder, w3: Web3, rpc_url: str) -> Deployment:
    """The deployment file of a resumed chain, checked against it (chain id, the ledger's and
    the token's code) and pointed at ``rpc_url``; rewritten if its URL changed."""
    deployment = Deployment.load(folder.deployment_file)
    start_over = "run `fedledger devnet up --fresh` to start a new chain"
    if int(w3.eth.chain_id) != deployment.chain_id:
        raise DevnetError(
            f"the saved chain {folder.chain_state} is chain {w3.eth.chain_id}, but "
            f"{folder.deployment_file} is for chain {deployment.chain_id}; {start_over}"
        )
    for name, address in (("ledger", deployment.ledger), ("token", deployment.token)):
        if not w3.eth.get_code(Web3.to_checksum_address(address)):
            raise DevnetError(
                f"{folder.deployment_file} names {name} {address}, which has no code on the "
                f"chain saved in {folder.chain_state}; {start_over}"
            )
    if deployment.rpc_url != rpc_url:
        deployment = deployment.model_copy(update={"rpc_url": rpc_url})
        deployment.save(folder.deployment_file)
    return deployment

"""The deployment file: which chain, which contracts, and (on a devnet) which funded accounts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class AccountEntry(BaseModel):
    """A funded account; ``private_key`` is present only for throwaway devnet accounts."""

    model_config = ConfigDict(frozen=True)

    address: str
    private_key: str | None = None


class DeploymentAccounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    admin: AccountEntry
    coordinator: AccountEntry
    organisations: list[AccountEntry] = Field(default_factory=list)


class Deployment(BaseModel):
    """Where the fedledger contracts live; written by ``fedledger devnet up`` or ``fedledger deploy``."""

    model_config = ConfigDict(frozen=True)

    chain_id: int
    rpc_url: str | None = None
    ledger: str
    token: str
    accounts: DeploymentAccounts | None = None

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename) so a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(self.model_dump_json(indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"no deployment file at {path}; create one with `fedledger devnet up`"
            ) from exc

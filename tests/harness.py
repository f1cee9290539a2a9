"""Test harness: a coordinator on the in-process EVM, driven step by step, behind FastAPI's TestClient."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient

from fedledger import wire
from fedledger.coordinator.books import round_pool
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.service import RoundService
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import RoundState
from fedledger.incentive.signing import UploadAuthorization, sign_upload
from fedledger.tasks import DigitsTask
from fedledger.tasks.training import TrainConfig

NUM_ORGS = 3


class OneEpochDigits(DigitsTask):
    """The built-in digits task (same spec, same hash) training one local epoch a round instead
    of the spec's three: for tests of the protocol, where the model's quality does not matter."""

    def train_config(self, seed: int) -> TrainConfig:
        return replace(super().train_config(seed), epochs=1)


@dataclass
class Upload:
    """A ready-to-send upload: body and signed headers."""

    round_id: int
    body: bytes
    headers: dict[str, str]
    digest: bytes


@dataclass
class Harness:
    service: RoundService
    client: TestClient
    ledger: LedgerClient  # read-only
    orgs: list[LocalAccount]
    outsider: LocalAccount
    clock: list[float]

    def org_ledger(self, account: LocalAccount) -> LedgerClient:
        return self.ledger.with_account(account)

    def delta(self, scale: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        params = self.service.task.build_model(seed=0).state_dict()
        return {n: torch.randn(t.shape, generator=generator) * scale for n, t in params.items()}

    def trained_delta(
        self, k: int, base: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Organisation k's real update: one local epoch on its digits partition, from
        ``base`` (default: the initial model)."""
        from fedledger.tasks.training import train_local

        task = DigitsTask()
        model = task.build_model(seed=0)
        x, y = task.partition(k, len(self.orgs), alpha=0.5, seed=0)
        config = TrainConfig(epochs=1, seed=k)
        cpu = torch.device("cpu")
        start = base if base is not None else model.state_dict()
        return train_local(model, start, x, y, config, device=cpu).delta

    def round_with_cheat(
        self, round_id: int, uploads: list[dict[str, torch.Tensor]], note: str
    ) -> dict[str, Any]:
        """Organisations 0 and 1 upload honestly and organisation 2 cheats (``uploads`` in
        that order); the round closes; the cheat is flagged a copy with ``note`` in its note,
        unpaid and left out, the honest ones unflagged. Returns the round's result."""
        # every member commits first: uploads wait for the commit phase to end
        for upload in [
            self.make_upload(org, tensors, round_id=round_id)
            for org, tensors in zip(self.orgs, uploads, strict=True)
        ]:
            assert self.post(upload).status_code == 201
        self.service.step()
        result = self.member_result(round_id)
        by_org = {o["organisation"]: o for o in result["organisations"]}
        cheat = by_org[self.orgs[2].address]
        assert cheat["flag_reasons"] == ["copied_update"]
        assert note in cheat["note"]
        assert cheat["reward"] == "0" and not cheat["aggregated"]
        assert all(by_org[o.address]["flags"] == 0 for o in self.orgs[:2])
        return result

    def read_headers(self, account: LocalAccount | None = None, ttl_s: int = 300) -> dict[str, str]:
        """A member's signed read request (organisation 0's unless ``account`` is given)."""
        from fedledger.incentive.signing import sign_read

        reader = account or self.orgs[0]
        expiry = int(self.clock[0]) + ttl_s
        signature = sign_read(
            reader, expiry, chain_id=self.ledger.chain_id(), ledger=self.ledger.address
        )
        return wire.read_request_headers(wire.SignedRead(reader.address, expiry, signature))

    def member_result(self, round_id: int) -> dict[str, Any]:
        """``GET /v1/rounds/{round_id}`` as a member reads it (sample counts, aggregation)."""
        response = self.client.get(f"/v1/rounds/{round_id}", headers=self.read_headers())
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def model(self, model_hash: str) -> dict[str, torch.Tensor]:
        """The global model the coordinator serves under ``model_hash``."""
        from fedledger.incentive.commitment import decode_tensors

        response = self.client.get(f"/v1/models/{model_hash}")
        assert response.status_code == 200
        return decode_tensors(response.content)

    def make_upload(
        self,
        account: LocalAccount,
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        body: bytes | None = None,
        num_samples: int = 100,
        commit: bool = True,
        round_id: int | None = None,
        signer: LocalAccount | None = None,
        chain_id: int | None = None,
        ledger_address: str | None = None,
        expiry: int | None = None,
        nonce: int | None = None,
        seed: int = 0,
    ) -> Upload:
        """An upload by ``account`` (committed on-chain unless ``commit=False``), signed by ``signer``."""
        round_id = round_id if round_id is not None else self.service.current().round_id
        if body is None:
            body, digest = encode_tensors(tensors if tensors is not None else self.delta(seed=seed))
        else:
            from fedledger.incentive.commitment import keccak

            digest = keccak(body)
        if commit:
            self.org_ledger(account).commit_update(round_id, digest, num_samples)
        auth = UploadAuthorization(
            organisation=account.address,
            round_id=round_id,
            update_hash=digest,
            num_samples=num_samples,
            nonce=nonce if nonce is not None else UploadAuthorization.new_nonce(),
            # valid from now until after the commit phase, which it may wait for
            expiry=expiry if expiry is not None else self._expiry(round_id),
        )
        signature = sign_upload(
            signer or account,
            auth,
            chain_id=chain_id if chain_id is not None else self.ledger.chain_id(),
            ledger=ledger_address or self.ledger.address,
        )
        headers = wire.upload_headers(auth, signature)
        return Upload(round_id=round_id, body=body, headers=headers, digest=digest)

    def _expiry(self, round_id: int) -> int:
        deadline = self.ledger.get_round(round_id).deadline
        return int(max(self.clock[0], deadline + 1)) + 300

    def advance(self, seconds: float) -> None:
        """Move the coordinator's clock on by ``seconds``, and the chain's time with it (the
        ledger judges deadlines by block time)."""
        self.advance_to(self.clock[0] + seconds)

    def advance_to(self, timestamp: float) -> None:
        """Set the coordinator's clock to ``timestamp`` and the next block's time to no less."""
        self.clock[0] = timestamp
        tester: Any = self.ledger.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        if int(timestamp) > int(tester.get_block_by_number("pending")["timestamp"]):
            tester.time_travel(int(timestamp))

    def end_commit_phase(self, round_id: int | None = None) -> None:
        """What every node waits for before it uploads: the round's commit phase over. If a
        member has yet to commit, both clocks move to just past the commit deadline (inside
        the upload grace), as they would while the nodes waited."""
        round_id = round_id if round_id is not None else self.service.current().round_id
        if self.ledger.commits_closed(round_id, now=self.clock[0]):
            return
        record = self.ledger.get_round(round_id)
        if record.state is RoundState.OPEN:
            self.advance_to(record.deadline + 1)

    def post(self, upload: Upload, *, wait_for_commits: bool = True, **overrides: str) -> object:
        """POST ``upload``, once the commit phase is over unless ``wait_for_commits=False``."""
        if wait_for_commits:
            self.end_commit_phase(upload.round_id)
        headers = {**upload.headers, **overrides}
        return self.client.post(
            f"/v1/rounds/{upload.round_id}/updates", content=upload.body, headers=headers
        )


def modules_loaded_by(imports: str, top_level: tuple[str, ...]) -> list[str]:
    """The modules under ``top_level`` that ``import <imports>`` loads, in a fresh interpreter."""
    code = (
        f"import sys\nimport {imports}\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in {top_level!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.split()


def pool_of(result: dict[str, Any], policy: PricingPolicy) -> int:
    """What a finalized round (its JSON result) should have paid in all, by the books' rule,
    from the values, flags and gain it reports."""
    accepted = [o for o in result["organisations"] if o["status"] == "accepted"]
    return round_pool(
        policy,
        [o["value"] for o in accepted],
        [o["flags"] for o in accepted],
        result["validation_gain"],
    )


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for ``url`` to answer 200 while ``proc`` (logging to ``log``) runs; fail the test
    with the log if it exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the coordinator exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"no answer from {url} within {timeout_s} s:\n{log.read_text()}")


def fedledger(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``fedledger`` command run as a user runs it (a wide terminal, so that rich tables do
    not wrap), with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "fedledger", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **env},
    )

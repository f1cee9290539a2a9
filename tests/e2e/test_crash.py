"""The coordinator killed with SIGKILL at the worst moments, restarted on the same data directory.

Real processes: anvil and the coordinator (the CLI under uvicorn); uploads come over HTTP from
this test, committed on-chain with each organisation's key. Exact crash moments are armed with
failpoints (the coordinator kills itself with SIGKILL there); "after the acknowledgement" is a
plain external ``kill -9``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from fedledger import wire
from fedledger.coordinator.books import RoundInputs, UpdateInput, close_books
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.devnet.anvil import AnvilProcess, free_port, start_anvil
from fedledger.devnet.deploy import deploy_devnet
from fedledger.errors import ContractRevert
from fedledger.failpoints import (
    CLOSE_AFTER_AGGREGATE,
    CLOSE_AFTER_FINALIZE_TX,
    ENV_VAR,
    NODE_AFTER_COMMIT,
    UPLOAD_AFTER_BLOB,
)
from fedledger.incentive.chain import account_from_key, connect
from fedledger.incentive.commitment import canonical_bytes, decode_tensors, encode_tensors, keccak
from fedledger.incentive.deployment import Deployment
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import RoundState
from fedledger.incentive.signing import UploadAuthorization, sign_upload
from fedledger.tasks import DigitsTask
from fedledger.tasks.training import TrainConfig, train_local

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ORGS = 3


@dataclass
class Federation:
    """anvil + a deployment + a restartable coordinator process on one data directory."""

    anvil: AnvilProcess
    deployment: Deployment
    deployment_file: Path
    data_dir: Path
    log_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ledger(self) -> LedgerClient:
        return LedgerClient(connect(self.anvil.rpc_url), self.deployment.ledger)

    def org_ledger(self, k: int) -> LedgerClient:
        assert self.deployment.accounts is not None
        key = self.deployment.accounts.organisations[k].private_key
        assert key is not None
        return self.ledger.with_account(account_from_key(key))

    def start(self, *failpoints: str) -> None:
        assert self.deployment.accounts is not None
        key = self.deployment.accounts.coordinator.private_key
        assert key is not None
        env = {**os.environ, "PYTHONUNBUFFERED": "1", ENV_VAR: ",".join(failpoints)}
        self.starts += 1
        log = (self.log_dir / f"coordinator-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "fedledger", "coordinator", "serve",
                "--deployment", str(self.deployment_file),
                "--key", key,
                "--data-dir", str(self.data_dir),
                "--port", str(self.port),
                "--rounds", "2",
                "--round-timeout", "300",
                "--quorum", "1",
                "--verbose",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the coordinator did not come up:\n{self.log()}")

    def log(self) -> str:
        return (self.log_dir / f"coordinator-{self.starts}.log").read_text()

    def kill9(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def wait_killed_by_failpoint(self, timeout_s: float = 60) -> None:
        assert self.process is not None
        code = self.process.wait(timeout=timeout_s)
        assert code == -signal.SIGKILL, f"exit {code}, expected SIGKILL:\n{self.log()}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def current(self) -> wire.CurrentRound:
        return wire.CurrentRound.model_validate(httpx.get(f"{self.url}/v1/rounds/current").json())

    def wait_round(self, round_id: int, status: str, timeout_s: float = 60) -> wire.RoundResult:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/v1/rounds/{round_id}", timeout=5)
            if response.status_code == 200 and response.json()["status"] == status:
                return wire.RoundResult.model_validate(response.json())
            time.sleep(0.1)
        pytest.fail(f"round {round_id} did not reach {status}:\n{self.log()}")


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    anvil = start_anvil(accounts=ORGS + 2)
    deployment = deploy_devnet(connect(anvil.rpc_url), ORGS, rpc_url=anvil.rpc_url)
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    logs = tmp_path / "logs"
    logs.mkdir()
    fed = Federation(anvil, deployment, deployment_file, tmp_path / "coordinator", logs)
    yield fed
    fed.stop()
    anvil.stop()


def make_delta(k: int, round_id: int) -> dict[str, torch.Tensor]:
    """Organisation k's real update: a local epoch on its digits partition from the initial model."""
    task = DigitsTask()
    model = task.build_model(seed=0)
    x, y = task.partition(k, ORGS, alpha=0.5, seed=0)
    config = TrainConfig(epochs=1, lr=0.05, batch_size=32, seed=1000 * round_id + k)
    return train_local(model, model.state_dict(), x, y, config, device=torch.device("cpu")).delta


@dataclass(frozen=True)
class SignedUpload:
    round_id: int
    body: bytes
    headers: dict[str, str]
    num_samples: int


def prepare(fed: Federation, k: int, round_id: int, *, commit: bool = True) -> SignedUpload:
    """Organisation k's update for the round: committed on-chain, signed for the coordinator."""
    ledger = fed.org_ledger(k)
    assert ledger.account is not None
    body, digest = encode_tensors(make_delta(k, round_id))
    num_samples = 50 * (k + 1)
    if commit:
        ledger.commit_update(round_id, digest, num_samples)
    auth = UploadAuthorization(
        organisation=ledger.account.address,
        round_id=round_id,
        update_hash=digest,
        num_samples=num_samples,
        nonce=UploadAuthorization.new_nonce(),
        expiry=int(time.time()) + 600,
    )
    signature = sign_upload(ledger.account, auth, chain_id=ledger.chain_id(), ledger=ledger.address)
    headers = wire.upload_headers(auth, signature)
    return SignedUpload(round_id, body, headers, num_samples)


def post(fed: Federation, upload: SignedUpload) -> httpx.Response:
    return httpx.post(
        f"{fed.url}/v1/rounds/{upload.round_id}/updates",
        content=upload.body,
        headers=upload.headers,
        timeout=30,
    )


def expected_model_hash(fed: Federation, base_hash: str, uploads: list[SignedUpload]) -> str:
    """The new model a crash-free coordinator computes from these uploads, with its default
    pricing policy, the updates taken in on-chain commit order."""
    base = decode_tensors(httpx.get(f"{fed.url}/v1/models/{base_hash}").content)
    round_id = uploads[0].round_id
    by_org = {u.headers[wire.H_ORGANISATION].lower(): u for u in uploads}
    ordered = [by_org[o.lower()] for o in fed.ledger.commit_order(round_id)]
    policy = CoordinatorSettings(data_dir=fed.data_dir).pricing
    task = DigitsTask()
    x_val, y_val = task.validation_data()
    updates = [
        UpdateInput(
            organisation=u.headers[wire.H_ORGANISATION],
            update_hash=u.headers[wire.H_UPDATE_HASH],
            num_samples=u.num_samples,
            delta=decode_tensors(u.body),
        )
        for u in ordered
    ]
    inputs = RoundInputs(
        round_id, task.build_model(seed=policy.model_seed), base, updates, x_val, y_val
    )
    books = close_books(inputs, policy, device=torch.device("cpu"))
    assert books.aggregated, "the test's updates should make it into the model"
    assert books.new_hash == "0x" + keccak(canonical_bytes(books.params)).hex()
    return books.new_hash


def blob_names(fed: Federation) -> set[str]:
    return {p.name for p in (fed.data_dir / "blobs").iterdir()}


def test_acknowledged_update_survives_kill9(federation: Federation) -> None:
    fed = federation
    fed.start()
    first = prepare(fed, 0, 1)
    rest = [prepare(fed, k, 1) for k in (1, 2)]  # every commitment before any upload
    receipt = post(fed, first)
    assert receipt.status_code == 201
    fed.kill9()

    fed.start()
    assert fed.current().uploads_received == 1
    stored = httpx.get(f"{fed.url}/v1/rounds/1").json()["organisations"]
    assert [o["update_hash"] for o in stored] == [receipt.json()["update_hash"]]
    again = post(fed, first)  # the node's retry after a lost acknowledgement
    assert again.status_code == 200 and again.json()["duplicate"] is True
    base_hash = fed.current().model_hash
    for upload in rest:
        assert post(fed, upload).status_code == 201
    result = fed.wait_round(1, "finalized")
    assert result.new_model_hash == expected_model_hash(fed, base_hash, [first, *rest])
    assert "0x" + fed.ledger.get_round(1).new_model_hash.hex() == result.new_model_hash


def test_crash_mid_upload_leaves_nothing_and_the_retry_counts_once(federation: Federation) -> None:
    fed = federation
    fed.start(UPLOAD_AFTER_BLOB)
    upload = prepare(fed, 0, 1)
    for k in (1, 2):  # the others commit too, so that the commit phase is over
        prepare(fed, k, 1)
    before = blob_names(fed)
    with pytest.raises(httpx.TransportError):
        post(fed, upload)  # the coordinator dies between fsync and commit: no acknowledgement
    fed.wait_killed_by_failpoint()

    fed.start()
    assert blob_names(fed) == before  # no orphan, no half-written file
    assert not list((fed.data_dir / "blobs").glob("*.part"))
    assert fed.current().uploads_received == 0
    assert post(fed, upload).status_code == 201
    assert post(fed, upload).status_code == 200
    assert fed.current().uploads_received == 1


def test_crash_during_aggregation_redoes_it_identically(federation: Federation) -> None:
    fed = federation
    fed.start(CLOSE_AFTER_AGGREGATE)
    uploads = [prepare(fed, k, 1) for k in range(ORGS)]
    base_hash = fed.current().model_hash
    for upload in uploads:
        assert post(fed, upload).status_code == 201  # the last one triggers the close
    fed.wait_killed_by_failpoint()
    assert fed.ledger.get_round(1).state == RoundState.OPEN

    fed.start()
    result = fed.wait_round(1, "finalized")
    assert result.model_hash == base_hash
    assert result.new_model_hash == expected_model_hash(fed, base_hash, uploads)
    accepted = [o for o in result.organisations if o.status == wire.UploadStatus.ACCEPTED]
    assert len(accepted) == ORGS  # each update counted once
    assert fed.ledger.get_round(1).total_reward == sum(int(o.reward) for o in accepted)


def test_crash_after_finalize_tx_reconciles_without_paying_twice(federation: Federation) -> None:
    fed = federation
    fed.start(CLOSE_AFTER_FINALIZE_TX)
    uploads = [prepare(fed, k, 1) for k in range(ORGS)]
    for upload in uploads:
        assert post(fed, upload).status_code == 201
    fed.wait_killed_by_failpoint()
    record = fed.ledger.get_round(1)
    assert record.state == RoundState.FINALIZED  # the chain has it; the database does not
    balances = {
        u.headers[wire.H_ORGANISATION]: fed.ledger.balance_of(u.headers[wire.H_ORGANISATION])
        for u in uploads
    }
    supply = fed.ledger.total_supply()

    fed.start()
    result = fed.wait_round(1, "finalized")
    assert result.new_model_hash == "0x" + record.new_model_hash.hex()
    for entry in result.organisations:
        assert int(entry.reward) == fed.ledger.reward_of(1, entry.organisation)
        assert fed.ledger.balance_of(entry.organisation) == balances[entry.organisation]
    assert fed.ledger.total_supply() == supply == record.total_reward
    deadline = time.monotonic() + 30
    while fed.current().round_id != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fed.current().round_id == 2  # and the federation goes on
    assert fed.deployment.accounts is not None
    coordinator_key = fed.deployment.accounts.coordinator.private_key
    assert coordinator_key is not None
    with pytest.raises(ContractRevert) as refused:
        fed.ledger.with_account(account_from_key(coordinator_key)).finalize_round(
            1, record.new_model_hash, [], [], []
        )
    assert refused.value.error == "RoundNotOpen"


def test_node_killed_after_committing_rejoins_the_round(federation: Federation) -> None:
    fed = federation
    fed.start()
    assert fed.deployment.accounts is not None
    key = fed.deployment.accounts.organisations[0].private_key
    assert key is not None
    address = fed.deployment.accounts.organisations[0].address

    def node(*failpoints: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable, "-m", "fedledger", "node", "run",
                "--coordinator", fed.url,
                "--deployment", str(fed.deployment_file),
                "--key", key,
                "--data", f"0/{ORGS}",
            ],
            stdout=(fed.log_dir / f"node-{len(failpoints)}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, ENV_VAR: ",".join(failpoints)},
        )  # fmt: skip

    crashed = node(NODE_AFTER_COMMIT)
    assert crashed.wait(timeout=120) == -signal.SIGKILL
    committed = fed.ledger.commitment_of(1, address)
    assert committed is not None  # on-chain, but never uploaded
    assert fed.current().uploads_received == 0
    # the others commit (which ends the commit phase), then upload
    for upload in [prepare(fed, k, 1) for k in (1, 2)]:
        assert post(fed, upload).status_code == 201

    restarted = node()
    try:
        result = fed.wait_round(1, "finalized", timeout_s=120)
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
    mine = next(o for o in result.organisations if o.organisation == address)
    assert mine.status == wire.UploadStatus.ACCEPTED
    assert mine.update_hash == "0x" + committed.update_hash.hex()  # the same update, retrained

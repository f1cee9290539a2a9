"""End to end with real processes: anvil, the coordinator under uvicorn, three nodes, over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedledger.devnet.anvil import AnvilProcess, free_port
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect
from fedledger.incentive.commitment import keccak
from fedledger.incentive.deployment import Deployment
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import RoundState
from harness import wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ORGS = 3
ROUNDS = 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedledger", *args]


def test_three_nodes_two_rounds_settle_on_chain(anvil: AnvilProcess, tmp_path: Path) -> None:
    deployment = deploy_devnet(connect(anvil.rpc_url), ORGS, rpc_url=anvil.rpc_url)
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    assert deployment.accounts is not None
    coordinator_key = deployment.accounts.coordinator.private_key
    assert coordinator_key is not None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    logs = tmp_path / "logs"
    logs.mkdir()
    coordinator_log = logs / "coordinator.log"
    # The coordinator is set up by its config file, one setting by the environment (over the
    # file's) and one by a flag (over both); the key comes from the environment, never a file.
    consortium = tmp_path / "consortium.toml"
    consortium.write_text(
        f'''[coordinator]
deployment = "{deployment_file}"
data_dir = "{tmp_path / "coordinator"}"
port = 1
rounds = 5
round_timeout = 120
upload_grace = 7.5
quorum = {ORGS}
log_format = "json"

[pricing]
reward_per_gain = "2000000000000000000000"
negative_sigmas = 4.0
'''
    )
    coordinator = subprocess.Popen(
        _cli("coordinator", "serve", "--config", str(consortium), "--rounds", str(ROUNDS)),
        stdout=coordinator_log.open("wb"),
        stderr=subprocess.STDOUT,
        env={
            **env,
            "FEDLEDGER_KEY": coordinator_key,
            "FEDLEDGER_COORDINATOR_SERVE_PORT": str(port),
            "FEDLEDGER_PRICING_NEGATIVE_SIGMAS": "3.5",
        },
    )
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        wait_http(f"{url}/v1/health", 60, coordinator, coordinator_log)
        for k, org in enumerate(deployment.accounts.organisations):
            assert org.private_key is not None
            # Each node by its own config file, as an organisation's operator would.
            node_config = tmp_path / f"node{k}.toml"
            node_config.write_text(
                f'[node]\ncoordinator = "{url}"\ndeployment = "{deployment_file}"\n'
                f'data = "{k}/{ORGS}"\nreceipts = "{tmp_path / "receipts" / str(k)}"\n'
            )
            nodes.append(
                subprocess.Popen(
                    _cli("node", "run", "--config", str(node_config)),
                    stdout=(logs / f"node{k}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    env={**env, "FEDLEDGER_KEY": org.private_key},
                )
            )
        for k, node in enumerate(nodes):
            try:
                code = node.wait(timeout=240)
            except subprocess.TimeoutExpired:
                pytest.fail(f"node {k} did not finish:\n{(logs / f'node{k}.log').read_text()}")
            assert code == 0, (logs / f"node{k}.log").read_text()
        results = [httpx.get(f"{url}/v1/rounds/{r}", timeout=10).json() for r in (1, 2)]
        model_1 = httpx.get(f"{url}/v1/models/{results[0]['model_hash']}", timeout=10).content
    finally:
        for proc in [*nodes, coordinator]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    _check_chain(deployment, results, model_1)

    # The effective settings, printed at start-up with where each came from; the pricing the
    # rounds were priced with is the file's, under the environment's override.
    started = " ".join(coordinator_log.read_text().split())
    assert f"port = {port} (env FEDLEDGER_COORDINATOR_SERVE_PORT)" in started
    assert (
        f"rounds = {ROUNDS} (flag)" in started and f"upload_grace = 7.5 ({consortium})" in started
    )
    assert "key = *** (env FEDLEDGER_KEY)" in started and coordinator_key not in started
    assert "pricing.negative_sigmas = 3.5 (env FEDLEDGER_PRICING_NEGATIVE_SIGMAS)" in started
    for result in results:
        assert result["pricing"]["reward_per_gain"] == 2000 * 10**18
        assert result["pricing"]["negative_sigmas"] == 3.5
    # One JSON log line a round, by default (no access log without -v).
    lines = [json.loads(x) for x in coordinator_log.read_text().splitlines() if x.startswith("{")]
    ended = [x for x in lines if x.get("outcome") == "settled"]
    assert [x["round_id"] for x in ended] == [1, 2], lines
    assert all(x["aggregated"] == ORGS and int(x["paid_units"]) > 0 for x in ended)
    assert "GET /v1/" not in coordinator_log.read_text()
    node_log = " ".join((logs / "node1.log").read_text().split())
    assert f"data = 1/{ORGS} ({tmp_path / 'node1.toml'})" in node_log

    shown = subprocess.run(
        _cli("rewards", "--deployment", str(deployment_file), "--json"),
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    ledger = LedgerClient(connect(anvil.rpc_url), deployment.ledger)
    assert report["balances"] == {o: str(ledger.balance_of(o)) for o in ledger.organisations()}
    assert len(report["rounds"]) == ROUNDS * ORGS
    for row in report["rounds"]:
        assert int(row["reward"]) == ledger.reward_of(row["round"], row["organisation"])
        assert row["committed"] is not None and row["settled"] is True
        assert row["payment"] == "paid" and row["settlement"] == "direct"

    # Any member with the coordinator's data directory recomputes a round from it.
    for round_id in (1, 2):
        audited = subprocess.run(
            _cli(
                "audit", "--round", str(round_id), "--data-dir", str(tmp_path / "coordinator"),
                "--deployment", str(deployment_file),
            ),
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert audited.returncode == 0, audited.stdout + audited.stderr
        assert f"round {round_id}: all" in audited.stdout and "checks passed" in audited.stdout
    # Each node kept the coordinator's signed receipt of each upload; with them, the audit
    # (of the receipts' round) finds every acknowledged update stored and settled.
    kept = [tmp_path / "receipts" / str(k) / "round-0002.json" for k in range(ORGS)]
    proven = subprocess.run(
        _cli(
            "audit", "--data-dir", str(tmp_path / "coordinator"),
            "--deployment", str(deployment_file),
            *(arg for path in kept for arg in ("--receipt", str(path))),
        ),
        capture_output=True, text=True, timeout=120, env={**env, "COLUMNS": "200"},
    )  # fmt: skip
    assert proven.returncode == 0, proven.stdout + proven.stderr
    assert proven.stdout.count("is signed by the ledger's coordinator") == ORGS
    assert "round 2: all" in proven.stdout and "dropped" not in proven.stderr


def _check_chain(deployment: Deployment, results: list[dict], model_1: bytes) -> None:  # type: ignore[type-arg]
    """Everything the coordinator claims is checked against the contract, not its database."""
    assert deployment.rpc_url is not None and deployment.accounts is not None
    ledger = LedgerClient(connect(deployment.rpc_url), deployment.ledger)
    orgs = [o.address for o in deployment.accounts.organisations]
    assert ledger.round_count() == ROUNDS
    assert keccak(model_1) == ledger.get_round(1).model_hash

    total_rewards = {org: 0 for org in orgs}
    for result in results:
        round_id = result["round_id"]
        record = ledger.get_round(round_id)
        assert record.state == RoundState.FINALIZED
        assert "0x" + record.new_model_hash.hex() == result["new_model_hash"]
        accepted = [o for o in result["organisations"] if o["status"] == "accepted"]
        assert sorted(o["organisation"] for o in accepted) == sorted(orgs)
        for entry in accepted:
            commitment = ledger.commitment_of(round_id, entry["organisation"])
            assert commitment is not None, (
                f"round {round_id}: {entry['organisation']} not committed"
            )
            assert "0x" + commitment.update_hash.hex() == entry["update_hash"]
            assert commitment.num_samples > 0
            assert entry["num_samples"] is None  # read anonymously: members only
            assert ledger.reward_of(round_id, entry["organisation"]) == int(entry["reward"])
            assert ledger.score_of(round_id, entry["organisation"]) == int(entry["score"])
            total_rewards[entry["organisation"]] += int(entry["reward"])
        assert record.total_reward == sum(int(o["reward"]) for o in accepted)
    # round r+1 trains on exactly the model round r produced
    assert ledger.get_round(2).model_hash == ledger.get_round(1).new_model_hash
    for org in orgs:
        assert ledger.balance_of(org) == total_rewards[org]
    assert ledger.total_supply() == sum(total_rewards.values()) > 0

"""Bring your own task, end to end: the breast-cancer example's spec and CSV files, a model
plug-in loaded from the examples folder, anvil, the coordinator and three node processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedledger.devnet.anvil import AnvilProcess, free_port
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect
from fedledger.incentive.commitment import keccak
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import RoundState
from fedledger.tasks import load_spec
from harness import wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "breast_cancer"
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")
ROUNDS = 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedledger", *args]


def _env(key: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    env.pop("FEDLEDGER_KEY", None)
    return {**env, "FEDLEDGER_KEY": key} if key else env


def test_three_hospitals_train_their_csv_files_and_the_round_audits(
    anvil: AnvilProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    made = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    spec_file = EXAMPLE / "spec.toml"
    spec = load_spec(spec_file)
    deployment = deploy_devnet(
        connect(anvil.rpc_url), len(HOSPITALS), rpc_url=anvil.rpc_url, task_spec=spec.hash
    )
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    assert deployment.accounts is not None
    ledger = LedgerClient(connect(anvil.rpc_url), deployment.ledger)
    assert ledger.task_spec() == keccak(spec_file.read_bytes())
    common = ["--deployment", str(deployment_file), "--spec", str(spec_file)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = tmp_path / "logs"
    logs.mkdir()
    coordinator_log = logs / "coordinator.log"
    coordinator = subprocess.Popen(
        _cli(
            "coordinator", "serve", *common,
            "--validation", str(data / "validation.csv"),
            "--data-dir", str(tmp_path / "coordinator"),
            "--port", str(port), "--rounds", str(ROUNDS), "--round-timeout", "120",
            "--quorum", str(len(HOSPITALS)), "--header-timeout", "1",
        ),
        stdout=coordinator_log.open("wb"), stderr=subprocess.STDOUT,
        env=_env(deployment.accounts.coordinator.private_key),
    )  # fmt: skip
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        wait_http(f"{url}/v1/health", 60, coordinator, coordinator_log)
        served = httpx.get(f"{url}/v1/task", timeout=10)
        assert served.content == spec_file.read_bytes()
        # --header-timeout reaches the server: a connection that sends nothing is closed in 1 s
        # (the default is 10 s, past this socket's 8 s timeout).
        with socket.create_connection(("127.0.0.1", port), timeout=8) as silent:
            assert silent.recv(1) == b""

        # A hospital with a spec that differs in one field is told which, and trains nothing.
        other = tmp_path / "other" / "spec.toml"
        other.parent.mkdir()
        other.write_text(spec_file.read_text().replace("lr = 0.1\n", "lr = 0.5\n"))
        (other.parent / "hospital_model.py").write_text((EXAMPLE / "hospital_model.py").read_text())
        first = deployment.accounts.organisations[0]
        refused = subprocess.run(
            _cli(
                "node", "run", "--coordinator", url, "--deployment", str(deployment_file),
                "--spec", str(other), "--data", str(data / "hospital_a.csv"),
            ),
            capture_output=True, text=True, timeout=120, env=_env(first.private_key),
        )  # fmt: skip
        assert refused.returncode == 1
        assert "error [spec_mismatch]:" in refused.stderr, refused.stderr
        assert "training.lr: 0.5 != 0.1" in refused.stderr, refused.stderr
        assert ledger.commitment_of(1, first.address) is None

        for name, org in zip(HOSPITALS, deployment.accounts.organisations, strict=True):
            args = _cli(
                "node", "run", "--coordinator", url, *common,
                "--data", str(data / f"{name}.csv"), "--outbox", str(tmp_path / "outbox" / name),
            )  # fmt: skip
            out = (logs / f"{name}.log").open("wb")
            nodes.append(
                subprocess.Popen(
                    args, stdout=out, stderr=subprocess.STDOUT, env=_env(org.private_key)
                )
            )
        for name, node in zip(HOSPITALS, nodes, strict=True):
            log = logs / f"{name}.log"
            try:
                assert node.wait(timeout=300) == 0, log.read_text()
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish:\n{log.read_text()}")
            text = log.read_text()
            for round_id in range(1, ROUNDS + 1):
                assert f"round {round_id}: uploaded" in text and "local neg_log_loss" in text
                assert f"round {round_id} settled: global model validation" in text, text

        results = [httpx.get(f"{url}/v1/rounds/{r}", timeout=10).json() for r in (1, 2)]
        pulled = tmp_path / "model.safetensors"
        pull = subprocess.run(
            _cli(
                "model", "pull", "--round", str(ROUNDS), "--out", str(pulled),
                "--coordinator", url, "--deployment", str(deployment_file),
            ),
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert pull.returncode == 0, pull.stdout + pull.stderr
    finally:
        for proc in [*nodes, coordinator]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    # The model the consortium reached, pulled and checked against the chain.
    assert keccak(pulled.read_bytes()) == ledger.get_round(ROUNDS).new_model_hash
    assert results[-1]["validation_accuracy"] >= 0.9
    assert results[-1]["pricing"]["task"] == "breast-cancer"
    assert results[-1]["pricing"]["task_spec"] == "0x" + spec.hash.hex()

    # What each hospital sent is in its outbox, byte for byte what it committed on-chain.
    for name, org in zip(HOSPITALS, deployment.accounts.organisations, strict=True):
        for round_id in range(1, ROUNDS + 1):
            sent = tmp_path / "outbox" / name / f"round-{round_id:04d}"
            committed = ledger.commitment_of(round_id, org.address)
            assert committed is not None
            assert keccak((sent / "update.safetensors").read_bytes()) == committed.update_hash
            headers = json.loads((sent / "upload.json").read_text())["headers"]
            assert headers["X-Fedledger-Update-Hash"] == "0x" + committed.update_hash.hex()

    # Rewards read from the contract; the rounds recomputed by an auditor with plain commands.
    shown = subprocess.run(
        _cli("rewards", "--deployment", str(deployment_file), "--json"),
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert len(report["rounds"]) == ROUNDS * len(HOSPITALS)
    for row in report["rounds"]:
        assert int(row["reward"]) == ledger.reward_of(row["round"], row["organisation"])
    assert ledger.total_supply() == sum(map(int, report["balances"].values())) > 0
    for round_id in range(1, ROUNDS + 1):
        assert ledger.get_round(round_id).state == RoundState.FINALIZED
        audited = subprocess.run(
            _cli(
                "audit", "--round", str(round_id), "--data-dir", str(tmp_path / "coordinator"),
                "--deployment", str(deployment_file),
            ),
            capture_output=True, text=True, timeout=120, env=_env(),
        )  # fmt: skip
        assert audited.returncode == 0, audited.stdout + audited.stderr
        assert "task spec matches the ledger's taskSpec()" in audited.stdout
        assert f"round {round_id}: all" in audited.stdout
    missing = subprocess.run(
        _cli("audit", "--round", "99", "--deployment", str(deployment_file)),
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert missing.returncode == 1
    assert f"round 99 does not exist on ledger {deployment.ledger} (2 rounds so far)" in (
        missing.stderr
    )

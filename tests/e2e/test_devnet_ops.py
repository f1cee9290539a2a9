"""``fedledger devnet up``/``down`` as an operator runs them: a busy port refused before anything
starts, the chain kept across ``down`` and ``up``, ``--fresh`` for a new one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from fedledger.devnet.anvil import AnvilProcess, free_port, port_in_use
from fedledger.incentive.chain import account_from_key, connect
from fedledger.incentive.deployment import Deployment
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import DEFAULT_ROUND_BUDGET, TOKEN_UNIT
from harness import fedledger

pytestmark = [pytest.mark.e2e]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_devnet_up_on_a_port_where_anvil_already_answers_deploys_nothing(
    anvil: AnvilProcess, tmp_path: Path
) -> None:
    """Another chain answers on the port: before, `up` reported success and deployed onto it."""
    port = int(anvil.rpc_url.rsplit(":", 1)[1])
    other = connect(anvil.rpc_url)
    up = fedledger("devnet", "up", "--port", str(port), "--state-dir", "devnet", cwd=tmp_path)
    assert up.returncode == 1, up.stdout + up.stderr
    assert up.stderr.startswith("error [port_in_use]: port")
    assert len(up.stderr.strip().splitlines()) == 1 and "Traceback" not in up.stderr
    assert other.eth.block_number == 0  # nothing was deployed onto the other chain
    assert sorted(p.name for p in (tmp_path / "devnet").iterdir()) == []  # nor anything started


def test_devnet_up_on_a_port_any_program_listens_on_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        up = fedledger("devnet", "up", "--port", str(port), "--state-dir", "devnet", cwd=tmp_path)
    assert up.returncode == 1 and "[port_in_use]" in up.stderr, up.stdout + up.stderr
    assert not (tmp_path / "devnet" / "anvil.pid").exists()
    assert not port_in_use("127.0.0.1", port)  # and once it is free, the bind test says so


def _up(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    up = fedledger("devnet", "up", "--state-dir", str(state), *args, cwd=state.parent)
    assert up.returncode == 0, up.stdout + up.stderr
    return up


def _down(state: Path) -> str:
    down = fedledger("devnet", "down", "--state-dir", str(state), cwd=state.parent)
    assert down.returncode == 0, down.stdout + down.stderr
    return down.stdout


def _set_budget(deployment: Deployment, tokens: int) -> int:
    """The admin sets the round budget (a transaction); returns the chain's block number."""
    assert deployment.accounts is not None and deployment.accounts.admin.private_key
    admin = account_from_key(deployment.accounts.admin.private_key)
    ledger = LedgerClient(connect(str(deployment.rpc_url)), deployment.ledger, admin)
    ledger.set_round_budget(tokens * TOKEN_UNIT)
    return int(ledger.w3.eth.block_number)


def test_down_then_up_resumes_the_same_chain(tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    up = _up(state, "--organisations", "1", "--port", str(free_port()))
    assert "a fresh chain" in up.stdout
    deployment_file = state / "deployment.json"
    deployed = Deployment.load(deployment_file)
    try:
        blocks = _set_budget(deployed, 7)
    finally:
        down = _down(state)
    assert "chain saved in" in down
    pid = int(up.stdout.split("(pid ", 1)[1].split(")", 1)[0])
    assert not _running(pid)  # stopped, and it wrote its chain on the way out
    assert json.loads((state / "chain-state.json").read_text())

    # Up again, on another port: the same chain, the deployment file pointed at the new port.
    port = free_port()
    again = _up(state, "--port", str(port), "--organisations", "4")
    try:
        saved = state / "chain-state.json"
        assert f"resumed the devnet's chain from {saved}: {blocks} blocks" in again.stdout
        assert "--organisations ignored" in again.stderr
        resumed = Deployment.load(deployment_file)
        assert resumed.rpc_url == f"http://127.0.0.1:{port}"
        assert (resumed.ledger, resumed.token, resumed.accounts) == (
            deployed.ledger,
            deployed.token,
            deployed.accounts,
        )
        ledger = LedgerClient(connect(resumed.rpc_url), resumed.ledger)
        assert ledger.round_budget() == 7 * TOKEN_UNIT  # the transaction before `down`
        assert deployed.accounts is not None
        assert ledger.organisations() == [o.address for o in deployed.accounts.organisations]
        assert ledger.w3.eth.block_number == blocks
    finally:
        _down(state)


def test_up_refuses_a_deployment_file_of_another_chain_and_fresh_starts_a_new_one(
    tmp_path: Path,
) -> None:
    state = tmp_path / "devnet"
    port = free_port()
    _up(state, "--organisations", "1", "--port", str(port))
    deployment_file = state / "deployment.json"
    deployed = Deployment.load(deployment_file)
    try:
        blocks = _set_budget(deployed, 7)
    finally:
        _down(state)

    # A deployment file that does not describe the saved chain is refused, not deployed over.
    deployed.model_copy(update={"ledger": "0x" + "ab" * 20}).save(deployment_file)
    args = ("devnet", "up", "--port", str(port), "--state-dir", str(state))
    mismatched = fedledger(*args, cwd=tmp_path)
    assert mismatched.returncode == 1, mismatched.stdout + mismatched.stderr
    assert "which has no code on the chain saved in" in mismatched.stderr
    assert "--fresh" in mismatched.stderr
    assert not (state / "anvil.pid").exists() and not port_in_use("127.0.0.1", port)

    fresh = _up(state, "--fresh", "--organisations", "1", "--port", str(port))
    try:
        assert "discarded the saved chain" in fresh.stdout and "a fresh chain" in fresh.stdout
        new = Deployment.load(deployment_file)
        ledger = LedgerClient(connect(str(new.rpc_url)), new.ledger)
        assert ledger.w3.eth.get_code(ledger.address)
        assert ledger.round_budget() == DEFAULT_ROUND_BUDGET  # deployed anew: no budget of 7
        assert ledger.w3.eth.block_number == blocks - 1  # the same deployment, less that one
    finally:
        _down(state)


def test_down_with_a_stale_pid_file_signals_nobody(tmp_path: Path) -> None:
    """The pid file's pid now belongs to another program (anvil died, the pid was reused)."""
    state = tmp_path / "devnet"
    state.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (state / "anvil.pid").write_text(str(other.pid))
        down = fedledger("devnet", "down", "--state-dir", str(state), cwd=tmp_path)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "anvil was not running (stale pid file" in down.stdout
        assert other.poll() is None  # not signalled
        assert not (state / "anvil.pid").exists()
    finally:
        other.kill()
        other.wait()

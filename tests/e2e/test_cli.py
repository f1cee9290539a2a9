"""The operator's commands as a user runs them: devnet up/down, register, round-budget, rewards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedledger.coordinator.policy import PricingPolicy
from fedledger.devnet.anvil import free_port
from fedledger.incentive.chain import account_from_key, connect, devnet_account
from fedledger.incentive.deployment import Deployment
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree
from fedledger.incentive.onchain import Flag
from fedledger.keys import unlock
from harness import fedledger

pytestmark = [pytest.mark.e2e]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_devnet_up_register_rewards_down(tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    port = free_port()
    password = tmp_path / "password"
    password.write_text("devnet only\n")
    up = fedledger(
        "devnet", "up", "--organisations", "2", "--port", str(port), "--state-dir", str(state),
        "--password-file", str(password),
        cwd=tmp_path,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    pid = int((state / "anvil.pid").read_text())
    try:
        assert _running(pid)
        deployment = Deployment.load(state / "deployment.json")
        assert deployment.accounts is not None
        keystores = {
            "admin": deployment.accounts.admin,
            "coordinator": deployment.accounts.coordinator,
            "organisation-1": deployment.accounts.organisations[1],
        }
        for name, entry in keystores.items():
            unlocked = unlock(state / "keystores" / f"{name}.json", "devnet only")
            assert unlocked.address == entry.address
        assert deployment.rpc_url == f"http://127.0.0.1:{port}"
        assert deployment.accounts is not None and len(deployment.accounts.organisations) == 2
        ledger = LedgerClient(connect(deployment.rpc_url), deployment.ledger)
        assert ledger.chain_id() == deployment.chain_id == 31337
        assert ledger.token_address == deployment.token
        assert sorted(ledger.organisations()) == sorted(
            o.address for o in deployment.accounts.organisations
        )

        again = fedledger(
            "devnet", "up", "--port", str(port), "--state-dir", str(state), cwd=tmp_path
        )
        assert again.returncode == 1 and "already up" in again.stderr

        newcomer = devnet_account(9).address
        admin_key = deployment.accounts.admin.private_key
        assert admin_key is not None
        registered = fedledger(
            "register",
            newcomer,
            "--deployment",
            str(state / "deployment.json"),
            "--key",
            admin_key,
            cwd=tmp_path,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        assert ledger.is_organisation(newcomer)

        twice = fedledger(
            "register",
            newcomer,
            "--deployment",
            str(state / "deployment.json"),
            "--key",
            admin_key,
            cwd=tmp_path,
        )
        assert twice.returncode == 1 and "OrganisationAlreadyRegistered" in twice.stderr

        # The round budget: the deployment's default, shown; set by the admin only.
        deployment_file = str(state / "deployment.json")
        shown_budget = fedledger("round-budget", "--deployment", deployment_file, cwd=tmp_path)
        assert shown_budget.returncode == 0 and "1,000.0000 FLR" in shown_budget.stdout
        set_budget = fedledger(
            "round-budget", "2500.5", "--deployment", deployment_file, "--key", admin_key,
            cwd=tmp_path,
        )  # fmt: skip
        assert set_budget.returncode == 0, set_budget.stdout + set_budget.stderr
        assert ledger.round_budget() == 2500 * 10**18 + 5 * 10**17
        org_key = deployment.accounts.organisations[0].private_key
        assert org_key is not None
        refused = fedledger(
            "round-budget", "1", "--deployment", deployment_file, "--key", org_key, cwd=tmp_path
        )
        assert refused.returncode == 1 and "AccessControlUnauthorizedAccount" in refused.stderr
        assert ledger.round_budget() == 2500 * 10**18 + 5 * 10**17

        # An organisation's sample cap: none until the admin sets one; not by the organisation.
        org = deployment.accounts.organisations[0].address
        no_cap = fedledger("sample-cap", org, "--deployment", deployment_file, cwd=tmp_path)
        assert no_cap.returncode == 0 and f"sample cap of {org}: none" in no_cap.stdout
        capped = fedledger(
            "sample-cap", org, "5000", "--deployment", deployment_file, "--key", admin_key,
            cwd=tmp_path,
        )  # fmt: skip
        assert capped.returncode == 0 and f"sample cap of {org}: 5000" in capped.stdout
        own = fedledger(
            "sample-cap", org, "0", "--deployment", deployment_file, "--key", org_key,
            cwd=tmp_path,
        )  # fmt: skip
        assert own.returncode == 1 and "AccessControlUnauthorizedAccount" in own.stderr
        assert ledger.sample_cap_of(org) == 5000

        # Pricing knobs are checked before anything is served, and say what is wrong.
        coordinator_key = deployment.accounts.coordinator.private_key
        assert coordinator_key is not None
        smallest_sampled = PricingPolicy().max_exact_players + 1
        needed = PricingPolicy.valuation_budget_needed(smallest_sampled)  # 2 K + 2
        for knob, expected in (
            ("bogus=1", "expected KNOB=VALUE with KNOB one of model_seed, metric"),
            ("valuation_budget=3", f"it needs at least {needed} evaluations"),
        ):
            served = fedledger(
                "coordinator", "serve", "--deployment", deployment_file, "--key", coordinator_key,
                "--data-dir", str(tmp_path / "never"), "--set", knob, cwd=tmp_path,
            )  # fmt: skip
            assert served.returncode == 1, served.stdout + served.stderr
            assert expected in " ".join(served.stderr.split()), served.stderr
            assert "Traceback" not in served.stdout + served.stderr
            assert not (tmp_path / "never").exists()

        shown = fedledger(
            "rewards", "--deployment", str(state / "deployment.json"), "--json", cwd=tmp_path
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        report = json.loads(shown.stdout)
        assert report["ledger"] == deployment.ledger
        assert report["rounds"] == []
        assert report["balances"] == {org: "0" for org in ledger.organisations()}

        # The newcomer leaves again (revokeOrganisation): the two founders are the active members.
        admin = ledger.with_account(account_from_key(admin_key))
        admin.revoke_organisation(newcomer)
        assert not ledger.is_organisation(newcomer) and ledger.active_organisations() == 2

        # A round settled by Merkle root: one organisation claims, the other (flagged) not yet.
        orgs = deployment.accounts.organisations
        coordinator = ledger.with_account(
            account_from_key(deployment.accounts.coordinator.private_key)
        )  # type: ignore[arg-type]
        coordinator.open_round(1, b"\x11" * 32, ledger.block_timestamp() + 600)
        members = [ledger.with_account(account_from_key(o.private_key)) for o in orgs[:2]]  # type: ignore[arg-type]
        # Organisation 0 trains with DP: its commitment carries the epsilon it has spent.
        members[0].commit_update(1, b"\xa0" * 32, 10, epsilon=2.5)
        members[1].commit_update(1, b"\xa1" * 32, 10)
        tree = SettlementTree.build(
            [
                SettlementLeaf(1, orgs[0].address, 10**18 // 2, 7 * 10**18, 0),
                SettlementLeaf(1, orgs[1].address, 0, 0, int(Flag.COPIED_UPDATE)),
            ]
        )
        coordinator.finalize_round_with_root(
            1, b"\x22" * 32, tree.root, tree.total_reward, 2,
            flagged={orgs[1].address: int(Flag.COPIED_UPDATE)},
        )  # fmt: skip
        members[0].claim_reward(1, 10**18 // 2, 7 * 10**18, 0, tree.proof(orgs[0].address))
        members[1].retire(7.75)  # its privacy budget is spent: it trains no more
        shown = fedledger(
            "rewards", "--deployment", str(state / "deployment.json"), "--json", cwd=tmp_path
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        report = json.loads(shown.stdout)
        rows = {r["organisation"]: r for r in report["rounds"]}
        claimed, flagged = rows[orgs[0].address], rows[orgs[1].address]
        assert (claimed["epsilon"], flagged["epsilon"]) == (2.5, None)
        assert (claimed["samples"], flagged["samples"]) == (10, 10)  # as committed
        assert report["retired"] == {orgs[1].address: {"since_round": 1, "epsilon": 7.75}}
        paid = {org: "0" for org in ledger.organisations()} | {orgs[0].address: str(7 * 10**18)}
        assert report["total_rewards"] == paid
        assert (claimed["settlement"], claimed["payment"]) == ("claims", "claimed")
        assert (claimed["reward"], claimed["value"], claimed["flags"]) == (str(7 * 10**18), 0.5, [])
        assert claimed["score"] == str(10**18 // 2)
        assert (flagged["payment"], flagged["flags"]) == ("unclaimed", ["copied_update"])
        table = fedledger("rewards", "--deployment", str(state / "deployment.json"), cwd=tmp_path)
        assert table.returncode == 0 and "not claimed yet" in table.stdout
        assert "epsilon" in table.stdout and "2.500" in table.stdout
        assert "since round 1, epsilon 7.750 spent" in " ".join(table.stdout.split())
    finally:
        down = fedledger("devnet", "down", "--state-dir", str(state), cwd=tmp_path)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _running(pid)
    assert not (state / "anvil.pid").exists()


def test_node_with_unregistered_key_is_told_so(tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    up = fedledger(
        "devnet",
        "up",
        "--organisations",
        "1",
        "--port",
        str(free_port()),
        "--state-dir",
        str(state),
        cwd=tmp_path,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        outsider_key = devnet_account(7).key.hex()
        run = fedledger(
            "node",
            "run",
            "--deployment",
            str(state / "deployment.json"),
            "--key",
            outsider_key,
            cwd=tmp_path,
        )
        assert run.returncode == 1
        assert "not a registered organisation" in run.stderr
    finally:
        fedledger("devnet", "down", "--state-dir", str(state), cwd=tmp_path)


def test_deploy_to_any_rpc_endpoint_with_keys(tmp_path: Path) -> None:
    from fedledger.devnet.anvil import start_anvil

    anvil = start_anvil(accounts=4)
    try:
        admin, coordinator, org = devnet_account(0), devnet_account(1), devnet_account(2)
        out = tmp_path / "deployment.json"
        deployed = fedledger(
            "deploy",
            "--rpc", anvil.rpc_url,
            "--key", admin.key.hex(),
            "--coordinator", coordinator.address,
            "--organisation", org.address,
            "--out", str(out),
            cwd=tmp_path,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deployment = Deployment.load(out)
        assert deployment.accounts is not None
        assert deployment.accounts.admin.private_key is None  # real keys never land in the file
        ledger = LedgerClient(connect(anvil.rpc_url), deployment.ledger)
        assert ledger.has_coordinator_role(coordinator.address)
        assert ledger.organisations() == [org.address]
    finally:
        anvil.stop()


def test_demo_runs_on_an_anvil_it_starts_and_stops(tmp_path: Path) -> None:
    """`fedledger demo` by default: a devnet of its own, gone when the demo ends."""
    from fedledger.devnet.anvil import find_anvil

    pid_file = tmp_path / "anvil.pid"
    wrapper = tmp_path / "anvil"  # records the pid of the anvil the demo starts
    wrapper.write_text(f'#!/bin/sh\necho $$ > {pid_file}\nexec {find_anvil()} "$@"\n')
    wrapper.chmod(0o755)
    done = fedledger(
        "demo", "--organisations", "3", "--rounds", "2", cwd=tmp_path, FEDLEDGER_ANVIL=str(wrapper)
    )
    assert done.returncode == 0, done.stderr
    assert "chain anvil (id 31337)" in done.stdout
    assert "final validation accuracy" in done.stdout
    assert (tmp_path / ".fedledger" / "demo-report" / "summary.md").is_file()
    assert not _running(int(pid_file.read_text()))


def test_demo_without_anvil_says_so_and_uses_the_in_process_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from fedledger import cli, demo
    from fedledger.devnet import anvil
    from fedledger.errors import DevnetError

    def missing() -> Path:
        raise DevnetError("anvil not found")

    chains: list[str] = []
    monkeypatch.setattr(anvil, "find_anvil", missing)
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: chains.append(kwargs["chain"]))
    result = CliRunner().invoke(cli.app, ["demo"])
    assert result.exit_code == 0, result.output
    assert chains == ["embedded"]
    assert "anvil is not installed" in result.output

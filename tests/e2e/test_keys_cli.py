"""`fedledger keys` and `--keystore` with real processes against anvil: an admin acts from an
encrypted keystore, and no key appears in any process's arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedledger.devnet.anvil import AnvilProcess
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect
from fedledger.incentive.ledger import LedgerClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedledger", *args]
    base = {k: v for k, v in os.environ.items() if not k.startswith("FEDLEDGER_")}
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=120,
        env={**base, "COLUMNS": "300", **(env or {})},
    )  # fmt: skip


def test_an_admin_acts_from_an_encrypted_keystore(anvil: AnvilProcess, tmp_path: Path) -> None:
    deployment = deploy_devnet(connect(anvil.rpc_url), 1, rpc_url=anvil.rpc_url)
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    assert deployment.accounts is not None and deployment.accounts.admin.private_key
    admin_key = deployment.accounts.admin.private_key
    password = tmp_path / "password"
    password.write_text("correct horse battery staple\n")
    store = tmp_path / "keys"

    imported = _run(
        "keys", "import", "--out", str(store / "admin.json"), "--password-file", str(password),
        stdin=admin_key + "\n",
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert deployment.accounts.admin.address in imported.stdout
    created = _run(
        "keys", "new", "--out", str(store / "spare.json"),
        env={"FEDLEDGER_PASSWORD": "another one"},
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    listed = _run("keys", "list", str(store))
    assert deployment.accounts.admin.address in listed.stdout
    assert created.stdout.split()[0] in listed.stdout

    args = (
        "round-budget", "7", "--deployment", str(deployment_file),
        "--keystore", str(store / "admin.json"), "--password-file", str(password),
    )  # fmt: skip
    assert admin_key.removeprefix("0x") not in " ".join(args)
    budget = _run(*args)
    assert budget.returncode == 0, budget.stderr
    assert "warning" not in budget.stderr
    ledger = LedgerClient(connect(anvil.rpc_url), deployment.ledger)
    assert ledger.round_budget() == 7 * 10**18

    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    refused = _run(*args[:-1], str(wrong))
    assert refused.returncode == 1
    assert "error [bad_keystore]: cannot unlock" in refused.stderr
    no_password = _run(*args[:-2])  # no file, no environment, no terminal to prompt on
    assert no_password.returncode == 1
    assert "give --password-file or set FEDLEDGER_PASSWORD" in no_password.stderr

    typed = _run("round-budget", "8", "--deployment", str(deployment_file), "--key", admin_key)
    assert typed.returncode == 0, typed.stderr
    assert "warning: a key on the command line is visible" in typed.stderr
    from_env = _run(
        "round-budget", "9", "--deployment", str(deployment_file),
        env={"FEDLEDGER_KEY": admin_key},
    )  # fmt: skip
    assert from_env.returncode == 0 and "warning" not in from_env.stderr
    assert ledger.round_budget() == 9 * 10**18

"""Keystores: the Web3 Secret Storage files `fedledger keys` writes and every command unlocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account

from fedledger.errors import ErrorCode, SetupError
from fedledger.keys import PASSWORD_ENV, keystore_address, read_password, unlock, write_keystore


def test_a_keystore_round_trips_and_is_private(tmp_path: Path) -> None:
    account = Account.create()
    info = write_keystore(account, tmp_path / "k.json", "s3cret", iterations=1000)
    assert info.address == account.address == keystore_address(info.path)
    assert info.path.stat().st_mode & 0o777 == 0o600
    assert account.key.hex().removeprefix("0x") not in info.path.read_text()
    assert unlock(info.path, "s3cret").key == account.key
    # The standard format: eth-account (and so geth, Foundry) decrypt it without us.
    assert Account.decrypt(json.loads(info.path.read_text()), "s3cret") == account.key


def test_refusals_name_the_file_and_what_to_do(tmp_path: Path) -> None:
    info = write_keystore(Account.create(), tmp_path / "k.json", "right", iterations=1000)
    cases = [
        (lambda: unlock(info.path, "wrong"), "wrong password"),
        (lambda: write_keystore(Account.create(), info.path, "x", iterations=1000), "exists"),
        (lambda: write_keystore(Account.create(), tmp_path / "e.json", ""), "non-empty password"),
        (lambda: unlock(tmp_path / "missing.json", "x"), "cannot read the keystore"),
    ]
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"hello": 1}')
    cases.append((lambda: unlock(garbage, "x"), "is not a JSON keystore"))
    for action, fragment in cases:
        with pytest.raises(SetupError) as info_:
            action()
        assert info_.value.code is ErrorCode.BAD_KEYSTORE
        assert fragment in info_.value.message


def test_the_password_comes_from_a_file_then_the_environment_then_a_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "typed"

    file = tmp_path / "password"
    file.write_text("from-file\nignored second line\n")
    assert read_password(file, prompt=prompt, what="k") == "from-file"
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert read_password(None, prompt=prompt, what="k") == "from-env"
    monkeypatch.delenv(PASSWORD_ENV)
    assert read_password(None, prompt=prompt, what="k") == "typed" and asked == ["password for k"]
    with pytest.raises(SetupError, match="give --password-file or set FEDLEDGER_PASSWORD"):
        read_password(None, prompt=None, what="k")

"""Signing keys as a security officer accepts them: encrypted JSON keystores (the Web3 Secret
Storage format geth, Foundry's ``cast wallet`` and eth-account use), unlocked by a password
from a file, the environment or a prompt, and never taken from a process's arguments.

A hex key (``--key`` or ``FEDLEDGER_KEY``) still works, for devnets whose keys are public; on
the command line it is visible to every user of the machine (``ps``), so it warns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from fedledger.errors import ErrorCode, SetupError

PASSWORD_ENV = "FEDLEDGER_PASSWORD"
KDF_ITERATIONS = 262_144
"""PBKDF2-SHA256 rounds of a new keystore (geth's light setting is scrypt n=4096; this takes
about 0.3 s to unlock here, each guess as long)."""


@dataclass(frozen=True)
class KeystoreInfo:
    path: Path
    address: str


def write_keystore(
    account: LocalAccount, path: Path, password: str, *, iterations: int = KDF_ITERATIONS
) -> KeystoreInfo:
    """Encrypt ``account``'s key with ``password`` into ``path`` (mode 0600); never overwrites."""
    if path.exists():
        raise SetupError(ErrorCode.BAD_KEYSTORE, f"{path} exists; not overwriting a keystore")
    if not password:
        raise SetupError(ErrorCode.BAD_KEYSTORE, "a keystore needs a non-empty password")
    document = Account.encrypt(account.key, password, kdf="pbkdf2", iterations=iterations)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle)
    return KeystoreInfo(path, account.address)


def keystore_address(path: Path) -> str:
    """The checksummed address a keystore holds, read without its password."""
    from web3 import Web3

    document = _read(path)
    address = document.get("address")
    if not isinstance(address, str):
        raise SetupError(ErrorCode.BAD_KEYSTORE, f"{path} names no address")
    return str(Web3.to_checksum_address("0x" + address.removeprefix("0x")))


def _read(path: Path) -> dict[str, object]:
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise SetupError(
            ErrorCode.BAD_KEYSTORE, f"cannot read the keystore {path}: {exc.strerror}"
        ) from None
    except ValueError:
        raise SetupError(ErrorCode.BAD_KEYSTORE, f"{path} is not a JSON keystore") from None
    if not isinstance(document, dict) or ("crypto" not in document and "Crypto" not in document):
        raise SetupError(ErrorCode.BAD_KEYSTORE, f"{path} is not a JSON keystore")
    return document


def read_password(
    password_file: Path | None, *, prompt: Callable[[str], str] | None, what: str
) -> str:
    """The password: from ``password_file`` (its first line), else ``FEDLEDGER_PASSWORD``, else
    ``prompt`` (None: refuse, for commands that must not wait on a terminal)."""
    if password_file is not None:
        try:
            return password_file.read_text().splitlines()[0] if password_file.stat().st_size else ""
        except OSError as exc:
            raise SetupError(
                ErrorCode.BAD_KEYSTORE, f"cannot read the password file {password_file}: {exc}"
            ) from None
    if PASSWORD_ENV in os.environ:
        return os.environ[PASSWORD_ENV]
    if prompt is None:
        raise SetupError(
            ErrorCode.BAD_KEYSTORE,
            f"no password for {what}: give --password-file or set {PASSWORD_ENV}",
        )
    return prompt(f"password for {what}")


def unlock(path: Path, password: str) -> LocalAccount:
    """The account in the keystore at ``path``; a wrong password is refused as such."""
    document = _read(path)
    try:
        key = Account.decrypt(document, password)
    except ValueError as exc:
        raise SetupError(
            ErrorCode.BAD_KEYSTORE, f"cannot unlock {path}: {exc} (wrong password?)"
        ) from None
    account: LocalAccount = Account.from_key(key)
    return account

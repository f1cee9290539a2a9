"""The committed contract artifacts are exactly what the pinned compiler makes of the sources.

Needs node and devnet/node_modules (``npm install`` in devnet/); CI installs both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedledger.contracts.compile import BUILD_DIR, CONTRACTS, compile_contracts, write_artifacts

if TYPE_CHECKING:
    from tests.contracts.conftest import Chain


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, Any]]:
    artifacts: dict[str, dict[str, Any]] = compile_contracts()
    return artifacts


def committed(name: str) -> dict[str, Any]:
    """The artifact as committed on disk (read afresh: load_artifact caches)."""
    artifact: dict[str, Any] = json.loads((BUILD_DIR / f"{name}.json").read_text())
    return artifact


def test_compiles_exactly_the_contracts_shipped(compiled: dict[str, dict[str, Any]]) -> None:
    assert sorted(compiled) == sorted(CONTRACTS)
    assert sorted(p.stem for p in BUILD_DIR.glob("*.json")) == sorted(CONTRACTS)


@pytest.mark.parametrize("name", CONTRACTS)
@pytest.mark.parametrize("field", ["abi", "bytecode", "deployedBytecode"])
def test_committed_artifact_matches_the_sources(
    compiled: dict[str, dict[str, Any]], name: str, field: str
) -> None:
    assert compiled[name][field] == committed(name)[field], (
        f"contracts/build/{name}.json is stale; run `python -m fedledger.contracts.compile`"
    )


def test_committed_files_are_byte_identical_to_a_fresh_build(
    compiled: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    write_artifacts(compiled, tmp_path)
    for name in CONTRACTS:
        assert (tmp_path / f"{name}.json").read_bytes() == (BUILD_DIR / f"{name}.json").read_bytes()


def test_bytecode_is_real_code(compiled: dict[str, dict[str, Any]]) -> None:
    for artifact in compiled.values():
        for field in ("bytecode", "deployedBytecode"):
            code = artifact[field]
            assert code.startswith("0x")
            assert len(code) > 2_000
            bytes.fromhex(code[2:])


def test_the_deployed_token_runs_the_committed_runtime_code(chain: Chain) -> None:
    """RewardToken has no immutables, so its on-chain code equals deployedBytecode exactly."""
    on_chain = chain.w3.eth.get_code(chain.deployment.token)
    assert "0x" + bytes(on_chain).hex() == committed("RewardToken")["deployedBytecode"]


def test_the_deployed_ledger_runs_the_committed_runtime_code(chain: Chain) -> None:
    """FedLedger's one immutable is its token's address; blank it and the code is deployedBytecode."""
    on_chain = bytes(chain.w3.eth.get_code(chain.deployment.ledger))
    token_word = bytes(12) + bytes.fromhex(chain.deployment.token[2:])
    assert token_word in on_chain
    blanked = on_chain.replace(token_word, bytes(32))
    assert "0x" + blanked.hex() == committed("FedLedger")["deployedBytecode"]

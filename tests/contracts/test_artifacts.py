"""The committed contract artifacts are exactly what the pinned compiler makes of the sources.

Needs node and devnet/node_modules (``npm install`` in devnet/); CI installs both.
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import fedledger
from fedledger.contracts.compile import (
    BUILD_DIR,
    CONTRACTS,
    SOURCES,
    compile_contracts,
    write_artifacts,
)
from fedledger.incentive.chain import error_selectors
from fedledger.incentive.commitment import keccak
from fedledger.incentive.ledger import RoundRecord

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


def _code(name: str, field: str) -> bytes:
    return bytes.fromhex(committed(name)[field].removeprefix("0x"))


def _abi_type(param: dict[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + kind[5:]
    return kind


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(_abi_type(i) for i in entry['inputs'])})"


def _entries(name: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in committed(name)["abi"] if e["type"] == kind]


@dataclass(frozen=True)
class _ContractCall:
    where: str
    contract: str | None  # None: the receiver does not say which contract
    function: str
    num_args: int


def _contract_calls() -> list[_ContractCall]:
    """Every ``<receiver>.functions.<name>(...)`` in the package's own sources."""
    root = Path(fedledger.__file__).resolve().parent
    receivers = {"contract": "FedLedger", "token": "RewardToken"}  # LedgerClient's attributes
    calls = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if d not in ("node_modules", "__pycache__")]
        for file in (Path(folder) / f for f in files if f.endswith(".py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr == "functions"
                ):
                    continue
                receiver = node.func.value.value
                name = receiver.attr if isinstance(receiver, ast.Attribute) else None
                plain = not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args)
                assert plain, f"{file}:{node.lineno}: count this call's arguments by hand"
                calls.append(
                    _ContractCall(
                        where=f"{file.relative_to(root)}:{node.lineno}",
                        contract=receivers.get(name or ""),
                        function=node.func.attr,
                        num_args=len(node.args),
                    )
                )
    return calls


def test_the_abi_has_every_function_the_python_client_calls() -> None:
    """Each contract function the package calls exists in the committed ABI, with as many
    parameters as the call passes: a renamed or re-typed function fails here, not on-chain."""
    calls = _contract_calls()
    called = {c.function for c in calls}
    assert {"openRound", "commitUpdate", "finalizeRound", "claimReward", "balanceOf"} <= called
    arities = {
        name: {(e["name"], len(e["inputs"])) for e in _entries(name, "function")}
        for name in CONTRACTS
    }
    for call in calls:
        candidates = [call.contract] if call.contract else list(CONTRACTS)
        assert any((call.function, call.num_args) in arities[c] for c in candidates), (
            f"{call.where}: {call.function} with {call.num_args} argument(s) is not in the ABI "
            f"of {' or '.join(candidates)}"
        )


def test_the_views_the_client_unpacks_return_what_it_expects() -> None:
    """LedgerClient unpacks getRound, commitmentOf and valuationOf by position, and deploys
    the ledger with (admin, coordinator, token name, token symbol)."""
    outputs = {e["name"]: e["outputs"] for e in _entries("FedLedger", "function")}

    def flat(name: str) -> list[str]:
        params = outputs[name]
        if len(params) == 1 and params[0]["type"] == "tuple":
            params = params[0]["components"]
        return [_abi_type(p) for p in params]

    assert len(flat("getRound")) == len(fields(RoundRecord)) - 1  # all but round_id
    assert flat("commitmentOf") == ["bytes32", "uint256"]
    assert flat("valuationOf") == ["bytes32", "uint256", "bytes32"]  # Valuation.as_abi
    [constructor] = _entries("FedLedger", "constructor")
    assert [_abi_type(p) for p in constructor["inputs"]] == [
        "address",
        "address",
        "string",
        "string",
    ]


def test_every_custom_error_in_the_sources_is_decodable_from_the_abi() -> None:
    """A revert is named for the operator only if its error is in the ABI the client reads."""
    selectors = error_selectors(committed(name)["abi"] for name in CONTRACTS)
    declared = []
    for source in SOURCES:
        text = (BUILD_DIR.parent / source).read_text()
        enums = set(re.findall(r"\benum\s+(\w+)", text))
        for name, params in re.findall(r"\berror\s+(\w+)\s*\(([^)]*)\)\s*;", text):
            types = [p.split()[0] for p in params.split(",") if p.strip()]
            declared.append((name, ["uint8" if t in enums else t for t in types]))
    assert len(declared) >= 15  # FedLedger's own errors, at least
    for name, types in declared:
        selector = keccak(f"{name}({','.join(types)})".encode())[:4]
        assert selectors.get(selector) == (name, types), f"{name}({', '.join(types)})"


@pytest.mark.parametrize("name", CONTRACTS)
def test_the_runtime_code_dispatches_every_abi_function(name: str) -> None:
    """The ABI and the bytecode belong together: each function's selector is pushed by the
    dispatcher of the runtime code."""
    runtime = _code(name, "deployedBytecode")
    functions = _entries(name, "function")
    assert functions
    for entry in functions:
        push4 = b"\x63" + keccak(_signature(entry).encode())[:4]
        assert push4 in runtime, _signature(entry)


def test_the_ledger_emits_every_event_it_declares() -> None:
    source = (BUILD_DIR.parent / "FedLedger.sol").read_text()
    own = set(re.findall(r"\bevent\s+(\w+)\s*\(", source))
    runtime = _code("FedLedger", "deployedBytecode")
    events = [e for e in _entries("FedLedger", "event") if e["name"] in own]
    assert {e["name"] for e in events} == own
    for entry in events:
        assert keccak(_signature(entry).encode()) in runtime, f"{entry['name']} is never emitted"


def test_the_creation_code_deploys_the_committed_runtime_code() -> None:
    """Each creation code carries its runtime code, and the ledger's carries the token's
    creation code: the ledger deploys exactly the committed RewardToken."""
    for name in CONTRACTS:
        assert _code(name, "deployedBytecode") in _code(name, "bytecode"), name
    assert _code("RewardToken", "bytecode") in _code("FedLedger", "bytecode")


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

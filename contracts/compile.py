"""Compile the Solidity sources with the pinned solc-js and OpenZeppelin, and load the artifacts.

Running the product needs only the committed ``build/<Contract>.json`` files; compiling needs
node and ``devnet/node_modules`` (``npm install`` in ``devnet/``).
Usage: ``python -m fedledger.contracts.compile [--check]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from fedledger.errors import CompileError

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / "build"
SHIM = HERE / "solc-shim.js"
SOURCES = ("RewardToken.sol", "FedLedger.sol")
CONTRACTS = ("RewardToken", "FedLedger")
SOLC_VERSION = "0.8.37"

# Pinned so that the committed artifacts are reproducible byte for byte.
SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "prague",
    "metadata": {"bytecodeHash": "none", "appendCBOR": False},
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}


def _standard_input() -> dict[str, Any]:
    return {
        "language": "Solidity",
        "sources": {name: {"content": (HERE / name).read_text()} for name in SOURCES},
        "settings": SETTINGS,
    }


def compile_contracts() -> dict[str, dict[str, Any]]:
    """Compile every source and return ``{contract name: artifact}``."""
    import solcx  # imported here: only the compile step needs it

    repo = HERE.parent
    try:
        output = solcx.compile_standard(
            _standard_input(), solc_binary=str(SHIM), base_path=str(repo), allow_paths=[str(HERE)]
        )
    except Exception as exc:  # solcx raises several unrelated types (SolcError, JSON errors)
        raise CompileError(f"solc failed: {exc}. Did you run `npm install` in devnet/?") from exc
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise CompileError("\n".join(e["formattedMessage"] for e in errors))

    artifacts: dict[str, dict[str, Any]] = {}
    for source in SOURCES:
        for name, out in output["contracts"][source].items():
            if name not in CONTRACTS:
                continue
            artifacts[name] = {
                "contractName": name,
                "sourceName": f"contracts/{source}",
                "compiler": {"name": "solc", "version": SOLC_VERSION, "settings": SETTINGS},
                "abi": out["abi"],
                "bytecode": "0x" + out["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + out["evm"]["deployedBytecode"]["object"],
            }
    return artifacts


def write_artifacts(artifacts: dict[str, dict[str, Any]], build_dir: Path = BUILD_DIR) -> None:
    """Write each artifact as ``build_dir/<Contract>.json`` (stable key order, trailing newline)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    for name, artifact in artifacts.items():
        (build_dir / f"{name}.json").write_text(
            json.dumps(artifact, indent=2, sort_keys=True) + "\n"
        )


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The committed artifact of contract ``name`` (``abi``, ``bytecode``, ...)."""
    path = BUILD_DIR / f"{name}.json"
    if not path.exists():
        raise CompileError(f"no artifact {path}; run `python -m fedledger.contracts.compile`")
    artifact: dict[str, Any] = json.loads(path.read_text())
    return artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if build/ differs from the sources"
    )
    args = parser.parse_args(argv)
    artifacts = compile_contracts()
    if args.check:
        stale = [n for n, a in artifacts.items() if load_artifact(n) != json.loads(json.dumps(a))]
        if stale:
            print(f"stale artifacts: {', '.join(stale)}; run python -m fedledger.contracts.compile")
            return 1
        print("artifacts are up to date")
        return 0
    write_artifacts(artifacts)
    print(f"wrote {', '.join(sorted(artifacts))} to {BUILD_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

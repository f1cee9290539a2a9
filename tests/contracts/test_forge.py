"""The ledger's Foundry suite (contracts/test/): fuzz tests of each rule and an invariant
campaign, run by the real forge (from devnet/node_modules) on its own EVM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORGE = ROOT / "devnet" / "node_modules" / ".bin" / "forge"

INVARIANTS = {
    "invariant_noRuleBroken()",
    "invariant_supplyIsWhatWasPaid()",
    "invariant_roundsAddUp()",
    "invariant_rolesStayApart()",
}


@pytest.mark.slow
def test_forge_fuzz_and_invariant_suite_passes() -> None:
    assert FORGE.exists(), "forge is missing: run ./do install (npm install in devnet/)"
    run = subprocess.run(
        [str(FORGE), "test", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    start = run.stdout.find("{")
    assert start >= 0, run.stdout + run.stderr
    suites = json.loads(run.stdout[start:])
    results = {
        name: result for suite in suites.values() for name, result in suite["test_results"].items()
    }
    failed = {name: r["reason"] for name, r in results.items() if r["status"] != "Success"}
    assert not failed, failed
    assert run.returncode == 0, run.stderr
    assert set(results) >= INVARIANTS
    assert sum(name.startswith("testFuzz_") for name in results) >= 8
    for name in INVARIANTS:
        campaign = results[name]["kind"]["Invariant"]
        assert campaign["calls"] >= campaign["runs"] * 10  # the sequences really ran

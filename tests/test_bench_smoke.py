"""Smoke runs of the benchmark scripts (``--quick``): each runs, and what it reports is sane.

Flower is an optional extra: without it the Flower figures must be reported as absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
HAS_FLWR = importlib.util.find_spec("flwr") is not None

pytestmark = pytest.mark.slow


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"fedledger_bench_{name}", BENCH_DIR / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, tmp_path: Path, *extra: str) -> Any:
    """``bench/<name>.py --quick`` through its ``main``; the rows it wrote with ``--json``."""
    out = tmp_path / f"{name}.json"
    assert load(name).main(["--quick", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_aggregation_rows_are_consistent(tmp_path: Path) -> None:
    rows = run_quick("aggregation", tmp_path)
    cases = {(r["num_updates"], r["num_params"]) for r in rows}
    assert len(cases) == 2
    for case in cases:
        by_method = {r["method"]: r for r in rows if (r["num_updates"], r["num_params"]) == case}
        ceiling = by_method["copy (ceiling)"]
        assert ceiling["seconds"] > 0 and ceiling["share_of_ceiling"] == pytest.approx(1.0)
        for method in (
            "fedledger fedavg",
            "fedledger aggregate",
            "blocked (reference)",
            "torch.stack(...).mean(0)",
        ):
            row = by_method[method]
            assert row["seconds"] > 0
            assert row["gb_per_s"] == pytest.approx(case[0] * case[1] * 4 / row["seconds"] / 1e9)
            assert row["max_abs_error"] < 1e-5  # every method computes the same average
        flwr = by_method["flwr aggregate"]
        if HAS_FLWR:
            assert flwr["seconds"] > 0 and flwr["max_abs_error"] < 1e-5
            assert by_method["fedledger fedavg"]["speedup_vs_flwr"] > 0
        else:
            assert flwr["seconds"] is None and flwr["note"] == "flwr not installed"
            assert by_method["fedledger fedavg"]["speedup_vs_flwr"] is None


def test_gas_covers_every_ledger_call(tmp_path: Path) -> None:
    report = run_quick("gas", tmp_path)
    calls = {c["call"]: c for c in report["calls"]}
    for call in (
        "registerOrganisation",
        "openRound",
        "commitUpdate",
        "extendRound",
        "finalizeRound",
        "finalizeRoundWithRoot",
        "claimReward",
    ):
        assert 21_000 < calls[call]["mean"] < 30_000_000, call
    assert len(calls["commitUpdate"]["gas"]) == 3 * 3  # 3 organisations, 3 rounds
    settlements = {s["settlement"]: s for s in report["settlements"]}
    assert set(settlements) == {"direct (cold)", "direct", "root + claims"}
    for s in settlements.values():
        assert s["total_gas"] == s["coordinator_gas"] + s["organisations_gas"]
    # A root moves the settlement's cost from the coordinator to the claimants.
    assert (
        settlements["root + claims"]["coordinator_gas"] < settlements["direct"]["coordinator_gas"]
    )
    assert (
        settlements["root + claims"]["organisations_gas"]
        > settlements["direct"]["organisations_gas"]
    )


@pytest.mark.e2e
def test_digits10_variants_agree(tmp_path: Path) -> None:
    report = run_quick("digits10", tmp_path, "--plot", str(tmp_path / "curves.png"))
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["floor", "flwr", "flwr-deploy", "embedded", "anvil"]
    floor = results["floor"]
    assert floor["status"] == "ok" and len(floor["accuracies"]) == 2
    assert 0.3 < floor["accuracies"][-1] <= 1.0
    ran = ["floor", "embedded", "anvil"] + (["flwr", "flwr-deploy"] if HAS_FLWR else [])
    for name in ran:
        r = results[name]
        assert r["status"] == "ok", r["status"]
        assert len(r["round_s"]) == 2 and all(s > 0 for s in r["round_s"])
        peaks = r["peak_rss_mib"].values()
        assert all(mib > 0 for mib in peaks) and max(peaks) > 100  # a torch process at least
        # Same split, model, seeds and FedAvg: the same model within a rounding or a screened update.
        assert abs(r["accuracies"][-1] - floor["accuracies"][-1]) <= 0.05, name
    if not HAS_FLWR:
        for name in ("flwr", "flwr-deploy"):
            assert "not installed" in results[name]["status"]
            assert results[name]["accuracies"] == [] and results[name]["round_s"] == []
    # Each Flower runtime's curve is compared with the floor's, round by round.
    assert [line.split(" ")[0] for line in report["curves"]] == ["flwr", "flwr-deploy"]
    for name in ("embedded", "anvil"):
        breakdown = results[name]["breakdown"]
        assert breakdown["nodes"]["training"] > 0
        assert breakdown["coordinator"]["Shapley valuation"] > 0
        # One commitment a node a round (the quick run has three nodes).
        assert results[name]["calls"]["nodes"]["chain: transactions"] == pytest.approx(3.0)
    assert any("floor" in line for line in report["targets"])
    assert (tmp_path / "curves.png").exists() == (
        importlib.util.find_spec("matplotlib") is not None
    )


@pytest.mark.e2e
def test_scale_round_closes_through_the_coordinator(tmp_path: Path) -> None:
    # The books in their own process, as the full run's model has them (the quick model is
    # small enough for `auto` to keep them in the coordinator's).
    result = run_quick("scale", tmp_path, "--books-process", "on")
    assert result["status"] == "ok", result["status"]
    assert result["blocker"] is None  # 4 organisations: exact Shapley
    assert result["round"]["status"] == "finalized"
    calls = result["coordinator_calls"]
    assert calls["upload verification (each)"] == result["num_orgs"]
    assert calls["books process: a round asked and answered"] == 1
    # The parts were timed where they ran: in the child, not in the coordinator.
    assert result["coordinator_s"]["books process: aggregation (FedAvg)"] > 0
    assert "aggregation (FedAvg)" not in calls
    memory = result["memory_mib"]
    assert memory["coordinator peak (VmHWM)"] > 50 and memory["books process peak (ru_maxrss)"] > 50


def test_run_refuses_unknown_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    run = load("run")
    with pytest.raises(SystemExit):
        run.main(["nonsense"])
    assert "unknown benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["gas", "scale", "--", "--orgs", "3"])


def test_robust_reports_accuracy_and_the_attackers_pay(tmp_path: Path) -> None:
    rows = run_quick("robust", tmp_path)
    attacks = [r for r in rows if "rule" in r]
    riders = [r for r in rows if "free_rider" in r]
    assert {r["attack"] for r in attacks} == {"sign flip", "x10"}
    assert all(0.0 <= r["attacked"] <= 1.0 and 0.0 <= r["paid"] <= 1.0 for r in attacks)
    assert {r["free_rider"] for r in riders} == {
        "zero", "noise", "byte-identical copy", "copy x3", "x100"
    }  # fmt: skip
    assert all(r["paid"] == 0.0 and r["flagged"] == 3 for r in riders)


def test_fairness_prices_against_retrained_truth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_quick("fairness", tmp_path, "--variant", "nll=metric=neg_log_loss")
    assert report["rounds"] == 4 and set(report["policies"]) == {"default", "nll"}
    assert report["policies"]["nll"]["metric"] == "neg_log_loss"
    federations = report["federations"]
    odd_roles = {"iid-sizes": "mislabelled", "replay-update": "replayer", "tabular": "mislabelled"}
    assert {(s["kind"], s["variant"]) for s in federations} == {
        (kind, variant) for kind in odd_roles for variant in ("default", "nll")
    }
    for s in federations:
        orgs = [
            r
            for r in report["organisations"]
            if (r["kind"], r["variant"]) == (s["kind"], s["variant"])
        ]
        assert len(orgs) == s["num_orgs"] == 4
        assert sum(r["paid_share"] for r in orgs) == pytest.approx(1.0)
        assert sum(r["true_share"] for r in orgs) == pytest.approx(1.0)
        for r in orgs:
            assert r["error_points"] == pytest.approx(100 * (r["paid_share"] - r["true_share"]))
            assert 0 <= r["flagged_rounds"] <= 4
            assert r["true_share_error"] >= 0
        assert s["truth_seeds"] == 3
        assert s["truth_error_points"] == pytest.approx(
            100 * max(r["true_share_error"] for r in orgs)
        )
        odd = orgs[-1]
        assert odd["role"] == odd_roles[s["kind"]]
        if odd["role"] == "replayer":  # data-less: worth exactly nothing
            assert odd["truth"] == 0.0 and odd["true_share"] == 0.0
        assert s["odd_paid_share"] == pytest.approx(odd["paid_share"])
        for rho in (s["spearman"], s["spearman_told"], s["spearman_resolved"]):
            assert rho is None or -1.0 <= rho <= 1.0
        assert s["max_error_points"] >= s["mean_error_points"] >= 0
        assert s["max_error_clipped_points"] >= 0
        assert 0 <= s["honest_flagged"] <= s["honest_rounds"] == 3 * 4
        assert 0.0 < s["floor"] <= 1.0 and 0.0 < s["accuracy"] <= 1.0
        assert 0.0 <= s["zero_gain_max_paid"] <= 1.0
        series = [
            r
            for r in report["round_series"]
            if (r["kind"], r["variant"]) == (s["kind"], s["variant"])
        ]
        assert [r["round"] for r in series] == [1, 2, 3, 4]
        assert all(0.0 <= r["paid_share"] <= 1.0 for r in series)
        assert s["zero_gain_rounds"] == sum(r["gain"] <= 1e-6 for r in series)
    # The truth is the mean of the games played from three initial models, and another
    # initial model is another game.
    for truth in report["truth"].values():
        assert truth["seeds"] == [0, 1, 2] and len(truth["seed_values"]) == 3
        assert truth["values"] == pytest.approx(
            [sum(v) / 3 for v in zip(*truth["seed_values"], strict=True)]
        )
        assert truth["seed_values"][0] != truth["seed_values"][1]
    # The truth is retrained once and shared by every policy.
    by_org = {}
    for r in report["organisations"]:
        by_org.setdefault((r["kind"], r["org"]), set()).add(r["true_share"])
    assert all(len(shares) == 1 for shares in by_org.values())
    targets = report["targets"]
    assert len(targets) == 2 * 7 and all(t["passed"] in (True, False, None) for t in targets)
    assert "worst case over the federations" in capsys.readouterr().out

    fairness = load("fairness")
    with pytest.raises(SystemExit):
        fairness.main(["--quick", "--set", "nonsense=1"])
    assert "unknown pricing knob" in capsys.readouterr().err


def test_rho2_lets_close_shares_go_either_way_and_no_others() -> None:
    import numpy as np

    fairness = load("fairness")
    truth = np.array([0.10, 0.11, 0.30, 0.31, 0.0, 0.18])
    swapped_within = np.array([0.11, 0.10, 0.31, 0.30, 0.0, 0.18])
    assert fairness.spearman_told(truth, swapped_within, 0.02) == pytest.approx(1.0)
    # Tied at their mean rank (rho*), the same payout counts against the ranking.
    assert fairness.spearman(fairness.tied_within(truth, 0.02), swapped_within) < 0.98
    inverted = np.array([0.30, 0.10, 0.11, 0.31, 0.0, 0.18])  # 0.10 paid as 0.30 is
    assert fairness.spearman_told(truth, inverted, 0.02) < 0.8
    # A chain of close neighbours does not free its ends: 0.10 and 0.13 are 3 points apart.
    chain = np.array([0.10, 0.115, 0.13, 0.5])
    assert fairness.spearman_told(chain, np.array([0.115, 0.10, 0.13, 0.5]), 0.02) == 1.0
    assert fairness.spearman_told(chain, np.array([0.13, 0.115, 0.10, 0.5]), 0.02) < 0.5
    # Nothing to tell: a flat truth, or a flat payout.
    assert np.isnan(fairness.spearman_told(np.array([0.2, 0.2, 0.2]), truth[:3], 0.02))
    assert np.isnan(fairness.spearman_told(truth, np.ones(6), 0.02))


def test_privacy_prices_dp_updates_and_the_free_rider(tmp_path: Path) -> None:
    rows = run_quick("privacy", tmp_path)
    assert [(r["target_epsilon"], r["free_rider"]) for r in rows] == [
        (None, False),
        (8.0, False),
        (8.0, True),
    ]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["flagged"] <= 1.0
        assert "unaligned_update" not in row["flags"]  # the screen knows the DP noise
    assert rows[1]["noise_multiplier"] > 0
    # Uploading noise earns less than training honestly did.
    assert rows[2]["org0_share"] < rows[1]["org0_share"]


def test_compression_shrinks_the_uploads(tmp_path: Path) -> None:
    rows = {(r["scheme"], r["fraction"]): r for r in run_quick("compression", tmp_path)}
    none = rows[("none", None)]
    assert none["ratio"] == 1.0
    assert rows[("int8", None)]["bytes_per_round"] < 0.35 * none["bytes_per_round"]
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0


def test_txpath_sends_with_fewer_calls_than_web3_defaults(tmp_path: Path) -> None:
    report = run_quick("txpath", tmp_path)
    calls = {row["path"]: row["rpc_calls"] for row in report["paths"]}
    # web3's defaults read the nonce, fees, gas and chain id each time; with the nonce, fees
    # and chain id known and the gas given, a transaction is only sent and its receipt fetched
    # (anvil may answer the first receipt poll with null); the estimate is one call more.
    fixed, ours = calls["fedledger, fixed gas"], calls["fedledger"]
    assert fixed <= 3 and fixed < ours <= fixed + 1.5 and ours + 3 < calls["web3 defaults"]
    assert set(report["signing"]) >= {"NativeECCBackend", "CoinCurveECCBackend"}

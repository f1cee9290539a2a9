"""Smoke run of ``bench/shapley.py --quick``: it runs, and the rows it reports are sane."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "shapley.py"

pytestmark = pytest.mark.slow


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedledger_bench_shapley", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_valuator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shapley.json"
    assert load().main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())

    exact_rows = [r for r in rows if r["part"] == "exact"]
    splits = {r["split"] for r in exact_rows}
    assert len(splits) == 2 and any("0.1" in s for s in splits)
    for split in splits:
        by_name = {r["valuator"]: r for r in exact_rows if r["split"] == split}
        # K = 4: the default budget is all 16 coalitions; 10% of them is the kernel
        # estimator's minimum, too few for GTG to finish a round of permutations.
        assert set(by_name) == {
            "exact",
            "kernel @16 (default)",
            "kernel @10",
            "tmc @10",
            "gtg (converged)",
        }
        assert by_name["kernel @16 (default)"]["max_abs_error_max"] == pytest.approx(0, abs=1e-12)
        exact = by_name["exact"]
        assert exact["spearman_min"] == 1.0 and exact["max_abs_error_max"] == 0.0
        assert exact["evaluations_max"] == 16 and exact["evaluations_share"] == 1.0
        assert exact["runs"] == 2  # 2 rounds, one exact valuation each
        for name, row in by_name.items():
            assert -1.0 <= row["spearman_min"] <= row["spearman_mean"] <= 1.0, name
            assert 0.0 <= row["max_abs_error_mean"] <= row["max_abs_error_max"] < 1.0, name
            assert 0 < row["evaluations_mean"] <= row["evaluations_max"] <= 16, name
            assert row["evaluations_share"] == pytest.approx(row["evaluations_mean"] / 16)
            assert 0 < row["valuation_s"] < row["round_s"], name
            assert row["valuation_share"] == pytest.approx(row["valuation_s"] / row["round_s"])
            if "@10" in name:
                assert row["evaluations_max"] <= 10 and row["runs"] == 2 * 2, name
            assert f"{row['spearman_mean']:.3f}" in printed

    large = [r for r in rows if r["part"] == "large"]
    assert [r["valuator"] for r in large] == [
        "kernel @480 (default)",
        "kernel @480 stop 0.25",
        "tmc @480",
        "gtg @480",
    ]
    for row in large:
        assert row["num_orgs"] == 12 and row["evaluations_share"] is None
        assert row["evaluations_max"] <= 480  # default_evaluations(12)
        assert -1.0 <= row["spearman_mean"] <= 1.0 and row["valuation_s"] > 0
    # The early-stopping estimator spends at most the budget, its values still ranked.
    stopped = large[1]
    assert stopped["evaluations_mean"] <= large[0]["evaluations_mean"] == 480
    assert stopped["spearman_mean"] > 0.5
    assert "reference: 2 x 40 untruncated permutations" in printed
    assert printed.count("gtg @10") == printed.count("refused: max_evaluations=10 cannot") == 2
    costs = [r for r in rows if r["part"] == "exact-cost"]
    assert [(r["num_orgs"], r["coalitions"]) for r in costs] == [(6, 64), (8, 256)]
    assert all(r["valuation_s"] > 0 and r["peak_rss_mib"] > 0 for r in costs)

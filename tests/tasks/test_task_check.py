"""`fedledger task check`: the spec, its plug-ins and every data file, each bad one reported
on standard error with its code and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eth_hash.auto import keccak

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "breast_cancer"


def test_every_file_is_checked_and_each_bad_one_named_with_its_code(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    good = tmp_path / "hospital_a.csv"
    lines = good.read_text().splitlines()
    misspelt = tmp_path / "misspelt.csv"
    misspelt.write_text("\n".join([lines[0].replace("mean radius", "mean radios"), *lines[1:]]))
    empty_cell = tmp_path / "empty_cell.csv"
    cells = lines[1].split(",")
    empty_cell.write_text("\n".join([lines[0], ",".join(["", *cells[1:]]), *lines[2:]]) + "\n")
    spec = EXAMPLE / "spec.toml"
    checked = subprocess.run(
        [
            sys.executable, "-m", "fedledger", "task", "check", str(spec),
            "--data", str(misspelt), "--data", str(good), "--data", str(empty_cell),
            "--validation", str(tmp_path / "validation.csv"),
        ],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert checked.returncode == 1
    assert "Traceback" not in checked.stdout + checked.stderr
    errors = checked.stderr.strip().splitlines()
    assert len(errors) == 2, checked.stderr
    assert errors[0].startswith("error [data_columns]: ")
    assert "column 'mean radios' is not in the spec (did you mean 'mean radius'?)" in errors[0]
    assert errors[1].startswith("error [data_value]: ")
    assert "line 2, column 'mean radius': empty" in errors[1]
    assert f"data {good}: 227 rows, features (30,): ok" in checked.stdout
    assert "validation" in checked.stdout and "114 rows" in checked.stdout
    assert f"keccak256 0x{keccak(spec.read_bytes()).hex()}" in checked.stdout
    assert '"0.weight" = [32, 30]' in checked.stdout  # the tensors table, to pin the model

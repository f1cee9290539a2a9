"""Three clinics' shares of sklearn's diabetes data (bundled: no download) as CSV files.

Writes clinic_a.csv, clinic_b.csv, clinic_c.csv (unequal shares) and validation.csv (a 20%
hold-out, the coordinator's) into the folder given (default: data/ beside this file), with the
spec's columns: ten baseline measurements and ``progression``, the disease one year on.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

COLUMNS = [
    "age", "sex", "bmi", "blood_pressure", "total_cholesterol", "ldl", "hdl",
    "cholesterol_ratio", "log_triglycerides", "glucose",
]  # fmt: skip
SHARES = {"clinic_a": 0.5, "clinic_b": 0.3, "clinic_c": 0.2}


def write(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*COLUMNS, "progression"])
        for row, target in zip(x, y, strict=True):
            cells = [
                str(int(v)) if name in ("age", "sex") else f"{v:.6g}"
                for name, v in zip(COLUMNS, row, strict=True)
            ]
            writer.writerow([*cells, f"{target:g}"])


def main(folder: Path) -> None:
    x, y = load_diabetes(return_X_y=True, scaled=False)
    rows = np.arange(len(y))
    train, validation = train_test_split(rows, test_size=0.2, random_state=0)
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "validation.csv", x[validation], y[validation])
    train = np.random.default_rng(0).permutation(train)
    cuts = np.cumsum([int(share * len(train)) for share in SHARES.values()])[:-1]
    for name, part in zip(SHARES, np.split(train, cuts), strict=True):
        write(folder / f"{name}.csv", x[part], y[part])
        print(f"{folder / name}.csv: {len(part)} patients")
    print(f"{folder / 'validation.csv'}: {len(validation)} patients (the coordinator's)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("data"))

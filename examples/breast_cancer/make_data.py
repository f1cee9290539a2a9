"""Three hospitals' shares of sklearn's breast-cancer data (bundled: no download) as CSV files.

Writes hospital_a.csv, hospital_b.csv and hospital_c.csv (unequal shares, 227/114/114 rows) and
validation.csv (a stratified 20% hold-out, the coordinator's) into the folder given
(default: data/ beside this file). The columns are the spec's: 30 measurements and the label
``diagnosis`` (malignant or benign).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

SHARES = {"hospital_a": 0.5, "hospital_b": 0.25, "hospital_c": 0.25}


def write(path: Path, columns: list[str], x: np.ndarray, labels: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "diagnosis"])
        for row, label in zip(x, labels, strict=True):
            writer.writerow([f"{v:.6g}" for v in row] + [label])


def main(folder: Path) -> None:
    data = load_breast_cancer()
    columns = [str(name) for name in data.feature_names]
    names = [str(data.target_names[t]) for t in data.target]
    rows = np.arange(len(names))
    train, validation = train_test_split(rows, test_size=0.2, stratify=data.target, random_state=0)
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "validation.csv", columns, data.data[validation], [names[i] for i in validation])
    rng = np.random.default_rng(0)
    train = rng.permutation(train)
    cuts = np.cumsum([int(share * len(train)) for share in SHARES.values()])[:-1]
    for name, part in zip(SHARES, np.split(train, cuts), strict=True):
        write(folder / f"{name}.csv", columns, data.data[part], [names[i] for i in part])
        print(f"{folder / name}.csv: {len(part)} patients")
    print(f"{folder / 'validation.csv'}: {len(validation)} patients (the coordinator's)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("data"))

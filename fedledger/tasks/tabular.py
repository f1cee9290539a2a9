"""The built-in tabular task: CSV files checked against the spec's schema, scaled by agreed ranges.

Every column, its type and the label come from the spec's [data] section; a file that does not
fit is refused before anything is trained, with the file, the line and the column named.
Features are scaled to [-1, 1] by the ranges the consortium wrote into the spec, so no
organisation has to publish statistics of its own data for the models to agree on a scale.
"""

from __future__ import annotations

import csv
import difflib
import math
from pathlib import Path

import numpy as np
import torch

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks.base import BaseTask, Dataset
from fedledger.tasks.spec import DataSection, FeatureColumn, TaskSpec

MAX_REPORTED = 5
"""Bad cells listed in one error, at most (the count says how many there are)."""

_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


def _parse_feature(cell: str, column: FeatureColumn) -> float:
    """The cell's value, or ValueError saying what is wrong with it."""
    if cell == "" or cell.lower() in ("nan", "na", "null", "none"):
        raise ValueError("empty" if cell == "" else f"missing ({cell!r})")
    if column.type == "bool":
        if cell.lower() in _TRUE:
            return 1.0
        if cell.lower() in _FALSE:
            return 0.0
        raise ValueError(f"{cell!r} is not a bool (true/false, yes/no, 1/0)")
    try:
        value = float(int(cell)) if column.type == "int" else float(cell)
    except ValueError:
        kind = "an int" if column.type == "int" else "a number"
        raise ValueError(f"{cell!r} is not {kind}") from None
    if not math.isfinite(value):
        raise ValueError(f"{cell!r} is not finite")
    if not column.min <= value <= column.max:
        raise ValueError(f"{cell} is outside the agreed range [{column.min}, {column.max}]")
    return value


def _class_index(cell: str, classes: list[int | str]) -> int:
    """The position of the cell's value in ``classes``, or ValueError saying why it has none."""
    for index, value in enumerate(classes):
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                if int(cell) == value:
                    return index
            except ValueError:
                continue
        elif cell == str(value):
            return index
    hint = ""
    try:
        number = float(cell)
        if math.isfinite(number) and not number.is_integer():
            hint = (
                " (it looks like a regression target, but the spec's task.kind is classification)"
            )
    except ValueError:
        pass
    raise ValueError(f"{cell!r} is not one of the classes {classes}{hint}")


def _header(rows: list[list[str]], path: Path, schema: DataSection) -> list[int]:
    """Each spec column's position in the file's header row; refuse missing, extra and repeated
    columns, suggesting the nearest spec column for a misspelt one."""
    header = [name.strip() for name in rows[0]]
    repeated = sorted({n for n in header if header.count(n) > 1})
    if repeated:
        raise TaskError(ErrorCode.DATA_COLUMNS, f"{path}: repeated columns {repeated}")
    expected = schema.columns
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected]
    if missing or extra:
        problems = []
        for column in extra:
            near = difflib.get_close_matches(column, missing, n=1)
            problems.append(
                f"column {column!r} is not in the spec"
                + (f" (did you mean {near[0]!r}?)" if near else "")
            )
        problems += [f"column {column!r} of the spec is missing" for column in missing]
        raise TaskError(
            ErrorCode.DATA_COLUMNS,
            f"{path}: " + "; ".join(problems),
            missing=missing,
            unexpected=extra,
        )
    return [header.index(c) for c in expected]


def read_table(path: Path, spec: TaskSpec) -> Dataset:
    """Features scaled to [-1, 1] by the spec's ranges (float32) and targets: class indices
    (int64) for classification, values (float32) for regression."""
    schema = spec.data
    if schema is None:
        raise TaskError(ErrorCode.BAD_SPEC, f"task {spec.task.name!r} has no [data] schema")
    rows: list[list[str]] = []
    lines: list[int] = []  # the file line each row starts on (blank lines skipped, but counted)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            last = 0
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(last + 1)
                last = reader.line_num
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(ErrorCode.DATA_FILE, f"cannot read {path}: {exc}") from None
    except csv.Error as exc:
        raise TaskError(ErrorCode.DATA_FILE, f"{path} is not a CSV file: {exc}") from None
    if not rows:
        raise TaskError(ErrorCode.DATA_FILE, f"{path} is empty: expected a header row and data")
    if len(rows) == 1:
        raise TaskError(ErrorCode.DATA_FILE, f"{path} has a header but no rows")
    positions = _header(rows, path, schema)
    features, label = schema.features, schema.label
    x = np.empty((len(rows) - 1, len(features)), dtype=np.float64)
    y: list[float] = []
    value_problems: list[str] = []
    label_problems: list[str] = []
    width = len(rows[0])
    for i, (line, row) in enumerate(zip(lines[1:], rows[1:], strict=True)):
        if len(row) != width:
            value_problems.append(f"line {line} has {len(row)} cells, the header {width}")
            y.append(0.0)
            continue
        cells = [row[p].strip() for p in positions]
        for j, column in enumerate(features):
            try:
                x[i, j] = _parse_feature(cells[j], column)
            except ValueError as exc:
                value_problems.append(f"line {line}, column {column.name!r}: {exc}")
        target = cells[-1]
        try:
            if label.classes is not None:
                y.append(float(_class_index(target, label.classes)))
            else:
                if target == "":
                    raise ValueError("empty")
                try:
                    value = float(target)
                except ValueError:
                    raise ValueError(f"{target!r} is not a number (a regression target)") from None
                if not math.isfinite(value):
                    raise ValueError(f"{target!r} is not finite")
                if label.min is not None and label.max is not None:
                    if not label.min <= value <= label.max:
                        raise ValueError(
                            f"{target} is outside the agreed range [{label.min}, {label.max}]"
                        )
                    value = 2.0 * (value - label.min) / (label.max - label.min) - 1.0
                y.append(value)
        except ValueError as exc:
            label_problems.append(f"line {line}, label {label.name!r}: {exc}")
            y.append(0.0)
    for code, problems in (
        (ErrorCode.DATA_VALUE, value_problems),
        (ErrorCode.DATA_LABEL, label_problems),
    ):
        if problems:
            shown = "; ".join(problems[:MAX_REPORTED])
            more = (
                f" (and {len(problems) - MAX_REPORTED} more)"
                if len(problems) > MAX_REPORTED
                else ""
            )
            raise TaskError(
                code,
                f"{path}: {len(problems)} bad cell(s): {shown}{more}",
                problems=problems[:MAX_REPORTED],
                count=len(problems),
            )
    low = np.array([f.min for f in features])
    high = np.array([f.max for f in features])
    scaled = (2.0 * (x - low) / (high - low) - 1.0).astype(np.float32)
    targets = np.asarray(y)
    if label.classes is not None:
        return torch.from_numpy(scaled), torch.from_numpy(targets.astype(np.int64))
    return torch.from_numpy(scaled), torch.from_numpy(targets.astype(np.float32))


class TabularTask(BaseTask):
    """A CSV file per organisation and one for validation, with the spec's columns; the model is
    the spec's built-in or plug-in one."""

    def load_data(self, source: str) -> Dataset:
        return read_table(Path(source), self.spec)

    def load_validation(self, source: str | None) -> Dataset:
        if source is None:
            raise TaskError(
                ErrorCode.DATA_FILE,
                f"task {self.name!r} has no built-in validation set: give the validation CSV "
                "(--validation FILE)",
            )
        return read_table(Path(source), self.spec)

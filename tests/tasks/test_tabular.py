"""The built-in tabular task: CSV files checked against the spec's schema, scaling and training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks import TabularTask, TaskSpec, parse_spec, read_table

FEATURES = """features = [
  { name = "age", type = "int", min = 0, max = 120 },
  { name = "weight", type = "float", min = 0, max = 300 },
  { name = "smoker", type = "bool", min = 0, max = 1 },
]"""
HEADER = "age,weight,smoker,outcome\n"
GOOD_ROW = "60,150,1,yes\n"


def make_spec(
    *,
    kind: str = "classification",
    label: str = '{ name = "outcome", classes = ["no", "yes"] }',
    features: str = FEATURES,
    training: str = "",
    validation: str = "",
) -> TaskSpec:
    text = (
        f'[task]\nname = "t"\nkind = "{kind}"\n[model]\nbuiltin = "linear"\n'
        f"[training]\n{training}\n[validation]\n{validation}\n"
        f"[data]\nlabel = {label}\n{features}\n"
    )
    return parse_spec(text.encode())


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path, code: ErrorCode, spec: TaskSpec | None = None) -> str:
    """The message of the ``code`` error reading ``path`` raises; it names the file."""
    with pytest.raises(TaskError) as info:
        read_table(path, spec or make_spec())
    assert info.value.code == code, str(info.value)
    message = str(info.value)
    assert str(path) in message
    return message


def test_good_file_is_scaled_by_the_agreed_ranges(tmp_path: Path) -> None:
    rows = "60,150,1,yes\n0,0,0,no\n120,300,true,yes\n30,75,no,no\n"
    x, y = read_table(write(tmp_path, HEADER + rows), make_spec())
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    expected = [[0.0, 0.0, 1.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [-0.5, -0.5, -1.0]]
    assert torch.equal(x, torch.tensor(expected))
    assert y.tolist() == [1, 0, 1, 0]


def test_columns_may_come_in_any_order(tmp_path: Path) -> None:
    spec = make_spec()
    ordered = read_table(write(tmp_path, HEADER + GOOD_ROW + "12,30,0,no\n", "a.csv"), spec)
    shuffled = read_table(
        write(tmp_path, "outcome,smoker,weight,age\nyes,1,150,60\nno,0,30,12\n", "b.csv"), spec
    )
    assert torch.equal(ordered[0], shuffled[0]) and torch.equal(ordered[1], shuffled[1])


def test_class_indices_follow_the_spec_order(tmp_path: Path) -> None:
    spec = make_spec(label='{ name = "outcome", classes = [2, 0, 1] }')
    _, y = read_table(write(tmp_path, HEADER + "1,1,1,0\n1,1,1,1\n1,1,1,2\n"), spec)
    assert y.tolist() == [1, 2, 0]


def test_regression_targets_are_float32(tmp_path: Path) -> None:
    path = write(tmp_path, "age,weight,smoker,price\n60,150,1,2.5\n0,0,0,-4\n")
    _, y = read_table(path, make_spec(kind="regression", label='{ name = "price" }'))
    assert y.dtype == torch.float32 and y.tolist() == [2.5, -4.0]
    ranged = make_spec(kind="regression", label='{ name = "price", min = -4, max = 9 }')
    assert read_table(path, ranged)[1].tolist() == [0.0, -1.0]  # scaled to [-1, 1]


def test_task_loads_data_and_needs_a_validation_file(tmp_path: Path) -> None:
    spec = make_spec()
    path = write(tmp_path, HEADER + GOOD_ROW)
    x, y = TabularTask(spec).load_data(str(path))
    assert x.tolist() == [[0.0, 0.0, 1.0]] and y.tolist() == [1]
    assert torch.equal(TabularTask(spec).load_validation(str(path))[0], x)
    with pytest.raises(TaskError) as info:
        TabularTask(spec).load_validation(None)
    assert info.value.code == ErrorCode.DATA_FILE


@pytest.mark.parametrize(
    ("header", "row", "fragments"),
    [
        ("age,smoker,outcome", "60,1,yes", ["column 'weight' of the spec is missing"]),
        ("age,weight,smoker,height,outcome", "60,150,1,180,yes", ["'height' is not in the spec"]),
        ("age,wieght,smoker,outcome", "60,150,1,yes", ["'wieght'", "did you mean 'weight'?"]),
        ("age,weight,age,smoker,outcome", "60,150,60,1,yes", ["repeated", "'age'"]),
    ],
    ids=["missing", "extra", "misspelt", "repeated"],
)
def test_bad_columns(tmp_path: Path, header: str, row: str, fragments: list[str]) -> None:
    message = refused(write(tmp_path, f"{header}\n{row}\n"), ErrorCode.DATA_COLUMNS)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "is empty"), ("\n\n", "is empty"), (HEADER, "has a header but no rows")],
    ids=["empty", "blank-lines", "header-only"],
)
def test_empty_files(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in refused(write(tmp_path, text), ErrorCode.DATA_FILE)


def test_missing_file(tmp_path: Path) -> None:
    assert "cannot read" in refused(tmp_path / "absent.csv", ErrorCode.DATA_FILE)


@pytest.mark.parametrize(
    ("row", "column", "fragment"),
    [
        (",150,1,yes", "age", "empty"),
        ("60,NaN,1,yes", "weight", "'NaN'"),
        ("60,inf,1,yes", "weight", "not finite"),
        ("60,heavy,1,yes", "weight", "'heavy' is not a number"),
        ("60.5,150,1,yes", "age", "'60.5' is not an int"),
        ("130,150,1,yes", "age", "outside the agreed range"),
        ("60,-0.5,1,yes", "weight", "outside the agreed range"),
        ("60,150,maybe,yes", "smoker", "'maybe' is not a bool"),
    ],
    ids=["empty", "nan", "inf", "not-a-number", "not-an-int", "above-max", "below-min", "bool"],
)
def test_bad_cells_name_line_and_column(
    tmp_path: Path, row: str, column: str, fragment: str
) -> None:
    message = refused(write(tmp_path, HEADER + GOOD_ROW + row + "\n"), ErrorCode.DATA_VALUE)
    assert f"line 3, column '{column}'" in message
    assert fragment in message


def test_row_with_the_wrong_number_of_cells(tmp_path: Path) -> None:
    message = refused(write(tmp_path, HEADER + GOOD_ROW + "60,150,1\n"), ErrorCode.DATA_VALUE)
    assert "line 3 has 3 cells, the header 4" in message


def test_line_numbers_count_blank_lines_of_the_file(tmp_path: Path) -> None:
    """A bad cell is reported at its line in the file, blank lines included."""
    message = refused(
        write(tmp_path, HEADER + "\n" + GOOD_ROW + "60,heavy,1,yes\n"), ErrorCode.DATA_VALUE
    )
    assert "line 4, column 'weight'" in message


def test_label_outside_the_classes(tmp_path: Path) -> None:
    message = refused(write(tmp_path, HEADER + GOOD_ROW + "60,150,1,maybe\n"), ErrorCode.DATA_LABEL)
    assert "line 3, label 'outcome'" in message
    assert "'maybe' is not one of the classes" in message


def test_fractional_label_hints_at_a_regression_target(tmp_path: Path) -> None:
    spec = make_spec(label='{ name = "outcome", classes = [0, 1] }')
    path = write(tmp_path, HEADER + "60,150,1,1\n60,150,1,0.7\n")
    message = refused(path, ErrorCode.DATA_LABEL, spec)
    assert "line 3" in message and "'0.7'" in message
    assert "regression target" in message


@pytest.mark.parametrize(
    ("label", "cell", "fragment"),
    [
        ('{ name = "price" }', "cheap", "'cheap' is not a number"),
        ('{ name = "price" }', "", "empty"),
        ('{ name = "price", min = 0, max = 10 }', "11", "outside the agreed range"),
    ],
    ids=["not-a-number", "empty", "out-of-range"],
)
def test_bad_regression_targets(tmp_path: Path, label: str, cell: str, fragment: str) -> None:
    spec = make_spec(kind="regression", label=label)
    path = write(tmp_path, f"age,weight,smoker,price\n60,150,1,5\n60,150,1,{cell}\n")
    message = refused(path, ErrorCode.DATA_LABEL, spec)
    assert "line 3, label 'price'" in message and fragment in message


def test_many_bad_cells_are_counted_and_five_listed(tmp_path: Path) -> None:
    rows = "".join(f"{200 + k},150,1,yes\n" for k in range(7))
    with pytest.raises(TaskError) as info:
        read_table(write(tmp_path, HEADER + rows), make_spec())
    message = str(info.value)
    assert info.value.code == ErrorCode.DATA_VALUE
    assert "7 bad cell(s)" in message and "(and 2 more)" in message
    assert message.count("line ") == 5
    assert "line 6," in message and "line 7," not in message
    assert info.value.details["count"] == 7 and len(info.value.details["problems"]) == 5


def train_rounds(
    task: TabularTask, data: tuple[torch.Tensor, torch.Tensor], rounds: int
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[float]]:
    """FedAvg with one organisation: ``rounds`` local trainings, each applied to the global model."""
    model = task.build_model(seed=0)
    params = {n: t.clone() for n, t in model.state_dict().items()}
    losses = []
    for r in range(rounds):
        result = task.train(model, params, data, seed=r)
        assert set(result.delta) == set(params) and result.num_samples == len(data[1])
        params = {n: params[n] + result.delta[n] for n in params}
        losses.append(result.loss)
    return model, params, losses


def test_training_a_linear_classifier(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    age = rng.integers(0, 121, 200)
    weight = rng.uniform(0, 300, 200)
    smoker = rng.integers(0, 2, 200)
    positive = age / 120 + weight / 300 > 1.0  # a line in the scaled feature space
    lines = [
        f"{a},{w:.3f},{s},{'yes' if p else 'no'}"
        for a, w, s, p in zip(age, weight, smoker, positive, strict=True)
    ]
    spec = make_spec(
        training="lr = 0.5\nepochs = 5\nbatch_size = 16", validation='report = ["accuracy"]'
    )
    task = TabularTask(spec)
    data = task.load_data(str(write(tmp_path, HEADER + "\n".join(lines) + "\n")))
    model = task.build_model(seed=0)
    before = task.score(model, model.state_dict(), data)
    again = task.train(model, model.state_dict(), data, seed=0)
    first = task.train(model, model.state_dict(), data, seed=0)
    assert all(torch.equal(first.delta[n], again.delta[n]) for n in first.delta)  # reproducible
    model, params, losses = train_rounds(task, data, rounds=4)
    after = task.score(model, params, data)
    assert losses[-1] < losses[0]
    assert after["neg_log_loss"] > before["neg_log_loss"]
    assert after["accuracy"] > 0.9


def test_training_a_linear_regression(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (200, 2))
    y = 2 * x[:, 0] - x[:, 1] + rng.normal(0, 0.05, 200)
    lines = [f"{a:.5f},{b:.5f},{t:.5f}" for (a, b), t in zip(x, y, strict=True)]
    features = 'features = [{ name = "x1", min = -1, max = 1 }, { name = "x2", min = -1, max = 1 }]'
    spec = make_spec(
        kind="regression",
        label='{ name = "y" }',
        features=features,
        training="lr = 0.1\nepochs = 5\nbatch_size = 16",
        validation='report = ["r2"]',
    )
    task = TabularTask(spec)
    data = task.load_data(str(write(tmp_path, "x1,x2,y\n" + "\n".join(lines) + "\n")))
    model = task.build_model(seed=0)
    before = task.score(model, model.state_dict(), data)
    model, params, losses = train_rounds(task, data, rounds=3)
    after = task.score(model, params, data)
    assert set(after) == {"neg_mse", "r2"}
    assert losses[-1] < losses[0]
    assert after["r2"] > 0.9 > before["r2"]
    assert after["neg_mse"] > before["neg_mse"]

"""The built-in digits task: the exact digits-10 split, disjoint partitions, a deterministic model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks import DigitsTask, digits, make_split

SHARED_SPLIT = Path(__file__).resolve().parents[2] / "shared" / "bench" / "digits10_split.json"
# A copy of the consortium's digits-10 benchmark split, so the check runs on every machine.
REFERENCE_SPLIT = Path(__file__).resolve().parent / "data" / "digits10_split.json"


def test_split_is_exactly_the_digits10_benchmark_split() -> None:
    assert make_split(10, 0.5, 0) == json.loads(REFERENCE_SPLIT.read_text())
    if SHARED_SPLIT.exists():  # beside the repo on the team's machines: the copy is current
        assert json.loads(SHARED_SPLIT.read_text()) == json.loads(REFERENCE_SPLIT.read_text())


def test_the_digits_are_sklearns_and_the_stored_holdout_is_the_one_sklearn_draws() -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    ours_x, ours_y = digits._digits()
    assert ours_x.dtype == x.dtype and ours_y.dtype == np.int64
    assert np.array_equal(ours_x, x) and np.array_equal(ours_y, y)
    stored = json.loads(digits.HOLDOUT_FILE.read_text())
    assert (stored["train"], stored["test"]) == digits.sklearn_holdout(stored["seed"])
    train, test = digits._holdout(stored["seed"])
    assert train.tolist() == stored["train"] and test.tolist() == stored["test"]
    other = digits._holdout(stored["seed"] + 1)  # any other seed is drawn by sklearn
    assert (other[0].tolist(), other[1].tolist()) == digits.sklearn_holdout(stored["seed"] + 1)
    assert other[1].tolist() != stored["test"]


@pytest.mark.parametrize(
    ("clients", "alpha", "seed"), [(10, 0.5, 0), (5, 0.5, 0), (3, 0.1, 2), (7, 10.0, 1)]
)
def test_partitions_are_disjoint_and_cover_the_training_part(
    clients: int, alpha: float, seed: int
) -> None:
    split = make_split(clients, alpha, seed)
    parts = [set(p) for p in split["client_indices"]]
    test = set(split["test"])
    union: set[int] = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union)  # disjoint
    assert union.isdisjoint(test)
    assert len(union) + len(test) == 1797  # every digit, once
    assert len(test) == 360


def test_partition_tensors_match_the_split() -> None:
    task = DigitsTask()
    x, y = task.partition(2, 5, alpha=0.5, seed=0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(make_split(5, 0.5, 0)["client_indices"][2]), 64)
    assert y.shape == (x.shape[0],)
    x_val, y_val = task.validation_data()
    assert x_val.shape == (360, 64)
    assert sorted(np.unique(y_val.numpy()).tolist()) == list(range(10))  # stratified


def test_features_are_standardised_on_the_training_part() -> None:
    task = DigitsTask()
    xs = torch.cat([task.partition(k, 4)[0] for k in range(4)])
    informative = xs.std(0) > 0.5
    assert torch.allclose(xs.mean(0), torch.zeros(64), atol=1e-4)
    assert torch.allclose(
        xs.std(0, unbiased=False)[informative], torch.ones(int(informative.sum())), atol=1e-3
    )


def test_a_pixel_constant_in_training_keeps_scale_one_so_log_loss_means_something() -> None:
    """With std + 1e-8, a validation sample with ink on a pixel blank in every training image
    came out ~1e8 and the log-loss ~1e4; a constant pixel keeps scale 1 instead."""
    from fedledger.incentive.utility import evaluate_params

    task = DigitsTask()
    train = torch.cat([task.partition(k, 4)[0] for k in range(4)])
    x_val, y_val = task.validation_data()
    constant = train.std(0) == 0
    assert bool(constant.any())  # the digits split has such pixels (the image border)
    assert float(train[:, constant].abs().max()) == 0.0  # centred, not blown up
    assert float(x_val.abs().max()) < 100.0
    model = task.build_model(seed=0)
    loss = -evaluate_params(model, model.state_dict(), x_val, y_val, "neg_log_loss")
    assert 1.0 < loss < 5.0  # an untrained 10-class model: about log(10) = 2.3


def test_model_is_the_64_32_10_mlp_and_deterministic() -> None:
    task = DigitsTask()
    state = task.build_model(seed=3).state_dict()
    assert {n: tuple(t.shape) for n, t in state.items()} == {
        "0.weight": (32, 64), "0.bias": (32,), "2.weight": (10, 32), "2.bias": (10,),
    }  # fmt: skip
    again = task.build_model(seed=3).state_dict()
    assert all(torch.equal(state[n], again[n]) for n in state)
    other = task.build_model(seed=4).state_dict()
    assert not torch.equal(state["0.weight"], other["0.weight"])


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DigitsTask().build_model(seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_bad_partition_and_unknown_task_are_clear_errors() -> None:
    task = DigitsTask()
    with pytest.raises(ValueError, match="out of range for 3 partitions"):
        task.partition(3, 3)
    with pytest.raises(TaskError, match="expected INDEX/COUNT") as info:
        task.load_data("first/third")
    assert info.value.code == ErrorCode.DATA_FILE
    with pytest.raises(TaskError, match="out of range for 3 partitions"):
        task.load_data("3/3")

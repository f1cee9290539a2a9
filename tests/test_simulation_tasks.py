"""The federation simulator on a loaded task: the breast-cancer example's hospitals, its plug-in
model, its spec's training and metric."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedledger.incentive.utility import evaluate_params
from fedledger.simulation import Data, run_federation, train_fedavg
from fedledger.tasks import ValidatorTask, load_data, load_spec, load_task, load_validation
from fedledger.tasks.base import BaseTask
from fedledger.tasks.spec import PrivacySection
from fedledger.tasks.training import train_local

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "breast_cancer"


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> tuple[ValidatorTask, list[Data], Data]:
    """The example's task, two of its hospitals' data and the coordinator's validation set."""
    folder = tmp_path_factory.mktemp("breast_cancer")
    made = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), str(folder)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    spec = load_spec(EXAMPLE / "spec.toml")
    node, validator = load_task(spec, "node"), load_task(spec, "validator")
    parts = [load_data(node, str(folder / f"{name}.csv")) for name in ("hospital_b", "hospital_c")]
    return validator, parts, load_validation(validator, str(folder / "validation.csv"))


def test_a_loaded_task_is_priced_with_its_own_model_metric_and_validation_set(
    hospitals: tuple[ValidatorTask, list[Data], Data],
) -> None:
    task, parts, validation = hospitals
    federation = run_federation(task=task, parts=parts, validation=validation, rounds=2)
    model = task.build_model(seed=0)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    books = federation.rounds[-1]
    assert {n: tuple(t.shape) for n, t in books.params.items()} == expected
    assert expected["0.weight"] == (32, 30)  # the plug-in's hidden width, 30 measurements in
    # the spec's metric (neg_log_loss), on the validation set given
    x_val, y_val = validation
    assert books.utility == pytest.approx(
        evaluate_params(model, books.params, x_val, y_val, "neg_log_loss")
    )
    assert federation.num_samples == [len(y) for _, y in parts]
    assert 0.5 < federation.accuracy <= 1.0
    assert federation.accuracy == pytest.approx(
        evaluate_params(model, books.params, x_val, y_val, "accuracy")
    )
    assert all(sum(r.rewards) > 0 for r in federation.rounds)


def test_a_loaded_task_trains_by_its_spec_unless_told_otherwise(
    hospitals: tuple[ValidatorTask, list[Data], Data],
) -> None:
    task, parts, validation = hospitals
    spec_config = BaseTask(task.spec).train_config(seed=0)
    assert (spec_config.epochs, spec_config.lr, spec_config.momentum) == (3, 0.1, 0.5)
    default = run_federation(task=task, parts=parts, validation=validation, rounds=1)
    explicit = run_federation(
        task=task, parts=parts, validation=validation, rounds=1, train_config=spec_config
    )
    one_epoch = run_federation(
        task=task,
        parts=parts,
        validation=validation,
        rounds=1,
        train_config=replace(spec_config, epochs=1),
    )
    assert default.rounds[0].values == explicit.rounds[0].values
    assert default.rounds[0].norms == explicit.rounds[0].norms
    assert default.rounds[0].norms != one_epoch.rounds[0].norms


def test_dp_training_on_a_loaded_task_changes_the_updates_and_their_values(
    hospitals: tuple[ValidatorTask, list[Data], Data],
) -> None:
    task, parts, validation = hospitals
    privacy = PrivacySection(noise_multiplier=1.0, max_grad_norm=1.0, epsilon=1e9, delta=1e-5)
    plain = run_federation(task=task, parts=parts, validation=validation, rounds=1)
    private = run_federation(
        task=task, parts=parts, validation=validation, rounds=1, privacy=privacy
    )
    assert private.rounds[0].values != plain.rounds[0].values
    assert private.rounds[0].norms != plain.rounds[0].norms
    assert not all(
        torch.equal(private.rounds[0].params[n], t) for n, t in plain.rounds[0].params.items()
    )
    assert math.isfinite(private.accuracy)


def test_a_loaded_task_needs_the_organisations_data(
    hospitals: tuple[ValidatorTask, list[Data], Data],
) -> None:
    task, _, validation = hospitals
    with pytest.raises(ValueError, match="breast-cancer"):
        run_federation(task=task, validation=validation, rounds=1)


def test_plain_fedavg_retrains_a_loaded_task_with_its_model_and_training(
    hospitals: tuple[ValidatorTask, list[Data], Data],
) -> None:
    """``train_fedavg(task=...)`` is the fairness benchmark's retraining on the tabular task: one
    organisation's round is its local training by the spec's [training], from the task's model."""
    task, parts, _ = hospitals
    config = BaseTask(task.spec).train_config(seed=0)
    model = task.build_model(seed=0)
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x, y = parts[1]
    delta = train_local(model, start, x, y, replace(config, seed=1 * 1_000_003 + 1)).delta
    trained = train_fedavg({1: parts[1]}, 1, task=task)
    assert trained.keys() == start.keys()
    for name in start:
        torch.testing.assert_close(trained[name], start[name] + delta[name])
    one_epoch = train_fedavg({1: parts[1]}, 1, task=task, train_config=replace(config, epochs=1))
    assert not torch.equal(one_epoch["0.weight"], trained["0.weight"])
    # two organisations: weighted by their sample counts
    both = train_fedavg({0: parts[0], 1: parts[1]}, 1, task=task)
    other = train_local(model, start, *parts[0], replace(config, seed=1)).delta
    share = len(parts[0][1]) / (len(parts[0][1]) + len(y))
    for name in start:
        expected = start[name] + share * other[name] + (1 - share) * delta[name]
        torch.testing.assert_close(both[name], expected)

"""Local training: loss goes down, deltas are reproducible, FedProx pulls towards the global model."""

from __future__ import annotations

import pytest
import torch

from fedledger.incentive.tensors import l2_norm
from fedledger.tasks import DigitsTask
from fedledger.tasks.training import TrainConfig, train_local

TASK = DigitsTask()


def _setup() -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    model = TASK.build_model(seed=0)
    x, y = TASK.partition(0, 3, alpha=0.5, seed=0)
    return model, model.state_dict(), x, y


def test_loss_goes_down_over_epochs() -> None:
    model, params, x, y = _setup()
    one = train_local(model, params, x, y, TrainConfig(epochs=1))
    five = train_local(model, params, x, y, TrainConfig(epochs=5))
    assert five.loss < one.loss
    assert one.num_samples == len(y)


def test_same_seed_gives_a_bit_identical_delta_and_another_seed_does_not() -> None:
    model, params, x, y = _setup()
    a = train_local(model, params, x, y, TrainConfig(epochs=2, seed=7))
    b = train_local(model, params, x, y, TrainConfig(epochs=2, seed=7))
    c = train_local(model, params, x, y, TrainConfig(epochs=2, seed=8))
    assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.delta)
    assert any(not torch.equal(a.delta[n], c.delta[n]) for n in a.delta)


def test_delta_matches_the_model_and_leaves_the_global_params_untouched() -> None:
    model, params, x, y = _setup()
    before = {n: t.clone() for n, t in params.items()}
    result = train_local(model, params, x, y, TrainConfig())
    assert {n: t.shape for n, t in result.delta.items()} == {n: t.shape for n, t in params.items()}
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in result.delta.values())
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert l2_norm(result.delta) > 0


def test_fedprox_keeps_the_update_closer_to_the_global_model() -> None:
    model, params, x, y = _setup()
    plain = train_local(model, params, x, y, TrainConfig(epochs=3, prox_mu=0.0))
    prox = train_local(model, params, x, y, TrainConfig(epochs=3, prox_mu=10.0))
    assert l2_norm(prox.delta) < 0.8 * l2_norm(plain.delta)


def test_no_samples_and_bad_settings_are_refused() -> None:
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="no training samples"):
        train_local(model, params, x[:0], y[:0], TrainConfig())
    with pytest.raises(ValueError, match="invalid training configuration"):
        train_local(model, params, x, y, TrainConfig(lr=0))

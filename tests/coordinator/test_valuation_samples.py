"""A round valued by sampling may score its coalitions on a draw of the validation samples: the
values stay within their stated standard errors of those on every sample."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedledger.coordinator.books import (
    Clipping,
    RoundInputs,
    UpdateInput,
    validation_draw,
    value,
)
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.sampling import StratifiedKernelShapley
from fedledger.incentive.shapley import BatchUtility, ShapleyResult

K = 6


def _inputs() -> RoundInputs:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x_val = torch.randn(400, 8)
    y_val = (x_val[:, 0] > 0).long() + (x_val[:, 1] > 0.5).long()
    updates = []
    for k in range(K):  # organisations of different quality: scaled gradient steps and noise
        x = torch.randn(60, 8)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        params = {n: t.clone().requires_grad_() for n, t in base.items()}
        logits = torch.func.functional_call(model, params, (x,))
        loss = nn.functional.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, list(params.values()))
        delta = {
            n: -(0.5 + 0.3 * k) * g + 0.02 * k * torch.randn_like(g)
            for n, g in zip(params, grads, strict=True)
        }
        updates.append(
            UpdateInput(
                organisation=f"0x{k + 1:040x}",
                update_hash="0x" + encode_tensors(delta)[1].hex(),
                num_samples=60,
                delta=delta,
            )
        )
    return RoundInputs(3, model, base, updates, x_val, y_val)


def _values(policy: PricingPolicy) -> tuple[np.ndarray, np.ndarray]:
    inputs = _inputs()
    clipping = Clipping(
        inputs=dict(enumerate(u.delta for u in inputs.updates)), bound=None, clipped=[]
    )
    got = value(inputs, clipping, list(range(K)), policy, device=torch.device("cpu"))
    return np.array(got.values), np.array(got.errors)


def test_a_sampled_round_values_on_a_draw_within_its_stated_error() -> None:
    sampled = PricingPolicy(max_exact_players=2, valuation_budget=64)
    full, full_errors = _values(sampled)
    drawn, drawn_errors = _values(sampled.model_copy(update={"valuation_samples": 100}))
    assert drawn_errors.mean() > 1.3 * full_errors.mean()  # a quarter of the samples
    assert np.all(np.abs(drawn - full) <= 3 * drawn_errors), (drawn, full, drawn_errors)
    assert not np.allclose(drawn, full)  # another set of samples really was scored
    again, _ = _values(sampled.model_copy(update={"valuation_samples": 100}))
    np.testing.assert_array_equal(again, drawn)  # the draw is the round's: the audit's too


def test_the_draw_applies_only_to_rounds_valued_by_sampling() -> None:
    policy = PricingPolicy(max_exact_players=6, valuation_samples=100)
    assert validation_draw(400, 6, policy, seed=3) is None  # exact: every sample
    assert validation_draw(80, 7, policy, seed=3) is None  # fewer samples than the draw
    drawn = validation_draw(400, 7, policy, seed=3)
    assert drawn is not None and len(drawn) == 100 and len(set(drawn.tolist())) == 100
    assert torch.equal(drawn, torch.sort(drawn).values)
    assert not torch.equal(drawn, validation_draw(400, 7, policy, seed=4))


class _Recording:
    """A valuator that keeps what the one it wraps returned."""

    def __init__(self, inner: StratifiedKernelShapley) -> None:
        self.inner = inner
        self.result: ShapleyResult | None = None

    def value(self, utility: BatchUtility, num_players: int, *, seed: int = 0) -> ShapleyResult:
        self.result = self.inner.value(utility, num_players, seed=seed)
        return self.result


def test_a_sampled_value_states_the_estimators_error_beside_the_validation_sets() -> None:
    inputs = _inputs()
    clipping = Clipping(
        inputs=dict(enumerate(u.delta for u in inputs.updates)), bound=None, clipped=[]
    )
    recording = _Recording(StratifiedKernelShapley(max_evaluations=40))
    policy = PricingPolicy(max_exact_players=2)
    got = value(inputs, clipping, list(range(K)), policy, valuator=recording)
    result = recording.result
    assert result is not None and result.errors is not None and np.all(result.errors > 0)
    per_sample = np.asarray(result.values).reshape(K, -1)
    validation = per_sample.std(axis=1, ddof=1) / np.sqrt(per_sample.shape[1])
    np.testing.assert_allclose(got.errors, np.hypot(validation, result.errors), rtol=1e-12)


def test_the_policys_stopping_rule_reaches_the_valuator() -> None:
    sampled = PricingPolicy(max_exact_players=2, valuation_budget=60)
    inputs = _inputs()
    clipping = Clipping(
        inputs=dict(enumerate(u.delta for u in inputs.updates)), bound=None, clipped=[]
    )
    spent = {
        ratio: value(
            inputs,
            clipping,
            list(range(K)),
            sampled.model_copy(update={"valuation_stop_ratio": ratio}),
        ).evaluations
        for ratio in (None, 0.5, 1e-9)
    }
    assert spent[None] == spent[1e-9] == 60
    assert spent[0.5] < 60

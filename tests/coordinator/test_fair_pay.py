"""The payout rule and the noise-aware judgement of a round's books, on their own.

A round pays ``reward_per_gain`` per unit of its measured gain, split pro rata to positive
values, no organisation more than its own value is worth, at most ``reward_per_round`` in all;
a contribution is negative only when it is clearly so (``negative_sigmas`` standard errors).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedledger.coordinator.books import (
    clearly_negative,
    close_books,
    pay,
    round_pool,
)
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.onchain import Flag
from fedledger.incentive.utility import evaluate_params
from fedledger.simulation import first_round
from fedledger.tasks import DigitsTask

POLICY = PricingPolicy(reward_per_gain=10**6, reward_per_round=10**5)


def test_a_round_that_gained_nothing_pays_nothing() -> None:
    values = [0.02, 0.01, -0.03]  # estimates a hair either side of zero
    for gain in (0.0, -0.01):
        assert pay(POLICY, values, [0, 0, 0], gain) == [0, 0, 0]


def test_a_round_pays_its_gain_pro_rata_to_positive_values() -> None:
    rewards = pay(POLICY, [0.03, 0.01, -0.02], [0, 0, 0], gain=0.02)
    assert sum(rewards) == 20_000  # 1e6 per unit x a gain of 0.02
    assert rewards == [15_000, 5_000, 0]


def test_nobody_is_paid_more_than_its_own_value_is_worth() -> None:
    """A gain above the sum of the values (FedAvg's weights did better than the game's) pays
    each organisation its value x the rate, no more."""
    rewards = pay(POLICY, [0.003, 0.001], [0, 0], gain=0.05)
    assert rewards == [3_000, 1_000]


def test_the_round_budget_caps_the_pool_and_a_flag_forfeits() -> None:
    assert sum(pay(POLICY, [0.5, 0.5], [0, 0], gain=1.0)) == POLICY.reward_per_round
    rewards = pay(POLICY, [0.01, 0.01], [0, int(Flag.NORM_CLIPPED)], gain=0.02)
    assert rewards[1] == 0
    assert rewards[0] == 10_000  # only its own value's worth: the forfeited share is not paid


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=12),
    gain=st.floats(-1, 2, allow_nan=False),
    rate=st.integers(0, 10**24),
    cap=st.integers(0, 10**24),
)
def test_payouts_follow_the_rule(values: list[float], gain: float, rate: int, cap: int) -> None:
    policy = PricingPolicy(reward_per_gain=rate, reward_per_round=cap)
    flags = [0] * len(values)
    rewards = pay(policy, values, flags, gain)
    assert sum(rewards) == round_pool(policy, values, flags, gain) <= cap
    assert all(r >= 0 for r in rewards)
    for reward, v in zip(rewards, values, strict=True):
        assert reward <= rate * max(v, 0.0) * (1 + 1e-9) + 1  # units are whole
        assert v > 0 or reward == 0
    if gain <= 0:
        assert sum(rewards) == 0
    else:
        assert sum(rewards) <= rate * gain * (1 + 1e-9) + 1


def test_clearly_negative_means_more_than_negative_sigmas_standard_errors_below_zero() -> None:
    policy = PricingPolicy(negative_sigmas=3.0)
    assert clearly_negative(-0.031, 0.01, policy)
    assert not clearly_negative(-0.029, 0.01, policy)
    assert not clearly_negative(0.01, 0.0, policy)
    assert clearly_negative(-1e-9, 0.0, policy)  # no doubt at all: every sample agrees
    assert not clearly_negative(-0.5, 1.0, PricingPolicy(negative_sigmas=3.0))


def _trained(k: int, num_orgs: int = 5) -> dict[str, torch.Tensor]:
    from fedledger.tasks.training import TrainConfig, train_local

    task = DigitsTask()
    model = task.build_model(seed=0)
    x, y = task.partition(k, num_orgs, alpha=0.5, seed=0)
    config = TrainConfig(epochs=1, lr=0.05, batch_size=32, seed=k)
    return train_local(model, model.state_dict(), x, y, config).delta


def test_the_books_report_each_value_with_its_standard_error_and_flag_only_clear_harm() -> None:
    """Four honest updates and a sign-flipped one: the flip is clearly harmful (flagged, its
    note gives the interval); the honest ones are not, whatever the sign of their estimate;
    every error is the spread of per-sample values over sqrt(n)."""
    deltas = [_trained(k) for k in range(5)]
    deltas[4] = {n: -3.0 * t for n, t in deltas[4].items()}
    inputs = first_round(deltas, [100] * 5)
    books = close_books(inputs, PricingPolicy(), device=torch.device("cpu"))
    assert books.flags[4] & Flag.NEGATIVE_CONTRIBUTION
    assert "±" in books.notes[4] and "standard error" in books.notes[4]
    assert books.values[4] + 3.0 * books.errors[4] < 0
    for k in range(4):
        assert not books.flags[k] & Flag.NEGATIVE_CONTRIBUTION
        assert 0 < books.errors[k] < math.inf
    # A policy that takes every negative estimate as harm flags more, never fewer.
    strict = close_books(inputs, PricingPolicy(negative_sigmas=0.0), device=torch.device("cpu"))
    negative = {k for k in range(5) if books.values[k] < 0}
    assert {k for k in range(5) if strict.flags[k] & Flag.NEGATIVE_CONTRIBUTION} == negative
    # The gain the round paid for is the new model's rise in the metric over the old one.
    metric = PricingPolicy().metric
    before = evaluate_params(inputs.model, inputs.base, inputs.x_val, inputs.y_val, metric)
    after = evaluate_params(inputs.model, books.params, inputs.x_val, inputs.y_val, metric)
    assert books.utility == after and books.gain == pytest.approx(after - before)
    assert books.gain > 0

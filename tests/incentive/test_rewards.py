"""Reward split: exact budget, pro rata to positive scores, deterministic; fixed-point scores."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedledger.incentive.onchain import FIXED_POINT_ONE, from_fixed_point, to_fixed_point
from fedledger.incentive.rewards import split_rewards

budgets = st.integers(min_value=0, max_value=10**27)
scores_lists = st.lists(
    st.one_of(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
        st.floats(min_value=-1e-12, max_value=1e-12, allow_nan=False),
        st.sampled_from([0.0, -0.0, 1.0, 1 / 3, 5e-324]),
    ),
    min_size=0,
    max_size=12,
)


@settings(max_examples=300)
@given(budgets, scores_lists)
def test_sum_is_exactly_the_budget(budget: int, scores: list[float]) -> None:
    amounts = split_rewards(budget, scores)
    assert len(amounts) == len(scores)
    assert all(isinstance(a, int) and a >= 0 for a in amounts)
    if any(s > 0 for s in scores):
        assert sum(amounts) == budget
    else:
        assert amounts == [0] * len(scores)


@settings(max_examples=300)
@given(budgets, scores_lists)
def test_non_positive_scores_get_nothing(budget: int, scores: list[float]) -> None:
    amounts = split_rewards(budget, scores)
    for score, amount in zip(scores, amounts, strict=True):
        if score <= 0:
            assert amount == 0


@settings(max_examples=300)
@given(budgets, scores_lists)
def test_each_amount_is_within_one_unit_of_its_exact_quota(
    budget: int, scores: list[float]
) -> None:
    amounts = split_rewards(budget, scores)
    positive = [max(Fraction(s), Fraction(0)) for s in scores]
    total = sum(positive, Fraction(0))
    if total == 0:
        return
    for weight, amount in zip(positive, amounts, strict=True):
        quota = budget * weight / total
        assert math.floor(quota) <= amount <= math.floor(quota) + 1
        assert abs(amount - quota) < 1


@settings(max_examples=100)
@given(budgets, scores_lists)
def test_deterministic(budget: int, scores: list[float]) -> None:
    assert split_rewards(budget, scores) == split_rewards(budget, list(scores))


def test_hand_computed_split() -> None:
    # Quotas 1000 * (1, 2, 0, 1) / 4 = 250, 500, 0, 250.
    assert split_rewards(1000, [0.5, 1.0, -3.0, 0.5]) == [250, 500, 0, 250]
    # Quotas 10/3 each: floors 3, 3, 3; the one left-over unit goes to the lowest index.
    assert split_rewards(10, [1.0, 1.0, 1.0]) == [4, 3, 3]
    # Largest remainder wins: quotas 7 * (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4 -> 4, 2, 1.
    assert split_rewards(7, [0.5, 0.3, 0.2]) == [4, 2, 1]


def test_all_non_positive_scores_pay_nothing() -> None:
    assert split_rewards(10**18, [0.0, -1.0, -0.0]) == [0, 0, 0]
    assert split_rewards(10**18, []) == []


def test_zero_budget_pays_nothing() -> None:
    assert split_rewards(0, [1.0, 2.0]) == [0, 0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        split_rewards(100, [1.0, bad])


@pytest.mark.parametrize("budget", [-1, 1.5, True])
def test_bad_budget_raises(budget: object) -> None:
    with pytest.raises(ValueError, match="budget"):
        split_rewards(budget, [1.0])


def test_fixed_point_examples() -> None:
    assert to_fixed_point(1.0) == FIXED_POINT_ONE
    assert to_fixed_point(-0.25) == -(FIXED_POINT_ONE // 4)
    assert to_fixed_point(0.0) == 0
    # 0.1 is not exactly representable; the exact product rounds to this integer.
    assert to_fixed_point(0.1) == round(Fraction(0.1) * 10**18) == 100000000000000006
    assert from_fixed_point(FIXED_POINT_ONE // 2) == 0.5
    assert from_fixed_point(-3 * FIXED_POINT_ONE) == -3.0


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_fixed_point_round_trip_of_floats(score: float) -> None:
    back = from_fixed_point(to_fixed_point(score))
    assert abs(back - score) <= 0.51e-18 + 2 * math.ulp(score)


@given(st.integers(min_value=-(2**51), max_value=2**51))
def test_fixed_point_round_trip_of_integers(value: int) -> None:
    assert to_fixed_point(from_fixed_point(value)) == value


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fixed_point_of_non_finite_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        to_fixed_point(bad)

"""Exact Shapley values: the axioms, hand-computed games, and batched utility calls."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedledger.incentive.shapley import (
    BatchUtility,
    ExactShapley,
    ShapleyResult,
    Valuator,
    all_coalitions,
)


def table_game(table: np.ndarray) -> BatchUtility:
    """A game given by U indexed by coalition bitmask."""
    num_players = int(math.log2(table.shape[0]))
    place = 1 << np.arange(num_players)

    def utility(masks: np.ndarray) -> np.ndarray:
        out: np.ndarray = table[(masks.astype(np.int64) * place).sum(axis=1)]
        return out

    return utility


def set_game(fn: Callable[[frozenset[int]], float]) -> BatchUtility:
    def utility(masks: np.ndarray) -> np.ndarray:
        return np.array([fn(frozenset(np.flatnonzero(row).tolist())) for row in masks])

    return utility


def brute_force_shapley(table: np.ndarray, num_players: int) -> np.ndarray:
    """phi_i as the average marginal contribution over all K! orderings (Shapley 1953)."""
    phi = np.zeros(num_players)
    for order in itertools.permutations(range(num_players)):
        mask = 0
        for player in order:
            phi[player] += table[mask | (1 << player)] - table[mask]
            mask |= 1 << player
    return phi / math.factorial(num_players)


random_games = st.integers(min_value=1, max_value=6).flatmap(
    lambda k: st.tuples(
        st.just(k),
        st.lists(
            st.floats(min_value=-100, max_value=100, allow_nan=False),
            min_size=1 << k,
            max_size=1 << k,
        ).map(np.array),
    )
)


def test_all_coalitions_row_index_is_bitmask() -> None:
    masks = all_coalitions(3)
    assert masks.shape == (8, 3)
    assert masks.dtype == np.bool_
    for b in range(8):
        assert masks[b].tolist() == [bool(b & 1), bool(b & 2), bool(b & 4)]


def test_all_coalitions_of_no_players_is_the_empty_coalition() -> None:
    assert all_coalitions(0).shape == (1, 0)


def test_exact_shapley_is_a_valuator() -> None:
    valuator: Valuator = ExactShapley()
    result = valuator.value(set_game(lambda s: float(len(s))), 2)
    assert isinstance(result, ShapleyResult)
    assert result.method == "exact"


def test_square_game_hand_computed() -> None:
    # U(S) = |S|^2 with K = 3: symmetric, so each phi = U(N)/3 = 3.
    result = ExactShapley().value(set_game(lambda s: float(len(s) ** 2)), 3)
    np.testing.assert_allclose(result.values, [3.0, 3.0, 3.0], rtol=0, atol=1e-12)


def test_glove_game_hand_computed() -> None:
    # Player 0 holds a left glove, players 1 and 2 right gloves; a pair is worth 1.
    # Orderings where 0 completes a pair: 0 last or in the middle (4 of 6) -> phi_0 = 2/3;
    # each right-glove holder completes a pair only when right after 0 -> 1/6 each.
    def gloves(s: frozenset[int]) -> float:
        return float(min(int(0 in s), len(s & {1, 2})))

    result = ExactShapley().value(set_game(gloves), 3)
    np.testing.assert_allclose(result.values, [2 / 3, 1 / 6, 1 / 6], rtol=0, atol=1e-12)


def test_asymmetric_three_player_game_hand_computed() -> None:
    # U: {}=0, {0}=1, {1}=2, {2}=3, {0,1}=6, {0,2}=7, {1,2}=8, {0,1,2}=12.
    # phi_0 = 1/3*(1-0) + 1/6*(6-2) + 1/6*(7-3) + 1/3*(12-8) = 1/3 + 2/3 + 2/3 + 4/3 = 3.
    # phi_1 = 1/3*2 + 1/6*(6-1) + 1/6*(8-3) + 1/3*(12-7) = 2/3 + 5/6 + 5/6 + 5/3 = 4.
    # phi_2 = 12 - 3 - 4 = 5.
    table = np.array([0, 1, 2, 6, 3, 7, 8, 12], dtype=np.float64)
    result = ExactShapley().value(table_game(table), 3)
    np.testing.assert_allclose(result.values, [3.0, 4.0, 5.0], rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(random_games)
def test_matches_permutation_definition(game: tuple[int, np.ndarray]) -> None:
    k, table = game
    result = ExactShapley().value(table_game(table), k)
    np.testing.assert_allclose(result.values, brute_force_shapley(table, k), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(random_games)
def test_efficiency(game: tuple[int, np.ndarray]) -> None:
    k, table = game
    values = ExactShapley().value(table_game(table), k).values
    assert values.dtype == np.float64
    assert values.shape == (k,)
    assert math.isclose(values.sum(), table[-1] - table[0], abs_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(random_games, random_games)
def test_additivity(first: tuple[int, np.ndarray], second: tuple[int, np.ndarray]) -> None:
    k = min(first[0], second[0])
    u, v = first[1][: 1 << k], second[1][: 1 << k]
    shapley = ExactShapley()
    phi_u = shapley.value(table_game(u), k).values
    phi_v = shapley.value(table_game(v), k).values
    phi_sum = shapley.value(table_game(u + v), k).values
    np.testing.assert_allclose(phi_sum, phi_u + phi_v, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=2, max_value=6),
    st.data(),
)
def test_symmetry(k: int, data: st.DataObject) -> None:
    # Players 0 and 1 are interchangeable: U(S) depends on S only through |S ∩ {0,1}| and S \ {0,1}.
    base = data.draw(
        st.lists(
            st.floats(min_value=-50, max_value=50, allow_nan=False),
            min_size=3 << (k - 2),
            max_size=3 << (k - 2),
        )
    )

    def utility(masks: np.ndarray) -> np.ndarray:
        pair = masks[:, 0].astype(np.int64) + masks[:, 1].astype(np.int64)
        rest = (masks[:, 2:].astype(np.int64) * (1 << np.arange(k - 2))).sum(axis=1)
        out: np.ndarray = np.asarray(base)[pair * (1 << (k - 2)) + rest]
        return out

    values = ExactShapley().value(utility, k).values
    assert math.isclose(values[0], values[1], abs_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(random_games, st.integers(min_value=0, max_value=5))
def test_null_player_gets_zero(game: tuple[int, np.ndarray], null_at: int) -> None:
    k, table = game
    null = null_at % (k + 1)
    # Insert a player at position `null` who changes nothing: U(S) = table[S without it].
    low = (1 << null) - 1

    def utility(masks: np.ndarray) -> np.ndarray:
        bits = (masks.astype(np.int64) * (1 << np.arange(k + 1))).sum(axis=1)
        without = (bits & low) | ((bits >> (null + 1)) << null)
        out: np.ndarray = table[without]
        return out

    values = ExactShapley().value(utility, k + 1).values
    assert values[null] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(np.delete(values, null), brute_force_shapley(table, k), atol=1e-9)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_evaluations_and_batched_calls(k: int) -> None:
    calls: list[int] = []

    def utility(masks: np.ndarray) -> np.ndarray:
        calls.append(masks.shape[0])
        out: np.ndarray = masks.sum(axis=1).astype(np.float64)
        return out

    result = ExactShapley().value(utility, k)
    assert result.evaluations == 2**k
    assert len(calls) == 1
    assert sum(calls) == 2**k
    np.testing.assert_allclose(result.values, np.ones(k), atol=1e-12)


def test_max_batch_splits_calls_and_keeps_values() -> None:
    calls: list[int] = []
    table = np.random.default_rng(7).normal(size=1 << 8)
    game = table_game(table)

    def counted(masks: np.ndarray) -> np.ndarray:
        calls.append(masks.shape[0])
        out: np.ndarray = game(masks)
        return out

    chunked = ExactShapley(max_batch=100).value(counted, 8)
    whole = ExactShapley().value(game, 8)
    assert calls == [100, 100, 56]
    assert chunked.evaluations == 256
    np.testing.assert_array_equal(chunked.values, whole.values)


def test_no_players_has_no_values_and_no_calls() -> None:
    def utility(masks: np.ndarray) -> np.ndarray:
        raise AssertionError("utility must not be called for an empty game")

    result = ExactShapley().value(utility, 0)
    assert result.values.shape == (0,)
    assert result.evaluations == 0


def test_more_than_twenty_players_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 20 players"):
        ExactShapley().value(lambda m: np.zeros(m.shape[0]), 21)


def test_utility_of_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        ExactShapley().value(lambda m: np.zeros(m.shape[0] + 1), 2)


def test_non_finite_utility_is_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        ExactShapley().value(lambda m: np.full(m.shape[0], np.nan), 2)

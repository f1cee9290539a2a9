"""The stratified kernel estimator states its own Monte Carlo error, and can stop drawing
coalitions once that error is small beside the validation set's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedledger.incentive.sampling import StratifiedKernelShapley
from fedledger.incentive.shapley import ExactShapley

K = 16


def _interacting_game(num_players: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Additive values, pairwise interactions diluted by the coalition's size, and a concave
    term: no part of it is exact for the estimator."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=num_players)
    b = 0.3 * rng.normal(size=(num_players, num_players))

    def utility(masks: np.ndarray) -> np.ndarray:
        x = masks.astype(np.float64)
        size = np.maximum(x.sum(axis=1), 1.0)
        pairs = np.einsum("ci,ij,cj->c", x, b, x) / size
        result: np.ndarray = x @ a + pairs + 2.0 * np.sqrt(np.abs(x @ a))
        return result

    return utility


def _per_sample_game(num_players: int, samples: int, noise: float):  # type: ignore[no-untyped-def]
    """A vector-valued game: the interacting game plus, per validation sample, an additive
    game of player effects drawn with spread ``noise`` (the validation set's luck)."""
    mean_game = _interacting_game(num_players)
    effects = noise * np.random.default_rng(1).normal(size=(num_players, samples))

    def utility(masks: np.ndarray) -> np.ndarray:
        result: np.ndarray = mean_game(masks)[:, None] + masks.astype(np.float64) @ effects
        return result

    return utility


def test_the_stated_error_matches_the_spread_over_seeds() -> None:
    utility = _interacting_game(K)
    estimator = StratifiedKernelShapley(max_evaluations=25 * K)
    results = [estimator.value(utility, K, seed=seed) for seed in range(120)]
    values = np.array([r.values for r in results])
    stated = np.sqrt(np.mean([r.errors**2 for r in results], axis=0))  # type: ignore[operator]
    spread = values.std(axis=0, ddof=1)
    assert 0.75 < np.linalg.norm(stated) / np.linalg.norm(spread) < 1.3
    ratio = stated / spread
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    exact = ExactShapley().value(utility, K).values
    # The errors are worth stating: the estimate misses exact by about them, not by nothing.
    assert np.median(np.abs(values[0] - exact) / results[0].errors) < 3  # type: ignore[operator]
    assert not np.allclose(values[0], exact, atol=1e-6)


def test_an_enumerated_or_exactly_fitted_game_has_no_sampling_error() -> None:
    utility = _interacting_game(8)
    whole = StratifiedKernelShapley(max_evaluations=1 << 8).value(utility, 8, seed=3)
    np.testing.assert_array_equal(whole.errors, np.zeros(8))  # type: ignore[arg-type]
    weights = np.arange(1.0, K + 1)

    def additive_plus_size(masks: np.ndarray) -> np.ndarray:
        x = masks.astype(np.float64)
        result: np.ndarray = x @ weights + np.sin(x.sum(axis=1))
        return result

    result = StratifiedKernelShapley(max_evaluations=6 * K).value(additive_plus_size, K, seed=3)
    # Exact for this game (the size term's gain is shared equally)...
    np.testing.assert_allclose(result.values, weights + math.sin(K) / K, atol=1e-9)
    assert result.errors is not None and np.all(result.errors < 1e-9)  # ...and says so


def test_early_stopping_stops_once_the_estimator_is_small_beside_validation_noise() -> None:
    utility = _per_sample_game(K, samples=200, noise=1.0)
    budget = 60 * K
    full = StratifiedKernelShapley(max_evaluations=budget).value(utility, K, seed=5)
    early = StratifiedKernelShapley(max_evaluations=budget, stop_ratio=0.5).value(
        utility, K, seed=5
    )
    assert early.evaluations < full.evaluations == budget
    assert early.errors is not None and full.errors is not None
    per_sample = np.asarray(early.values)
    validation = per_sample.std(axis=1, ddof=1) / math.sqrt(per_sample.shape[1])
    assert np.linalg.norm(early.errors) <= 0.5 * np.linalg.norm(validation)
    assert np.linalg.norm(early.errors) > np.linalg.norm(full.errors)  # fewer draws, more error
    # Stopped early, the values still agree with the whole budget's within the stated errors.
    gap = np.asarray(early.values).mean(axis=1) - np.asarray(full.values).mean(axis=1)
    assert np.all(np.abs(gap) <= 4 * np.hypot(early.errors, full.errors)), gap


def test_a_rule_never_met_spends_the_whole_budget_and_changes_nothing() -> None:
    utility = _per_sample_game(K, samples=50, noise=1e-6)  # validation noise ~ nothing
    budget = 30 * K
    full = StratifiedKernelShapley(max_evaluations=budget).value(utility, K, seed=2)
    strict = StratifiedKernelShapley(max_evaluations=budget, stop_ratio=0.5).value(
        utility, K, seed=2
    )
    assert strict.evaluations == full.evaluations == budget
    np.testing.assert_array_equal(strict.values, full.values)
    np.testing.assert_array_equal(strict.errors, full.errors)  # type: ignore[arg-type]


def test_a_scalar_game_is_never_stopped_early() -> None:
    """Without per-sample values there is no validation error to compare with."""
    utility = _interacting_game(K)
    result = StratifiedKernelShapley(max_evaluations=30 * K, stop_ratio=100.0).value(
        utility, K, seed=1
    )
    assert result.evaluations == 30 * K


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"stop_ratio": 0.0}, "stop_ratio must be > 0"), ({"waves": 0}, "waves must be >= 1")],
)
def test_an_impossible_stopping_rule_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StratifiedKernelShapley(**kwargs)  # type: ignore[arg-type]

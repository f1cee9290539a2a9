"""Sampled Shapley valuators: the axioms on games with known values, budgets, batching, a real round."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedledger.incentive.sampling import (
    GTGShapley,
    StratifiedKernelShapley,
    TMCShapley,
    choose_valuator,
    default_evaluations,
)
from fedledger.incentive.shapley import BatchUtility, ExactShapley, ShapleyResult, Valuator
from fedledger.incentive.utility import CoalitionUtility
from fedledger.tasks import DigitsTask
from fedledger.tasks.training import TrainConfig, train_local

Game = Callable[[np.ndarray], np.ndarray]


class Recorder:
    """A utility that counts its calls and every coalition passed to it."""

    def __init__(self, game: Game) -> None:
        self.game = game
        self.calls: list[int] = []
        self.seen: list[bytes] = []

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        assert masks.dtype == np.bool_ and masks.ndim == 2
        self.calls.append(masks.shape[0])
        self.seen.extend(row.tobytes() for row in masks)
        out: np.ndarray = self.game(masks)
        return out

    @property
    def rows(self) -> int:
        return len(self.seen)

    @property
    def distinct(self) -> int:
        return len(set(self.seen))


def additive(weights: np.ndarray) -> Game:
    """U(S) = sum_{i in S} w_i: phi = w."""

    def game(masks: np.ndarray) -> np.ndarray:
        out: np.ndarray = masks.astype(np.float64) @ weights
        return out

    return game


def by_size(fn: Callable[[np.ndarray], np.ndarray]) -> Game:
    """U(S) = fn(|S|): every player is symmetric, phi_i = (U(N) - U(empty)) / K."""

    def game(masks: np.ndarray) -> np.ndarray:
        out: np.ndarray = fn(masks.sum(axis=1).astype(np.float64))
        return out

    return game


def gloves(masks: np.ndarray) -> np.ndarray:
    """Player 0 holds the only left glove, players 1..K-1 a right glove each; a pair is worth 1.

    Player 0 completes a pair unless it comes first: phi_0 = (K-1)/K; a right glove completes
    one only when player 0 and no other right glove come before it, that is when player 0
    leads and it comes second: phi_j = 1/(K(K-1)) for j >= 1.
    """
    out: np.ndarray = np.minimum(masks[:, 0], masks[:, 1:].sum(axis=1)).astype(np.float64)
    return out


def glove_values(num_players: int) -> np.ndarray:
    k = num_players
    return np.array([(k - 1) / k] + [1 / (k * (k - 1))] * (k - 1))


def apex(masks: np.ndarray) -> np.ndarray:
    """The apex game: player 0 wins with any other player; all the others win without it.

    Player 0 is pivotal anywhere but first or last: phi_0 = (K-2)/K. Player j >= 1 is pivotal
    right after a leading player 0, or last of the others when player 0 comes last:
    phi_j = 2/(K(K-1)).
    """
    small = masks[:, 1:].sum(axis=1)
    out: np.ndarray = ((masks[:, 0] & (small >= 1)) | (small == masks.shape[1] - 1)).astype(
        np.float64
    )
    return out


def apex_values(num_players: int) -> np.ndarray:
    k = num_players
    return np.array([(k - 2) / k] + [2 / (k * (k - 1))] * (k - 1))


def with_null_player(game: Game) -> Game:
    """``game`` on players 0..K-2; player K-1 changes nothing."""

    def extended(masks: np.ndarray) -> np.ndarray:
        return game(masks[:, :-1])

    return extended


def table(values: np.ndarray) -> Game:
    """The game whose utility is ``values`` indexed by coalition bitmask."""
    num_players = int(math.log2(values.shape[0]))
    place = np.int64(1) << np.arange(num_players, dtype=np.int64)

    def game(masks: np.ndarray) -> np.ndarray:
        out: np.ndarray = values[(masks.astype(np.int64) * place).sum(axis=1)]
        return out

    return game


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, ties ranked by their mean rank."""

    def ranks(x: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
        out: np.ndarray = mean_rank[inverse]
        return out

    ra, rb = ranks(a) - ranks(a).mean(), ranks(b) - ranks(b).mean()
    return float(ra @ rb / math.sqrt((ra @ ra) * (rb @ rb)))


# Sampling valuators with truncation switched off: exact on additive games, efficient.
UNTRUNCATED: dict[str, Valuator] = {
    "tmc": TMCShapley(num_permutations=60, tolerance=0.0),
    "gtg": GTGShapley(between_tolerance=0.0, within_tolerance=0.0, max_permutations=60),
    "kernel": StratifiedKernelShapley(max_evaluations=200),
}
# Budgets generous enough for 0.05-accurate values on the glove and apex games of 10 players.
ACCURATE: dict[str, Valuator] = {
    "tmc": TMCShapley(num_permutations=400, tolerance=0.0),
    "gtg": GTGShapley(
        between_tolerance=0.0,
        within_tolerance=0.0,
        convergence_tolerance=0.0,
        max_permutations=400,
    ),
    "kernel": StratifiedKernelShapley(max_evaluations=400),
}
ALL: dict[str, Valuator] = {
    "tmc": TMCShapley(),
    "gtg": GTGShapley(),
    "kernel": StratifiedKernelShapley(max_evaluations=200),
}


def each(valuators: dict[str, Valuator]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("valuator", list(valuators.values()), ids=list(valuators))


weights_st = st.integers(min_value=0, max_value=12).flatmap(
    lambda k: st.lists(
        st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=k, max_size=k
    ).map(lambda w: np.array(w, dtype=np.float64))
)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
random_tables = st.integers(min_value=1, max_value=7).flatmap(
    lambda k: st.lists(
        st.floats(min_value=-100, max_value=100, allow_nan=False),
        min_size=1 << k,
        max_size=1 << k,
    ).map(lambda v: np.array(v, dtype=np.float64))
)


# ---------------------------------------------------------------------- the Shapley axioms


@each(UNTRUNCATED)
@settings(max_examples=40, deadline=None)
@given(weights=weights_st, seed=seeds)
def test_additive_games_are_valued_exactly(
    valuator: Valuator, weights: np.ndarray, seed: int
) -> None:
    result = valuator.value(additive(weights), weights.shape[0], seed=seed)
    assert isinstance(result, ShapleyResult)
    assert result.values.dtype == np.float64 and result.values.shape == weights.shape
    np.testing.assert_allclose(result.values, weights, rtol=0, atol=1e-9)


@each(UNTRUNCATED)
@settings(max_examples=40, deadline=None)
@given(values=random_tables, seed=seeds)
def test_efficiency_without_truncation(valuator: Valuator, values: np.ndarray, seed: int) -> None:
    num_players = int(math.log2(values.shape[0]))
    result = valuator.value(table(values), num_players, seed=seed)
    assert float(np.sum(result.values)) == pytest.approx(values[-1] - values[0], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(values=random_tables, seed=seeds)
def test_truncated_tmc_is_efficient_within_its_tolerance(values: np.ndarray, seed: int) -> None:
    num_players = int(math.log2(values.shape[0]))
    valuator = TMCShapley(num_permutations=20, tolerance=0.2)
    result = valuator.value(table(values), num_players, seed=seed)
    gap = abs(float(np.sum(result.values)) - (values[-1] - values[0]))
    assert gap <= 0.2 * abs(values[-1] - values[0]) + 1e-9


@settings(max_examples=40, deadline=None)
@given(values=random_tables, seed=seeds)
def test_truncated_gtg_is_efficient_within_its_tolerance(values: np.ndarray, seed: int) -> None:
    num_players = int(math.log2(values.shape[0]))
    valuator = GTGShapley(between_tolerance=0.0, within_tolerance=0.3, max_permutations=20)
    result = valuator.value(table(values), num_players, seed=seed)
    gap = abs(float(np.sum(result.values)) - (values[-1] - values[0]))
    assert gap <= 0.3 * abs(values[-1] - values[0]) + 1e-9


@settings(max_examples=40, deadline=None)
@given(
    weights=weights_st.filter(lambda w: w.shape[0] >= 1),
    curve=st.lists(st.floats(min_value=-5, max_value=5, allow_nan=False), min_size=13, max_size=13),
    seed=seeds,
)
def test_kernel_is_exact_on_additive_plus_size_games(
    weights: np.ndarray, curve: list[float], seed: int
) -> None:
    # U(S) = sum_{i in S} w_i + g(|S|): phi_i = w_i + (g(K) - g(0)) / K.
    g = np.array(curve)
    num_players = weights.shape[0]

    def game(masks: np.ndarray) -> np.ndarray:
        out: np.ndarray = additive(weights)(masks) + g[masks.sum(axis=1)]
        return out

    budget = max(2 * num_players + 2, 60)
    result = StratifiedKernelShapley(max_evaluations=budget).value(game, num_players, seed=seed)
    expected = weights + (g[num_players] - g[0]) / num_players
    np.testing.assert_allclose(result.values, expected, rtol=0, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    num_players=st.integers(min_value=2, max_value=10),
    extra=st.integers(min_value=0, max_value=80),
    game_seed=seeds,
    seed=seeds,
)
def test_unadjusted_kernel_is_exact_on_pairwise_games(
    num_players: int, extra: int, game_seed: int, seed: int
) -> None:
    # Paired sampling: each coalition comes with its complement, which cancels pairwise
    # interactions from the regression (Covert & Lee 2021); the size intercepts take g(|S|).
    rng = np.random.default_rng(game_seed)
    linear = rng.normal(size=num_players)
    pairwise = np.triu(rng.normal(size=(num_players, num_players)), 1)
    curve = rng.normal(size=num_players + 1)

    def game(masks: np.ndarray) -> np.ndarray:
        x = masks.astype(np.float64)
        out: np.ndarray = x @ linear + np.einsum("ci,ij,cj->c", x, pairwise, x)
        out += curve[masks.sum(axis=1)]
        return out

    budget = min(2 * num_players + 2, 1 << num_players) + extra
    valuator = StratifiedKernelShapley(max_evaluations=budget, adjust=False)
    result = valuator.value(game, num_players, seed=seed)
    exact = ExactShapley().value(game, num_players).values
    np.testing.assert_allclose(result.values, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("adjust", [True, False])
def test_kernel_gives_symmetric_players_equal_values(adjust: bool) -> None:
    game = by_size(lambda s: np.sqrt(s) + np.sin(3 * s))
    result = StratifiedKernelShapley(max_evaluations=60, adjust=adjust).value(game, 12, seed=3)
    expected = (math.sqrt(12) + math.sin(36)) / 12
    np.testing.assert_allclose(result.values, expected, rtol=0, atol=1e-12)


@each(ACCURATE)
@pytest.mark.parametrize(
    ("game", "known"), [(gloves, glove_values), (apex, apex_values)], ids=["gloves", "apex"]
)
def test_known_games_within_sampling_error(
    valuator: Valuator, game: Game, known: Callable[[int], np.ndarray]
) -> None:
    result = valuator.value(game, 10, seed=7)
    np.testing.assert_allclose(result.values, known(10), rtol=0, atol=0.05)
    # Players 1..9 are symmetric: sampled values that agree to within the sampling error.
    assert np.ptp(result.values[1:]) <= 0.05


@pytest.mark.parametrize("valuator", [TMCShapley(num_permutations=50), GTGShapley()])
@pytest.mark.parametrize("game", [gloves, apex], ids=["gloves", "apex"])
def test_permutation_samplers_give_a_null_player_exactly_zero(
    valuator: Valuator, game: Game
) -> None:
    # Every marginal of a null player is 0, truncated or not.
    result = valuator.value(with_null_player(game), 9, seed=1)
    assert result.values[-1] == 0.0
    assert np.any(result.values[:-1] != 0.0)


@pytest.mark.parametrize("game", [gloves, apex], ids=["gloves", "apex"])
def test_kernel_gives_a_null_player_about_zero(game: Game) -> None:
    result = StratifiedKernelShapley(max_evaluations=300).value(with_null_player(game), 10, seed=1)
    assert abs(result.values[-1]) <= 0.03
    assert result.values[0] > 0.5


# ------------------------------------------------------------------------ 0 and 1 players


@each(ALL)
def test_no_players_cost_nothing(valuator: Valuator) -> None:
    utility = Recorder(additive(np.zeros(0)))
    result = valuator.value(utility, 0, seed=0)
    assert result.values.shape == (0,) and result.evaluations == 0
    assert utility.calls == []


@pytest.mark.parametrize(
    "valuator",
    [*ALL.values(), GTGShapley(between_tolerance=0.0)],
    ids=[*ALL, "gtg-untruncated"],
)
def test_one_player_gets_its_exact_value(valuator: Valuator) -> None:
    utility = Recorder(lambda masks: 0.25 + 0.5 * masks[:, 0].astype(np.float64))
    result = valuator.value(utility, 1, seed=0)
    np.testing.assert_array_equal(result.values, [0.5])
    assert result.evaluations == 2 and utility.calls == [2]


def test_gtg_between_round_truncation_applies_to_one_player() -> None:
    utility = Recorder(lambda masks: 0.5 + 0.001 * masks[:, 0].astype(np.float64))
    result = GTGShapley(between_tolerance=0.01).value(utility, 1)
    np.testing.assert_array_equal(result.values, [0.0])


@each(ALL)
def test_negative_player_counts_are_refused(valuator: Valuator) -> None:
    with pytest.raises(ValueError, match="num_players must be >= 0"):
        valuator.value(additive(np.zeros(0)), -1)


# ------------------------------------------------------------------ budgets and batching


@each(ALL)
@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_same_seed_same_values(valuator: Valuator, seed: int) -> None:
    first = valuator.value(table(_federated_table()), 10, seed=seed)
    second = valuator.value(table(_federated_table()), 10, seed=seed)
    np.testing.assert_array_equal(first.values, second.values)
    assert first.evaluations == second.evaluations


@each(ALL)
def test_different_seeds_sample_differently(valuator: Valuator) -> None:
    results = [valuator.value(table(_federated_table()), 10, seed=s).values for s in range(4)]
    assert any(not np.array_equal(results[0], other) for other in results[1:])


def _federated_table() -> np.ndarray:
    """A fixed, non-additive 10-player game: accuracy-like scores of averaged 'updates'."""
    rng = np.random.default_rng(2024)
    quality = rng.normal(size=10)
    bitmasks = np.arange(1 << 10)
    members = (bitmasks[:, None] >> np.arange(10)) & 1
    sizes = np.maximum(members.sum(axis=1), 1)
    signal = members @ quality / sizes + 0.3 * np.log1p(members.sum(axis=1))
    out: np.ndarray = np.round(1 / (1 + np.exp(-signal)), 3)
    return out


@pytest.mark.parametrize(
    "valuator",
    [
        TMCShapley(num_permutations=None, max_evaluations=102),
        TMCShapley(num_permutations=7),
        GTGShapley(max_evaluations=102),
        GTGShapley(),
        StratifiedKernelShapley(max_evaluations=102),
    ],
    ids=["tmc-102", "tmc-7-perms", "gtg-102", "gtg", "kernel-102"],
)
def test_evaluations_are_the_distinct_coalitions_passed(valuator: Valuator) -> None:
    utility = Recorder(table(_federated_table()))
    result = valuator.value(utility, 10, seed=5)
    assert result.evaluations == utility.distinct == utility.rows  # never a coalition twice
    budget = getattr(valuator, "max_evaluations", None)
    if budget is not None:
        assert budget - 10 <= result.evaluations <= budget  # the budget is spent, not overrun


@pytest.mark.parametrize(
    "make",
    [
        lambda b: TMCShapley(num_permutations=None, max_evaluations=b),
        lambda b: GTGShapley(max_evaluations=b, between_tolerance=0.0),
        lambda b: StratifiedKernelShapley(max_evaluations=b),
    ],
    ids=["tmc", "gtg", "kernel"],
)
@settings(max_examples=25, deadline=None)
@given(num_players=st.integers(min_value=2, max_value=9), budget=st.integers(2, 300), seed=seeds)
def test_max_evaluations_is_never_exceeded(
    make: Callable[[int], Valuator], num_players: int, budget: int, seed: int
) -> None:
    valuator = make(budget)
    utility = Recorder(table(np.random.default_rng(seed).normal(size=1 << num_players)))
    if isinstance(valuator, StratifiedKernelShapley) and budget < min(
        1 << num_players, 2 * num_players + 2
    ):
        with pytest.raises(ValueError, match="needs at least"):
            valuator.value(utility, num_players, seed=seed)
        return
    # What always completes a permutation: TMC walks one at a time once the budget is short
    # (K - 1 coalitions and U(empty), U(N)); GTG walks a round of K at once.
    enough = num_players + 1 if isinstance(valuator, TMCShapley) else 2 + num_players**2
    if not isinstance(valuator, StratifiedKernelShapley) and budget < enough:
        # It may not complete one permutation: then it refuses instead of answering zeros.
        try:
            result = valuator.value(utility, num_players, seed=seed)
        except ValueError as exc:
            assert "cannot complete one permutation" in str(exc)
            return
    else:
        result = valuator.value(utility, num_players, seed=seed)
    assert result.evaluations == utility.distinct == utility.rows
    assert result.evaluations <= min(budget, 1 << num_players)
    assert np.all(np.isfinite(result.values))


@pytest.mark.parametrize(
    "valuator",
    [
        TMCShapley(num_permutations=100, tolerance=0.0),
        GTGShapley(max_permutations=100),
        StratifiedKernelShapley(max_evaluations=400),
    ],
    ids=["tmc", "gtg", "kernel"],
)
def test_utilities_are_evaluated_in_batches(valuator: Valuator) -> None:
    utility = Recorder(table(_federated_table()))
    result = valuator.value(utility, 10, seed=0)
    assert result.evaluations >= 200
    assert len(utility.calls) * 10 <= result.evaluations
    if isinstance(valuator, StratifiedKernelShapley):
        assert utility.calls == [result.evaluations]  # the whole design in one call


@each(
    {
        "tmc": TMCShapley(num_permutations=50, max_batch=16),
        "gtg": GTGShapley(max_batch=16),
        "kernel": StratifiedKernelShapley(max_evaluations=200, max_batch=16),
    }
)
def test_max_batch_bounds_every_call(valuator: Valuator) -> None:
    utility = Recorder(table(_federated_table()))
    valuator.value(utility, 10, seed=0)
    assert max(utility.calls) <= 16 and len(utility.calls) > 5


# -------------------------------------------------------------------------------- truncation


def test_gtg_between_round_truncation_returns_zeros_for_two_evaluations() -> None:
    # The round moved the utility by 0.005 < 0.01: not worth valuing.
    utility = Recorder(lambda masks: 0.7 + 0.0005 * masks.sum(axis=1))
    result = GTGShapley(between_tolerance=0.01).value(utility, 10, seed=0)
    np.testing.assert_array_equal(result.values, np.zeros(10))
    assert result.evaluations == 2 and utility.calls == [2]


def test_gtg_values_a_round_that_moved_more_than_the_threshold() -> None:
    utility = Recorder(lambda masks: 0.7 + 0.002 * masks.sum(axis=1))
    result = GTGShapley(between_tolerance=0.01).value(utility, 10, seed=0)
    np.testing.assert_allclose(result.values, np.full(10, 0.002), atol=1e-12)
    assert result.evaluations > 2


def saturating(masks: np.ndarray) -> np.ndarray:
    """Any three players reach the full utility: U(S) = min(|S|, 3) / 3."""
    out: np.ndarray = np.minimum(masks.sum(axis=1), 3) / 3.0
    return out


@pytest.mark.parametrize(
    ("truncated", "untruncated"),
    [
        (
            TMCShapley(num_permutations=40, tolerance=0.01, lookahead=1),
            TMCShapley(num_permutations=40, tolerance=0.0, lookahead=1),
        ),
        (
            GTGShapley(within_tolerance=0.001, max_permutations=40, lookahead=1),
            GTGShapley(within_tolerance=0.0, max_permutations=40, lookahead=1),
        ),
    ],
    ids=["tmc", "gtg"],
)
def test_within_round_truncation_saves_evaluations(
    truncated: Valuator, untruncated: Valuator
) -> None:
    cut = truncated.value(saturating, 12, seed=0)
    full = untruncated.value(saturating, 12, seed=0)
    # Truncated permutations stop after 3 players: coalitions of at most 3 of 12.
    assert cut.evaluations <= 2 + 12 + 66 + 220 < full.evaluations
    np.testing.assert_allclose(cut.values, full.values, atol=1e-12)
    np.testing.assert_allclose(cut.values.sum(), 1.0, atol=1e-12)


def test_truncation_waits_for_the_stage_to_be_evaluated() -> None:
    # With a lookahead of 4, the prefixes of 1..4 players are evaluated together; truncation
    # after 3 makes the fourth unnecessary, yet it was evaluated and is counted.
    utility = Recorder(saturating)
    result = TMCShapley(num_permutations=1, tolerance=0.01, lookahead=4).value(utility, 12)
    assert utility.calls == [2, 4] and result.evaluations == 6


# ------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TMCShapley(num_permutations=None), "needs a budget"),
        (lambda: TMCShapley(num_permutations=0), "num_permutations must be >= 1"),
        (lambda: TMCShapley(max_evaluations=1), "max_evaluations must be >= 2"),
        (lambda: TMCShapley(tolerance=-0.1), "tolerance must be a finite number >= 0"),
        (lambda: TMCShapley(tolerance=math.nan), "tolerance must be a finite number >= 0"),
        (lambda: TMCShapley(block_size=0), "block_size must be >= 1"),
        (lambda: TMCShapley(lookahead=0), "lookahead must be >= 1"),
        (lambda: TMCShapley(max_batch=0), "max_batch must be >= 1"),
        (lambda: GTGShapley(between_tolerance=-1), "between_tolerance must be"),
        (lambda: GTGShapley(within_tolerance=math.inf), "within_tolerance must be"),
        (lambda: GTGShapley(convergence_tolerance=-1), "convergence_tolerance must be"),
        (lambda: GTGShapley(min_permutations=0), "min_permutations must be >= 1"),
        (lambda: GTGShapley(window=0), "window must be >= 1"),
        (lambda: GTGShapley(max_permutations=0), "max_permutations must be >= 1"),
        (lambda: GTGShapley(max_evaluations=1), "max_evaluations must be >= 2"),
        (lambda: GTGShapley(max_permutations=None), "needs a cap"),
        (lambda: GTGShapley(lookahead=0), "lookahead must be >= 1"),
        (lambda: GTGShapley(max_batch=0), "max_batch must be >= 1"),
        (lambda: StratifiedKernelShapley(max_evaluations=0), "max_evaluations must be >= 1"),
        (lambda: StratifiedKernelShapley(max_batch=0), "max_batch must be >= 1"),
    ],
)
def test_bad_parameters_are_refused(make: Callable[[], Valuator], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_kernel_refuses_a_budget_below_its_design() -> None:
    with pytest.raises(ValueError, match=r"needs at least 22 evaluations for 10 players"):
        StratifiedKernelShapley(max_evaluations=21).value(gloves, 10)


def test_kernel_with_the_whole_game_in_budget_is_exact() -> None:
    values = np.random.default_rng(0).normal(size=1 << 8)
    exact = ExactShapley().value(table(values), 8).values
    result = StratifiedKernelShapley(max_evaluations=256).value(table(values), 8, seed=4)
    assert result.evaluations == 256
    np.testing.assert_allclose(result.values, exact, rtol=0, atol=1e-9)


def test_bad_utilities_are_refused() -> None:
    with pytest.raises(ValueError, match="utility returned shape"):
        StratifiedKernelShapley().value(lambda masks: np.zeros(3), 4)
    with pytest.raises(ValueError, match="non-finite"):
        TMCShapley().value(lambda masks: np.full(masks.shape[0], np.nan), 4)


def test_choose_valuator_is_exact_up_to_max_exact() -> None:
    assert isinstance(choose_valuator(10, max_exact=10), ExactShapley)
    chosen = choose_valuator(11, max_exact=10)
    assert isinstance(chosen, StratifiedKernelShapley)
    assert chosen.max_evaluations == default_evaluations(11) == 440
    assert choose_valuator(50, max_exact=10, max_evaluations=500) == StratifiedKernelShapley(500)
    assert default_evaluations(3) == 8  # never more than the whole game
    with pytest.raises(ValueError, match="too small for 50 players"):
        choose_valuator(50, max_exact=10, max_evaluations=101)
    with pytest.raises(ValueError, match="max_exact must be >= 0"):
        choose_valuator(5, max_exact=-1)


# ------------------------------------------------------------- a real federated round


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread: two threads on a shared two-core machine run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_round(one_thread: None) -> tuple[CoalitionUtility, np.ndarray]:
    """Eight organisations' updates after three local epochs from a shared model, and exact values."""
    task = DigitsTask()
    model = task.build_model(seed=0)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    config = TrainConfig(epochs=3, lr=0.05, batch_size=32)
    deltas = []
    # Subnormals slow CPU training several fold; the flag is process-wide, so it is put back.
    torch.set_flush_denormal(True)
    try:
        for k in range(8):
            x, y = task.partition(k, 8, alpha=0.5, seed=0)
            seeded = replace(config, seed=k)
            deltas.append(train_local(model, base, x, y, seeded, device=torch.device("cpu")).delta)
    finally:
        torch.set_flush_denormal(False)
    x_val, y_val = task.validation_data()
    utility = CoalitionUtility(
        model, base, deltas, [1] * 8, x_val, y_val, device=torch.device("cpu")
    )
    exact = ExactShapley().value(utility, 8).values
    return utility, exact


@pytest.mark.parametrize(
    "valuator",
    [
        TMCShapley(num_permutations=None, max_evaluations=100),
        GTGShapley(max_evaluations=100),
        StratifiedKernelShapley(max_evaluations=60),
    ],
    ids=["tmc", "gtg", "kernel"],
)
def test_a_seed_reproduces_a_real_round_bit_for_bit(
    digits_round: tuple[CoalitionUtility, np.ndarray], valuator: Valuator
) -> None:
    utility, _ = digits_round
    first, second = (valuator.value(utility, 8, seed=11) for _ in range(2))
    assert first.values.tobytes() == second.values.tobytes()
    assert first.evaluations == second.evaluations


DIGITS_VALUATORS: dict[str, tuple[Valuator, int]] = {
    "tmc-128": (TMCShapley(num_permutations=None, max_evaluations=128), 128),
    "gtg-128": (GTGShapley(max_evaluations=128), 128),
    "kernel-64": (StratifiedKernelShapley(max_evaluations=64), 64),
}


@pytest.fixture(scope="module")
def digits_accuracy(
    digits_round: tuple[CoalitionUtility, np.ndarray],
) -> dict[str, tuple[float, float]]:
    """Each of ``DIGITS_VALUATORS``' mean Spearman and mean max abs error against exact."""
    utility, exact = digits_round
    return {
        name: _accuracy(valuator, utility, exact, budget=budget)
        for name, (valuator, budget) in DIGITS_VALUATORS.items()
    }


def _accuracy(
    valuator: Valuator, utility: BatchUtility, exact: np.ndarray, *, budget: int
) -> tuple[float, float]:
    """Mean Spearman and mean max abs error against ``exact`` over seeds 0..4."""
    rhos, errors = [], []
    for seed in range(5):
        result = valuator.value(utility, exact.shape[0], seed=seed)
        assert result.evaluations <= budget
        rhos.append(spearman(result.values, exact))
        errors.append(float(np.max(np.abs(result.values - exact))))
    return float(np.mean(rhos)), float(np.mean(errors))


@pytest.mark.parametrize(
    ("name", "min_rho", "max_error"),
    [("tmc-128", 0.85, 0.06), ("gtg-128", 0.85, 0.04), ("kernel-64", 0.9, 0.02)],
)
def test_sampled_values_track_exact_on_a_digits_round(
    digits_accuracy: dict[str, tuple[float, float]], name: str, min_rho: float, max_error: float
) -> None:
    # Exact values span about 0.15 of accuracy with several near-ties (a few validation
    # samples apart), so even good estimates swap some ranks.
    rho, error = digits_accuracy[name]
    assert rho >= min_rho
    assert error <= max_error


def test_kernel_beats_permutation_sampling_with_half_the_evaluations(
    digits_accuracy: dict[str, tuple[float, float]],
) -> None:
    _, kernel_error = digits_accuracy["kernel-64"]
    assert kernel_error < digits_accuracy["tmc-128"][1]
    assert kernel_error < digits_accuracy["gtg-128"][1]


# ------------------------------------------------------- truncation relative to the gain


def _late_round(masks: np.ndarray) -> np.ndarray:
    """A late round: utility level 2.0 (nats, say), a gain of 0.004 shared 1:2:1 additively."""
    return 2.0 + masks.astype(np.float64) @ np.array([0.001, 0.002, 0.001])


@pytest.mark.parametrize(
    "valuator",
    [TMCShapley(num_permutations=50, tolerance=0.01), GTGShapley(within_tolerance=0.01)],
    ids=["tmc", "gtg"],
)
def test_truncation_is_relative_to_the_rounds_gain_not_its_utility(valuator: Valuator) -> None:
    """Truncating at 1% of |U(N)| = 0.02 would cut every permutation at its start (the whole
    gain, 0.004, is below it) and value everyone 0; at 1% of the gain it values them."""
    result = valuator.value(_late_round, 3, seed=0)
    np.testing.assert_allclose(result.values, [0.001, 0.002, 0.001], atol=1e-12)


@pytest.mark.parametrize(
    "valuator",
    [TMCShapley(num_permutations=None, max_evaluations=3), GTGShapley(max_evaluations=3)],
    ids=["tmc", "gtg"],
)
def test_a_budget_that_completes_no_permutation_is_refused(valuator: Valuator) -> None:
    with pytest.raises(ValueError, match="cannot complete one permutation of 5 players"):
        valuator.value(_late_round_five, 5, seed=0)


def _late_round_five(masks: np.ndarray) -> np.ndarray:
    return 2.0 + masks.astype(np.float64).sum(axis=1) * 1e-3

"""Pure Shapley valuation of players in a cooperative game given by a batched coalition utility."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

BatchUtility = Callable[[np.ndarray], np.ndarray]
"""Maps a bool array of coalition masks shaped (C, K) to float64 utilities shaped (C,), or
(C, m) for a vector-valued game (m games at once, e.g. one per validation sample), which the
valuators that are linear in the utilities (exact, stratified kernel) value column by column."""

MAX_EXACT_PLAYERS = 20
"""The largest game ``ExactShapley`` enumerates (2**20 coalitions)."""


@dataclass(frozen=True)
class ShapleyResult:
    """Per-player Shapley values, how many coalition utilities they cost, and how they were found.

    ``errors`` is a sampled valuator's own standard error of each value, the Monte Carlo error
    of drawing coalitions rather than enumerating them (of the mean over the columns, for a
    vector-valued game); None where the valuator states none, 0 where it enumerated.
    """

    values: np.ndarray  # float64, shape (K,), or (K, m) for a vector-valued game
    evaluations: int
    method: str
    errors: np.ndarray | None = None  # float64, shape (K,)


class Valuator(Protocol):
    """Anything that prices players of a game from its batched utility."""

    def value(self, utility: BatchUtility, num_players: int, *, seed: int = 0) -> ShapleyResult:
        """The Shapley values of players 0..num_players-1 under ``utility``."""
        ...


def all_coalitions(num_players: int) -> np.ndarray:
    """Every coalition as a bool mask, shape (2**K, K); row b holds player k iff bit k of b is set."""
    if num_players < 0:
        raise ValueError(f"num_players must be >= 0, got {num_players}")
    if num_players > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"{num_players} players means 2**{num_players} coalitions; "
            f"enumeration is limited to {MAX_EXACT_PLAYERS} players"
        )
    bitmasks = np.arange(1 << num_players, dtype=np.int64)
    players = np.arange(num_players, dtype=np.int64)
    masks: np.ndarray = ((bitmasks[:, None] >> players[None, :]) & 1).astype(bool)
    return masks


def _shapley_weights(num_players: int) -> np.ndarray:
    """w[s] = s! (K - s - 1)! / K! for s = 0..K-1, each exact before the final rounding to float64."""
    k_fact = math.factorial(num_players)
    return np.array(
        [
            math.factorial(s) * math.factorial(num_players - s - 1) / k_fact
            for s in range(num_players)
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class ExactShapley:
    """Shapley values by full enumeration of the 2**K coalitions (K <= 20).

    ``max_batch`` bounds how many coalitions go into one utility call; the default puts every
    game of up to 16 players into a single call.
    """

    max_batch: int = 1 << 16

    def value(self, utility: BatchUtility, num_players: int, *, seed: int = 0) -> ShapleyResult:
        """phi_i = sum_{S ⊆ N \\ {i}} |S|! (K - |S| - 1)! / K! (U(S | {i}) - U(S)).

        Shapley (1953), "A value for n-person games", eq. for phi_i; the enumeration is
        deterministic, so ``seed`` is accepted for the ``Valuator`` interface and ignored.
        A game with no players has no values and costs no evaluations.
        """
        del seed
        if num_players > MAX_EXACT_PLAYERS:
            raise ValueError(
                f"exact Shapley with {num_players} players needs 2**{num_players} coalition "
                f"utilities; at most {MAX_EXACT_PLAYERS} players are supported, use a "
                "sampling valuator for more"
            )
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        masks = all_coalitions(num_players)
        if num_players == 0:
            return ShapleyResult(
                values=np.zeros(0, dtype=np.float64), evaluations=0, method="exact"
            )
        utilities = _evaluate(utility, masks, self.max_batch)
        values = shapley_from_utilities(utilities, num_players)
        return ShapleyResult(values=values, evaluations=int(masks.shape[0]), method="exact")


def _evaluate(utility: BatchUtility, masks: np.ndarray, max_batch: int) -> np.ndarray:
    """U(S) for every row of ``masks``, in calls of at most ``max_batch`` coalitions."""
    parts: list[np.ndarray] = []
    for start in range(0, masks.shape[0], max_batch):
        chunk = masks[start : start + max_batch]
        out = np.asarray(utility(chunk), dtype=np.float64)
        if out.ndim not in (1, 2) or out.shape[0] != chunk.shape[0]:
            raise ValueError(
                f"utility returned shape {out.shape} for {chunk.shape[0]} coalitions; "
                f"expected ({chunk.shape[0]},) or ({chunk.shape[0]}, m)"
            )
        if not np.all(np.isfinite(out)):
            raise ValueError("utility returned a non-finite value")
        parts.append(out)
    return np.concatenate(parts)


def shapley_from_utilities(utilities: np.ndarray, num_players: int) -> np.ndarray:
    """Shapley values from U indexed by coalition bitmask (length 2**K), as float64 (K,);
    from utilities shaped (2**K, m), the values of each column's game, shaped (K, m)."""
    size = 1 << num_players
    if utilities.ndim not in (1, 2) or utilities.shape[0] != size:
        raise ValueError(
            f"expected {size} utilities for {num_players} players, got {utilities.shape}"
        )
    bitmasks = np.arange(size, dtype=np.int64)
    sizes = np.zeros(size, dtype=np.int64)
    for k in range(num_players):
        sizes += (bitmasks >> k) & 1
    weights = _shapley_weights(num_players)
    values = np.empty((num_players, *utilities.shape[1:]), dtype=np.float64)
    for i in range(num_players):
        bit = np.int64(1) << i
        without_i = bitmasks[(bitmasks & bit) == 0]
        marginal = utilities[without_i | bit] - utilities[without_i]
        weight = weights[sizes[without_i]].reshape(-1, *([1] * (utilities.ndim - 1)))
        # np.sum uses pairwise summation: deterministic for a given input, unlike BLAS dot.
        values[i] = np.sum(weight * marginal, axis=0)
    return values

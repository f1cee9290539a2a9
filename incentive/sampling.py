"""Sampled Shapley valuation for games too large to enumerate, every utility evaluated in batches.

Three ``Valuator``s that spend a budget of coalition utilities instead of all 2**K of them:

- ``TMCShapley``: truncated permutation Monte Carlo (Ghorbani & Zou 2019);
- ``GTGShapley``: guided, truncated permutation sampling for federated rounds (Liu et al. 2022);
- ``StratifiedKernelShapley``: a constrained regression on coalitions stratified by size and
  paired with their complements, with a regression adjustment; the most accurate per
  evaluation of the three on federated rounds (``bench/shapley.py``).

None of them calls the utility once per coalition: coalitions are generated in blocks,
deduplicated by bitmask against everything already evaluated, and the new ones evaluated in
one call. ``ShapleyResult.evaluations`` counts the distinct coalitions passed to the utility,
speculative ones that truncation then made unnecessary included.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fedledger.incentive.shapley import BatchUtility, ExactShapley, ShapleyResult, Valuator

__all__ = [
    "GTGShapley",
    "StratifiedKernelShapley",
    "TMCShapley",
    "choose_valuator",
    "default_evaluations",
]

_MAX_BATCH = 1 << 16


def _check_num_players(num_players: int) -> None:
    if num_players < 0:
        raise ValueError(f"num_players must be >= 0, got {num_players}")


def _check_max_batch(max_batch: int) -> None:
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")


class _Coalitions:
    """Coalition utilities evaluated so far, keyed by the coalition's packed bitmask.

    ``evaluate`` passes each coalition to the utility at most once, the new ones of a request
    in as few calls as ``max_batch`` allows. Only a valuator that is linear in the utilities
    sets ``vector``: the others decide what to evaluate next from scalar utilities.
    """

    def __init__(self, utility: BatchUtility, max_batch: int, *, vector: bool = False) -> None:
        self._utility = utility
        self._max_batch = max_batch
        self._vector = vector
        self._values: dict[bytes, np.ndarray] = {}

    @property
    def evaluations(self) -> int:
        """How many distinct coalitions have been passed to the utility."""
        return len(self._values)

    def keys(self, masks: np.ndarray) -> list[bytes]:
        """The bitmask key of each row of ``masks`` (bool, shape (C, K))."""
        packed = np.packbits(masks, axis=1, bitorder="little")
        return [row.tobytes() for row in packed]

    def new_keys(self, keys: list[bytes]) -> set[bytes]:
        """The distinct keys among ``keys`` not evaluated yet."""
        return {key for key in keys if key not in self._values}

    def evaluate(self, masks: np.ndarray) -> np.ndarray:
        """U(S) for every row of ``masks``, evaluating only coalitions not seen before."""
        keys = self.keys(masks)
        rows: list[int] = []
        pending: set[bytes] = set()
        for row, key in enumerate(keys):
            if key not in self._values and key not in pending:
                pending.add(key)
                rows.append(row)
        for start in range(0, len(rows), self._max_batch):
            chunk = rows[start : start + self._max_batch]
            out = np.asarray(self._utility(masks[chunk]), dtype=np.float64)
            if out.shape[:1] != (len(chunk),) or out.ndim not in ((1, 2) if self._vector else (1,)):
                expected = f"({len(chunk)},)" + (f" or ({len(chunk)}, m)" if self._vector else "")
                raise ValueError(
                    f"utility returned shape {out.shape} for {len(chunk)} coalitions; "
                    f"expected {expected}"
                    + ("" if self._vector else " (this valuator prices scalar games only)")
                )
            if not np.all(np.isfinite(out)):
                raise ValueError("utility returned a non-finite value")
            for row, value in zip(chunk, out, strict=True):
                self._values[keys[row]] = value
        if not keys:
            return np.zeros((0,), dtype=np.float64)
        return np.stack([self._values[key] for key in keys]).astype(np.float64, copy=False)


def _empty_and_full(coalitions: _Coalitions, num_players: int) -> tuple[float, float]:
    """U(empty) and U(N), in one call."""
    masks = np.zeros((2, num_players), dtype=bool)
    masks[1] = True
    v_empty, v_full = coalitions.evaluate(masks)
    return float(v_empty), float(v_full)


@dataclass
class _Walk:
    """Marginal contributions along a block of permutations; rows not ``complete`` are void."""

    marginals: np.ndarray  # float64 (P, K): marginals[p, i] is i's contribution in permutation p
    complete: np.ndarray  # bool (P,)


def _walk_permutations(
    coalitions: _Coalitions,
    perms: np.ndarray,
    v_empty: float,
    v_full: float,
    *,
    threshold: float,
    lookahead: int,
    max_evaluations: int | None,
) -> _Walk:
    """Marginal contributions along each row of ``perms`` (int, shape (P, K)), truncated.

    Once |U(N) - U(prefix)| < ``threshold``, the permutation's remaining marginals are 0.
    All permutations advance together, ``lookahead`` prefixes at a time: the prefixes of a
    stage are evaluated in one call before the truncation test runs over them, so a stage
    may evaluate up to ``lookahead - 1`` prefixes per permutation that truncation then
    discards (they are counted). A permutation that would take the evaluations past
    ``max_evaluations`` is abandoned (not ``complete``); the others go on.
    """
    count, num_players = perms.shape
    position = np.argsort(perms, axis=1)  # position[p, i]: where player i stands in p
    marginals = np.zeros((count, num_players), dtype=np.float64)
    value = np.full(count, v_empty, dtype=np.float64)
    alive = np.ones(count, dtype=bool)
    truncated = np.zeros(count, dtype=bool)
    size = 0  # every live, untruncated permutation has walked its first ``size`` players
    while size < num_players:
        truncated |= alive & (np.abs(v_full - value) < threshold)
        walking = np.flatnonzero(alive & ~truncated)
        if walking.size == 0:
            break
        stop = min(size + lookahead, num_players)
        sizes = np.arange(size + 1, min(stop, num_players - 1) + 1)
        stage: np.ndarray = np.zeros((count, 0), dtype=np.float64)
        if sizes.size:
            # masks[p, t] holds the first sizes[t] players of permutation walking[p].
            masks = position[walking, None, :] < sizes[None, :, None]
            if max_evaluations is not None:
                walking = _admit(coalitions, walking, masks, max_evaluations, alive)
                masks = position[walking, None, :] < sizes[None, :, None]
            flat = masks.reshape(-1, num_players)
            stage = np.zeros((count, sizes.size), dtype=np.float64)
            if walking.size:
                stage[walking] = coalitions.evaluate(flat).reshape(walking.size, sizes.size)
        for step in range(size + 1, stop + 1):
            going = np.flatnonzero(alive & ~truncated)
            if step == num_players:
                new = np.full(going.size, v_full, dtype=np.float64)
            else:
                new = stage[going, step - size - 1]
            marginals[going, perms[going, step - 1]] = new - value[going]
            value[going] = new
            if step < num_players:
                truncated[going] |= np.abs(v_full - new) < threshold
        size = stop
    return _Walk(marginals=marginals, complete=alive)


def _admit(
    coalitions: _Coalitions,
    walking: np.ndarray,
    masks: np.ndarray,
    max_evaluations: int,
    alive: np.ndarray,
) -> np.ndarray:
    """The permutations whose stage fits the budget, in order; the rest are marked dead."""
    spare = max_evaluations - coalitions.evaluations
    admitted: list[int] = []
    planned: set[bytes] = set()
    for index, perm in enumerate(walking.tolist()):
        new = coalitions.new_keys(coalitions.keys(masks[index])) - planned
        if len(new) <= spare - len(planned):
            planned |= new
            admitted.append(perm)
        else:
            alive[perm] = False
    return np.array(admitted, dtype=np.int64)


def _one_player(
    coalitions: _Coalitions, v_empty: float, v_full: float, method: str
) -> ShapleyResult:
    return ShapleyResult(
        values=np.array([v_full - v_empty], dtype=np.float64),
        evaluations=coalitions.evaluations,
        method=method,
    )


def _no_permutation(max_evaluations: int | None, num_players: int) -> ValueError:
    return ValueError(
        f"max_evaluations={max_evaluations} cannot complete one permutation of {num_players} "
        "players: the values would be zeros, not estimates; raise the budget"
    )


def _no_players(method: str) -> ShapleyResult:
    return ShapleyResult(values=np.zeros(0, dtype=np.float64), evaluations=0, method=method)


@dataclass(frozen=True)
class TMCShapley:
    """Truncated Monte Carlo Shapley: the average marginal contribution over random permutations.

    Ghorbani & Zou (2019), "Data Shapley: Equitable Valuation of Data for Machine Learning",
    Algorithm 1: phi_i = E_pi[U(P_i^pi | {i}) - U(P_i^pi)] over uniform permutations pi, with
    P_i^pi the players before i. A permutation is truncated once its prefix is within
    ``tolerance`` x |U(N) - U(empty)| of U(N): the marginals after that point count as 0.
    Relative to the round's gain, not to U(N) (the paper's rule, for accuracies of a model
    trained from scratch): a late round's gain is a small part of its utility, and truncating
    at a share of the utility would zero every value. Every complete permutation's marginals
    sum to U(prefix) - U(empty), so the values satisfy efficiency within ``tolerance`` x
    |U(N) - U(empty)|, exactly with ``tolerance=0``. A budget that cannot complete a single
    permutation is refused (ValueError), never answered with zeros.

    The budget is ``num_permutations`` permutations, ``max_evaluations`` distinct coalition
    utilities, or whichever runs out first (with only ``max_evaluations``, sampling also stops
    after a block that needed no new coalition). Permutations are drawn ``block_size`` at a
    time and walked ``lookahead`` prefixes per utility call (default: a quarter of the
    players); a permutation that would overrun ``max_evaluations`` is dropped, so the values
    average only complete permutations.
    """

    num_permutations: int | None = 100
    max_evaluations: int | None = None
    tolerance: float = 0.01
    block_size: int = 32
    lookahead: int | None = None
    max_batch: int = _MAX_BATCH

    def __post_init__(self) -> None:
        if self.num_permutations is None and self.max_evaluations is None:
            raise ValueError("TMCShapley needs a budget: num_permutations or max_evaluations")
        if self.num_permutations is not None and self.num_permutations < 1:
            raise ValueError(f"num_permutations must be >= 1, got {self.num_permutations}")
        if self.max_evaluations is not None and self.max_evaluations < 2:
            raise ValueError(
                f"max_evaluations must be >= 2 (U(empty) and U(N)), got {self.max_evaluations}"
            )
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.lookahead is not None and self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        _check_max_batch(self.max_batch)

    def value(self, utility: BatchUtility, num_players: int, *, seed: int = 0) -> ShapleyResult:
        """The Shapley values of players 0..num_players-1, from permutations drawn with ``seed``.

        One player gets its exact value U({0}) - U(empty); no players cost nothing.
        """
        _check_num_players(num_players)
        if num_players == 0:
            return _no_players("tmc")
        rng = np.random.default_rng(seed)
        coalitions = _Coalitions(utility, self.max_batch)
        v_empty, v_full = _empty_and_full(coalitions, num_players)
        if num_players == 1:
            return _one_player(coalitions, v_empty, v_full, "tmc")
        threshold = self.tolerance * abs(v_full - v_empty)
        lookahead = self.lookahead or max(1, math.ceil(num_players / 4))
        budget = self.max_evaluations
        wanted = self.num_permutations
        total = np.zeros(num_players, dtype=np.float64)
        done = 0
        cost = float(num_players - 1)  # new coalitions per permutation, updated as we go
        while wanted is None or done < wanted:
            block = self.block_size if wanted is None else min(self.block_size, wanted - done)
            if budget is not None:
                spare = budget - coalitions.evaluations
                if spare <= 0:
                    break
                # No more than the spare budget can finish: the first block's cost, K - 1, is
                # what a permutation takes at most, so with K + 1 evaluations one completes.
                block = max(1, min(block, math.floor(spare / max(cost, 1.0))))
            before = coalitions.evaluations
            perms = np.argsort(rng.random((block, num_players)), axis=1)
            walk = _walk_permutations(
                coalitions,
                perms,
                v_empty,
                v_full,
                threshold=threshold,
                lookahead=lookahead,
                max_evaluations=budget,
            )
            kept = int(walk.complete.sum())
            # np.sum: pairwise summation, deterministic for a given block.
            total += np.sum(walk.marginals[walk.complete], axis=0)
            done += kept
            spent = coalitions.evaluations - before
            cost = 0.5 * cost + 0.5 * spent / block
            if kept < block:
                break  # the budget ran out inside this block
            if wanted is None and spent == 0:
                break  # nothing left to spend the budget on
        if not done:
            raise _no_permutation(self.max_evaluations, num_players)
        return ShapleyResult(values=total / done, evaluations=coalitions.evaluations, method="tmc")


@dataclass(frozen=True)
class GTGShapley:
    """GTG-Shapley: guided, truncated permutation sampling of a federated round's game.

    Liu et al. (2022), "GTG-Shapley: Efficient and Accurate Participant Contribution
    Evaluation in Federated Learning", ACM Transactions on Intelligent Systems and Technology
    (arXiv:2109.02053), Algorithm 1:

    - between-round truncation: if |U(N) - U(empty)| < ``between_tolerance`` the round
      changed too little to be worth valuing, and every value is 0 (2 evaluations); off by
      default here (0): what a small gain is worth is for the payout rule to say, and zeros
      for a round that did gain something are wrong values, not cheap ones;
    - within-round truncation: once |U(N) - U(prefix)| < ``within_tolerance`` x
      |U(N) - U(empty)|, the permutation's remaining marginals count as 0 (relative to the
      round's gain, as ``TMCShapley`` truncates; the paper's is absolute);
    - guided sampling: permutations come in rounds of K, player k first in the k-th and the
      others in random order, so each player's first-position marginal U({k}) - U(empty)
      (the largest, usually) is sampled in every round;
    - convergence: after at least ``min_permutations`` (default max(30, K)), sampling stops
      at the end of a round once each of the last ``window`` running averages is within
      ``convergence_tolerance`` of the latest, as the mean over players of
      |phi_t,i - phi_last,i| / (|phi_last,i| + 1e-12).

    The other defaults (at least max(30, K) permutations; a window of 10 and 5%) follow the
    GTG-Shapley implementation in github.com/cyyever/distributed_learning_simulator.
    ``max_permutations`` and ``max_evaluations`` cap the work; a permutation that would
    overrun ``max_evaluations`` is dropped, and a budget that completes none is refused
    (ValueError). The values average the complete permutations
    with each first player's permutations weighted equally, which is the plain average
    whenever every round is complete. Under ``max_evaluations`` rounds are walked one at a
    time, ``lookahead`` prefixes per utility call (default: a quarter of the players).
    """

    between_tolerance: float = 0.0
    within_tolerance: float = 0.001
    convergence_tolerance: float = 0.05
    min_permutations: int | None = None
    window: int = 10
    max_permutations: int | None = 2000
    max_evaluations: int | None = None
    lookahead: int | None = None
    max_batch: int = _MAX_BATCH

    def __post_init__(self) -> None:
        for name in ("between_tolerance", "within_tolerance", "convergence_tolerance"):
            tolerance = getattr(self, name)
            if not (tolerance >= 0 and math.isfinite(tolerance)):
                raise ValueError(f"{name} must be a finite number >= 0, got {tolerance}")
        if self.min_permutations is not None and self.min_permutations < 1:
            raise ValueError(f"min_permutations must be >= 1, got {self.min_permutations}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.max_permutations is not None and self.max_permutations < 1:
            raise ValueError(f"max_permutations must be >= 1, got {self.max_permutations}")
        if self.max_evaluations is not None and self.max_evaluations < 2:
            raise ValueError(
                f"max_evaluations must be >= 2 (U(empty) and U(N)), got {self.max_evaluations}"
            )
        if self.max_permutations is None and self.max_evaluations is None:
            raise ValueError("GTGShapley needs a cap: max_permutations or max_evaluations")
        if self.lookahead is not None and self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        _check_max_batch(self.max_batch)

    def value(self, utility: BatchUtility, num_players: int, *, seed: int = 0) -> ShapleyResult:
        """The Shapley values of players 0..num_players-1, from permutations drawn with ``seed``.

        After between-round truncation, one player gets its exact value U({0}) - U(empty).
        """
        _check_num_players(num_players)
        if num_players == 0:
            return _no_players("gtg")
        rng = np.random.default_rng(seed)
        coalitions = _Coalitions(utility, self.max_batch)
        v_empty, v_full = _empty_and_full(coalitions, num_players)
        if abs(v_full - v_empty) < self.between_tolerance:
            return ShapleyResult(
                values=np.zeros(num_players, dtype=np.float64),
                evaluations=coalitions.evaluations,
                method="gtg",
            )
        if num_players == 1:
            return _one_player(coalitions, v_empty, v_full, "gtg")
        lookahead = self.lookahead or max(1, math.ceil(num_players / 4))
        min_perms = self.min_permutations or max(30, num_players)
        rounds_first = max(1, math.ceil((min_perms + 1) / num_players))
        records: list[np.ndarray] = []  # marginals of complete permutations, in order
        firsts: list[int] = []
        # Under an evaluation budget, one round at a time: a round cut short wastes less.
        rounds = 1 if self.max_evaluations is not None else rounds_first
        while True:
            if self.max_permutations is not None:
                left = self.max_permutations - len(records)
                rounds = min(rounds, math.ceil(left / num_players))
                if rounds <= 0:
                    break
            spent_before = coalitions.evaluations
            perms = _guided_permutations(rng, num_players, rounds)
            if self.max_permutations is not None:
                perms = perms[: self.max_permutations - len(records)]
            walk = _walk_permutations(
                coalitions,
                perms,
                v_empty,
                v_full,
                threshold=self.within_tolerance * abs(v_full - v_empty),
                lookahead=lookahead,
                max_evaluations=self.max_evaluations,
            )
            records.extend(walk.marginals[walk.complete])
            firsts.extend(perms[walk.complete, 0].tolist())
            if not walk.complete.all() or self._converged(records, min_perms):
                break
            if self.max_permutations is None and coalitions.evaluations == spent_before:
                break  # nothing left to spend the budget on
            rounds = 1
        if not records:
            raise _no_permutation(self.max_evaluations, num_players)
        values = _stratified_mean(records, firsts, num_players)
        return ShapleyResult(values=values, evaluations=coalitions.evaluations, method="gtg")

    def _converged(self, records: list[np.ndarray], min_perms: int) -> bool:
        """The authors' stopping rule on the running averages of the last ``window`` permutations."""
        if len(records) <= min_perms or len(records) < self.window:
            return False
        stacked = np.array(records)
        running = np.cumsum(stacked, axis=0) / np.arange(1, len(records) + 1)[:, None]
        last = running[-1]
        recent = running[-self.window :]
        errors = np.mean(np.abs(recent - last) / (np.abs(last) + 1e-12), axis=1)
        return bool(np.max(errors) <= self.convergence_tolerance)


def _guided_permutations(rng: np.random.Generator, num_players: int, rounds: int) -> np.ndarray:
    """``rounds`` x K permutations; the k-th of each round starts with player k."""
    perms = np.empty((rounds * num_players, num_players), dtype=np.int64)
    others = np.arange(num_players)
    for r in range(rounds):
        for k in range(num_players):
            rest = np.delete(others, k)
            perms[r * num_players + k, 0] = k
            perms[r * num_players + k, 1:] = rest[rng.permutation(num_players - 1)]
    return perms


def _stratified_mean(records: list[np.ndarray], firsts: list[int], num_players: int) -> np.ndarray:
    """The mean of the first-player strata's mean marginals (the plain mean if a stratum is empty)."""
    if not records:
        return np.zeros(num_players, dtype=np.float64)
    stacked = np.array(records)
    first = np.array(firsts)
    if len(set(firsts)) < num_players:
        mean: np.ndarray = np.sum(stacked, axis=0) / stacked.shape[0]
        return mean
    strata = [np.sum(stacked[first == k], axis=0) / np.sum(first == k) for k in range(num_players)]
    result: np.ndarray = np.sum(np.array(strata), axis=0) / num_players
    return result


def min_kernel_evaluations(num_players: int) -> int:
    """The fewest utility evaluations ``StratifiedKernelShapley`` values ``num_players`` with:
    U(empty), U(N) and every coalition of 1 and of K - 1 players (all 2**K when fewer)."""
    if num_players <= 2:
        return 1 << num_players
    return 2 * num_players + 2


@dataclass(frozen=True)
class StratifiedKernelShapley:
    """Kernel SHAP on coalitions stratified by size and paired, with a regression adjustment.

    **Identity.** Grouping Shapley's (1953) sum by coalition size s gives
    phi_i = (U(N) - U(empty)) / K + (1/K) sum_{s=1}^{K-1} d_{i,s}, where
    d_{i,s} = E[U(S) | |S| = s, i in S] - E[U(S) | |S| = s, i not in S] (the size strata of
    Kolpaczki et al. 2024, "Approximating the Shapley Value without Marginal Contributions").
    Within one size, the least-squares slope of U on membership is b_{i,s} = (K-1)/K d_{i,s}
    when the b sum to 0, and the Shapley kernel of Lundberg & Lee (2017), "A Unified Approach
    to Interpreting Model Predictions", (K-1) / (C(K,s) s (K-s)), makes every size's share
    of the normal equations the same. So the constrained weighted least squares

        min sum_S w(S) (U(S) - c_{|S|} - sum_{i in S} phi_i)^2  s.t.  sum_i phi_i = U(N) - U(empty)

    with one intercept c_s per size is exactly Shapley when every size is enumerated: the
    intercepts take out whatever depends on the coalition's size alone, a large part of a
    federated game (a bigger average of updates scores differently whoever is in it).

    **Sampling.** U(empty), U(N) and the 2K coalitions of sizes 1 and K-1 are always
    evaluated; the rest of the budget goes to coalitions of sizes 2..K-2, each drawn with its
    complement (paired sampling, Covert & Lee 2021, "Improving KernelSHAP: Practical Shapley
    Value Estimation via Linear Regression"; without the adjustment below, it makes the
    estimate exact for games with at most pairwise interactions), without repetition, with
    pairs per size in proportion to the size's kernel mass 1/(s(K-s)); a size the budget
    covers is enumerated. Each size's rows weigh its kernel mass divided by its row count.

    **Regression adjustment** (``adjust``, Witter, Liu & Musco 2025, "Regression-adjusted Monte
    Carlo Estimators for Shapley Values and Probabilistic Values": phi(U) = phi(f) + an
    estimate of phi(U - f) for a surrogate f whose values are known exactly). The surrogate
    has per-size slopes b_{i,s} = beta_i + gamma_i / s, fitted to the same rows: in FedAvg a
    member's weight in the coalition model is 1/|S|, so to first order its effect on the
    utility scales with 1/s, while the constant term keeps additive games exact. Its
    Shapley values are beta + gamma H_{K-1} / (K-1) (H the harmonic number); the estimator
    above then prices only the residual U - f.

    The result is exact for additive games plus any function of coalition size, satisfies
    efficiency exactly and gives symmetric players of a size-only game equal values; it is
    consistent, not unbiased.

    **Standard error.** ``ShapleyResult.errors`` is the estimator's own Monte Carlo standard
    error, to first order (the sandwich, or robust, variance of a regression): the estimate
    moves with sum_S w(S) x_S e_S, the weighted membership rows times the fit's residuals, and
    the pairs of each sampled size are drawn uniformly without repetition, so that sum's
    variance is estimated from the spread of its pair terms within each size (with the finite
    population correction: an enumerated size contributes nothing). It ignores the
    surrogate's own fitting noise, a second-order term. For a vector-valued game it is the
    error of the mean over the columns, the value a round pays.

    **Early stopping** (``stop_ratio``, vector-valued games). A round's value is the mean over
    validation samples, so it already carries a validation standard error (the spread of the
    per-sample values over sqrt(m)); coalitions beyond the point where the Monte Carlo error
    is small beside it buy little. With ``stop_ratio`` r the design drawn for the whole
    budget is evaluated in ``waves`` equal steps, each a seeded random part of every size's
    pairs; after each from a quarter of the design on, the valuation stops once the Monte
    Carlo errors, summed in quadrature over the players, are at most r times the validation
    errors summed the same way, i.e. the estimator adds at most r**2 to the measurement's
    variance. The last wave is the whole design: a valuation that never stops early is the
    one without ``stop_ratio``. Each wave goes to the utility in one call (``max_batch``
    coalitions at most each), as the whole design does without waves.
    """

    max_evaluations: int = 1024
    adjust: bool = True
    max_batch: int = _MAX_BATCH
    stop_ratio: float | None = None
    waves: int = 8

    def __post_init__(self) -> None:
        if self.max_evaluations < 1:
            raise ValueError(f"max_evaluations must be >= 1, got {self.max_evaluations}")
        _check_max_batch(self.max_batch)
        if self.stop_ratio is not None and not self.stop_ratio > 0:
            raise ValueError(f"stop_ratio must be > 0 or None, got {self.stop_ratio}")
        if self.waves < 1:
            raise ValueError(f"waves must be >= 1, got {self.waves}")

    @property
    def method(self) -> str:
        return "stratified-kernel" + ("" if self.adjust else "-unadjusted")

    def value(self, utility: BatchUtility, num_players: int, *, seed: int = 0) -> ShapleyResult:
        """The Shapley values of players 0..num_players-1, from coalitions drawn with ``seed``.

        Raises ValueError when ``max_evaluations`` cannot cover U(empty), U(N) and the
        coalitions of 1 and K - 1 players.
        """
        _check_num_players(num_players)
        if num_players == 0:
            return _no_players(self.method)
        needed = min_kernel_evaluations(num_players)
        if self.max_evaluations < needed:
            raise ValueError(
                f"{type(self).__name__} needs at least {needed} evaluations for {num_players} "
                f"players (U(empty), U(N) and every coalition of 1 and of {num_players - 1}); "
                f"max_evaluations is {self.max_evaluations}"
            )
        coalitions = _Coalitions(utility, self.max_batch, vector=True)
        if num_players == 1:
            v_empty, v_full = coalitions.evaluate(np.array([[False], [True]]))
            return ShapleyResult(
                values=np.asarray(v_full - v_empty)[None],
                evaluations=coalitions.evaluations,
                method=self.method,
                errors=np.zeros(1),
            )
        rng = np.random.default_rng(seed)
        design = _kernel_design(num_players, self.max_evaluations, rng)
        ends = np.zeros((2, num_players), dtype=bool)
        ends[1] = True
        for take in self._waves(design, seed):
            strata = design.strata(take)
            utilities = coalitions.evaluate(np.concatenate([ends, *strata.values()]))
            v_empty, v_full = utilities[0], utilities[1]
            values_by_size: dict[int, np.ndarray] = {}
            start = 2
            for s, rows in strata.items():
                values_by_size[s] = utilities[start : start + rows.shape[0]]
                start += rows.shape[0]
            values, errors = _kernel_estimate(
                num_players,
                strata,
                values_by_size,
                v_empty,
                v_full,
                adjust=self.adjust,
                sampled=design.sampled(take),
            )
            if take is not None and self._precise_enough(values, errors):
                break
        return ShapleyResult(
            values=values, evaluations=coalitions.evaluations, method=self.method, errors=errors
        )

    def _waves(self, design: _KernelDesign, seed: int) -> Iterator[dict[int, np.ndarray] | None]:
        """The pairs each wave evaluates (indices into ``design.pairs``, by size), the last
        wave (None) the whole design; one wave without ``stop_ratio``."""
        if self.stop_ratio is not None and design.pairs:
            rng = np.random.default_rng([seed, _WAVE_STREAM])
            order = {s: rng.permutation(chosen.shape[0]) for s, chosen in design.pairs.items()}
            # The first check comes at a quarter of the design: with fewer pairs a size's
            # spread, and so the stated error, is itself too noisy to stop on.
            for wave in range(max(1, math.ceil(self.waves / 4)), self.waves):
                yield {
                    s: np.sort(picked[: math.ceil(picked.size * wave / self.waves)])
                    for s, picked in order.items()
                }
        yield None

    def _precise_enough(self, values: np.ndarray, errors: np.ndarray) -> bool:
        """Whether the Monte Carlo errors, in quadrature over the players, are within
        ``stop_ratio`` of the validation errors (a vector-valued game's only)."""
        if self.stop_ratio is None or values.ndim != 2 or values.shape[1] < 2:
            return False
        validation = values.std(axis=1, ddof=1) / math.sqrt(values.shape[1])
        return bool(np.linalg.norm(errors) <= self.stop_ratio * np.linalg.norm(validation))


_WAVE_STREAM = 0x3A7E5
"""Second word of the seed of the waves' order, so that it never repeats the design's draws."""


@dataclass(frozen=True)
class _KernelDesign:
    """The coalitions ``StratifiedKernelShapley`` evaluates besides U(empty) and U(N): the K
    singletons and their complements, and for each size s in 2..K/2 ``pairs[s]``, coalitions
    of s players each evaluated with its complement, drawn from ``caps[s]`` possible pairs."""

    num_players: int
    pairs: dict[int, np.ndarray]
    caps: dict[int, int]

    def strata(self, take: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Coalitions by size 1..K-1 (bool masks), of the pairs ``take`` picks (all: None).

        Rows of size s < K/2 and of size K - s are the pairs in the same order; size K/2
        holds its pairs' coalitions, then their complements.
        """
        k = self.num_players
        strata: dict[int, list[np.ndarray]] = {s: [] for s in range(1, k)}
        if k > 1:
            strata[1].append(np.eye(k, dtype=bool))
            if k > 2:
                strata[k - 1].append(~np.eye(k, dtype=bool))
        for s, chosen in self.pairs.items():
            picked = chosen if take is None else chosen[take[s]]
            strata[s].append(picked)
            strata[k - s].append(~picked)
        return {s: np.concatenate(parts) for s, parts in strata.items() if parts}

    def sampled(self, take: dict[int, np.ndarray] | None = None) -> dict[int, float]:
        """The finite population correction 1 - n/N of each size whose n pairs ``take``
        picks are drawn from N > n (an enumerated size is exact: not listed)."""
        counts = {
            s: chosen.shape[0] if take is None else take[s].size for s, chosen in self.pairs.items()
        }
        return {s: 1.0 - n / self.caps[s] for s, n in counts.items() if n < self.caps[s]}


def _kernel_design(
    num_players: int, max_evaluations: int, rng: np.random.Generator
) -> _KernelDesign:
    """The distinct coalitions ``max_evaluations`` buys, drawn with ``rng``."""
    k = num_players
    pairs: dict[int, np.ndarray] = {}
    caps: dict[int, int] = {}
    spare_pairs = (max_evaluations - min_kernel_evaluations(k)) // 2
    sizes = list(range(2, k // 2 + 1))
    if sizes and spare_pairs > 0:
        # A pair is a coalition and its complement; for s = K/2 both have size s.
        caps = {s: math.comb(k, s) // 2 if 2 * s == k else math.comb(k, s) for s in sizes}
        weights = {s: 1.0 / (s * (k - s)) for s in sizes}
        for s, count in _allocate(spare_pairs, weights, caps).items():
            if count > 0:
                pairs[s] = _sample_subsets(k, s, count, caps[s], rng)
    return _KernelDesign(num_players=k, pairs=pairs, caps=caps)


def _allocate(total: int, weights: dict[int, float], caps: dict[int, int]) -> dict[int, int]:
    """Split ``total`` in proportion to ``weights`` without exceeding ``caps`` (water filling)."""
    counts = dict.fromkeys(weights, 0)
    free = sorted(weights)
    left = total
    while free:
        mass = sum(weights[s] for s in free)
        full = [s for s in free if left * weights[s] / mass >= caps[s]]
        if not full:
            break
        for s in full:
            counts[s] = caps[s]
            left -= caps[s]
            free.remove(s)
    if free and left > 0:
        mass = sum(weights[s] for s in free)
        shares = {s: left * weights[s] / mass for s in free}
        for s in free:
            counts[s] = min(caps[s], math.floor(shares[s]))
        rest = left - sum(counts[s] for s in free)
        by_remainder = sorted(free, key=lambda s: (-(shares[s] - math.floor(shares[s])), s))
        for s in itertools.cycle(by_remainder):
            if rest <= 0 or all(counts[t] >= caps[t] for t in free):
                break
            if counts[s] < caps[s]:
                counts[s] += 1
                rest -= 1
    return counts


def _sample_subsets(
    num_players: int, size: int, count: int, cap: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` distinct coalitions of ``size`` players, uniformly; complements are distinct too.

    For size K/2 a coalition and its complement are one pair, so only coalitions holding
    player 0 are drawn.
    """
    half = 2 * size == num_players
    if cap <= 4 * count:
        # Dense: enumerate every candidate and choose without replacement.
        pool = [
            c for c in itertools.combinations(range(num_players), size) if not half or c[0] == 0
        ]
        picked = np.sort(rng.choice(len(pool), size=count, replace=False))
        members = np.array([pool[i] for i in picked], dtype=np.int64)
        masks = np.zeros((count, num_players), dtype=bool)
        np.put_along_axis(masks, members, True, axis=1)
        return masks
    chosen: list[np.ndarray] = []
    seen: set[bytes] = set()
    while len(chosen) < count:
        draws = np.argsort(rng.random((count - len(chosen), num_players)), axis=1)[:, :size]
        masks = np.zeros((draws.shape[0], num_players), dtype=bool)
        np.put_along_axis(masks, draws, True, axis=1)
        if half:
            masks[~masks[:, 0]] = ~masks[~masks[:, 0]]
        for row in masks:
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                chosen.append(row)
    return np.array(chosen[:count])


def _kernel_estimate(
    k: int,
    strata: dict[int, np.ndarray],
    utilities: dict[int, np.ndarray],
    v_empty: np.ndarray,
    v_full: np.ndarray,
    *,
    adjust: bool,
    sampled: dict[int, float],
) -> tuple[np.ndarray, np.ndarray]:
    """The size-stratified, constrained kernel regression, regression-adjusted if ``adjust``,
    and its Monte Carlo standard errors (``sampled``: the sizes drawn, not enumerated, with
    their finite population corrections; ``_KernelDesign.sampled``).

    Linear in the utilities: for a vector-valued game (utilities (rows, m)) each column is
    estimated as its own game would be, on the same design; the errors are of the mean over
    the columns.
    """
    tail = np.shape(v_full)
    gram = np.zeros((k, k))
    gram_cv = np.zeros((2 * k, 2 * k))
    moment_cv = np.zeros((2 * k, *tail))
    centred: list[tuple[float, int, np.ndarray, np.ndarray]] = []
    for s, masks in strata.items():
        x = masks.astype(np.float64)
        u = utilities[s]
        x_c = x - x.mean(axis=0)
        u_c = u - u.mean(axis=0)
        weight = 1.0 / (s * (k - s) * x.shape[0])
        gram += weight * (x_c.T @ x_c)
        if adjust:
            features = np.hstack([x_c, x_c / s])
            gram_cv += weight * (features.T @ features)
            moment_cv += weight * (features.T @ u_c)
        centred.append((weight, s, x_c, u_c))
    # Every centred row sums to 0, so ones spans the Gram's null space; adding a multiple of
    # ones ones^T makes it invertible and leaves the solution orthogonal to ones.
    ones = np.ones((k, k))
    scale = max(float(np.trace(gram)) / k, 1e-300)
    theta: np.ndarray = np.zeros((2 * k, *tail))
    if adjust:
        both = np.zeros((2 * k, 2 * k))
        both[:k, :k] = ones
        both[k:, k:] = ones
        scale_cv = max(float(np.trace(gram_cv)) / (2 * k), 1e-300)
        theta = np.linalg.lstsq(gram_cv + scale_cv * both, moment_cv, rcond=None)[0]
    moment = np.zeros((k, *tail))
    for weight, s, x_c, u_c in centred:
        fitted = x_c @ (theta[:k] + theta[k:] / s)
        moment += weight * (x_c.T @ (u_c - fitted))
    inverse = np.linalg.inv(gram + scale * ones)
    residual = np.linalg.lstsq(gram + scale * ones, moment, rcond=None)[0]
    harmonic = sum(1.0 / s for s in range(1, k))
    surrogate = theta[:k] + theta[k:] * harmonic / (k - 1)
    values: np.ndarray = (v_full - v_empty) / k + surrogate + residual
    parameters = (3 * k if adjust else k) + len(strata)  # slopes, surrogate and intercepts
    errors = _kernel_errors(k, centred, theta, residual, inverse, sampled, parameters)
    return values, errors


def _kernel_errors(
    k: int,
    centred: list[tuple[float, int, np.ndarray, np.ndarray]],
    theta: np.ndarray,
    residual: np.ndarray,
    inverse: np.ndarray,
    sampled: dict[int, float],
    fitted: int,
) -> np.ndarray:
    """The sandwich standard errors of ``_kernel_estimate``'s values (of the columns' mean).

    The estimate's error is inverse @ sum_S w(S) x_S e_S to first order, e the residual of
    the whole fit; its pairs are independent draws within their size, so the variance of
    each size's sum is its pair terms' spread times their count (times 1 - n/N). Residuals
    are smaller than the errors they stand for by the ``fitted`` parameters' share of the
    rows, which the variance gets back (the HC1 correction, MacKinnon & White 1985).
    """

    def mean(a: np.ndarray) -> np.ndarray:
        averaged: np.ndarray = a.reshape(a.shape[0], -1).mean(axis=1)
        return averaged

    theta_m, residual_m = mean(theta), mean(residual)
    terms: dict[int, np.ndarray] = {}
    for weight, s, x_c, u_c in centred:
        error = mean(u_c) - x_c @ (theta_m[:k] + theta_m[k:] / s + residual_m)
        terms[s] = weight * x_c * error[:, None]
    middle = np.zeros((k, k))
    for s, correction in sampled.items():
        if 2 * s == k:
            half = terms[s].shape[0] // 2
            pair = terms[s][:half] + terms[s][half:]
        else:
            pair = terms[s] + terms[k - s]
        n = pair.shape[0]
        if n > 1:
            spread = pair - pair.mean(axis=0)
            middle += correction * n / (n - 1) * (spread.T @ spread)
    rows = sum(x_c.shape[0] for _, _, x_c, _ in centred)
    variance = np.einsum("ij,jk,ik->i", inverse, middle, inverse) * rows / max(rows - fitted, 1)
    errors: np.ndarray = np.sqrt(np.maximum(variance, 0.0))
    return errors


def default_evaluations(num_players: int) -> int:
    """The evaluation budget ``choose_valuator`` gives ``StratifiedKernelShapley`` by default.

    40 per player, never fewer than the estimator's minimum nor more than 2**K. For 50
    digits organisations (``bench/shapley.py``) that is 2,000 evaluations, under a second a
    round on two CPU cores, and values closer to a 600-permutation Monte Carlo reference
    than two 300-permutation ones are to each other.
    """
    _check_num_players(num_players)
    budget = max(40 * num_players, min_kernel_evaluations(num_players))
    return min(budget, 1 << num_players)


def choose_valuator(
    num_players: int,
    *,
    max_exact: int,
    max_evaluations: int | None = None,
    stop_ratio: float | None = None,
) -> Valuator:
    """Exact Shapley up to ``max_exact`` players, ``StratifiedKernelShapley`` above.

    ``max_evaluations`` is the sampled valuator's budget (default ``default_evaluations``),
    ``stop_ratio`` its early stopping rule (``StratifiedKernelShapley``; None: the whole budget).
    """
    _check_num_players(num_players)
    if max_exact < 0:
        raise ValueError(f"max_exact must be >= 0, got {max_exact}")
    if num_players <= max_exact:
        return ExactShapley()
    budget = default_evaluations(num_players) if max_evaluations is None else max_evaluations
    needed = min_kernel_evaluations(num_players)
    if budget < needed:
        raise ValueError(
            f"max_evaluations={budget} is too small for {num_players} players: the sampled "
            f"valuator needs at least {needed}"
        )
    return StratifiedKernelShapley(max_evaluations=budget, stop_ratio=stop_ratio)

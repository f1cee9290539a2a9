"""Integer reward split of a round's token budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction


def split_rewards(budget: int, scores: Sequence[float]) -> list[int]:
    """Split ``budget`` token units pro rata to max(score, 0), summing exactly to ``budget``.

    Largest-remainder (Hamilton) apportionment: each organisation gets the floor of its exact
    quota budget * s_i / sum_j s_j, and the units left over go one each to the largest
    fractional remainders, ties to the lowest index. Every quantity is an exact rational, so
    the split is deterministic on any machine. If no score is positive, or the budget is 0,
    everyone gets 0 (and nothing is paid).
    """
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be an integer number of token units, got {budget!r}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    weights: list[Fraction] = []
    for i, score in enumerate(scores):
        if not math.isfinite(score):
            raise ValueError(f"score {i} is {score}; scores must be finite")
        weights.append(max(Fraction(score), Fraction(0)))
    total = sum(weights, Fraction(0))
    if budget == 0 or total == 0:
        return [0] * len(weights)
    quotas = [budget * w / total for w in weights]
    amounts = [math.floor(q) for q in quotas]
    left = budget - sum(amounts)
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - amounts[i]), i))
    for i in by_remainder[:left]:
        amounts[i] += 1
    return amounts

"""Close a round's books: screen the updates, value them, aggregate them and split the reward.

One pure function, ``price_round``, so that the coordinator, ``fedledger audit`` and the
benchmarks compute exactly the same thing from the same inputs:

1. **Screen.** In the order the organisations committed on-chain, an update that is zero, that
   is byte-identical to an earlier organisation's, or that is a rescaled copy of one (|cosine|
   at least ``copy_cosine``) is flagged and left out of the game and the aggregate: copying
   someone else's work earns nothing and does not double its weight. So is one no more aligned
   than random noise would be with the others' updates and with the same organisation's update
   of the round before.
2. **Clip.** The norm bound is ``clip_multiplier`` x the median norm of the screened updates
   (the median cannot be dragged up by fewer than half of them); larger updates are scaled down
   to it and flagged ``norm_clipped`` (the model-replacement defence of Sun et al., 2019).
3. **Value.** The Shapley value of each screened organisation in the game whose utility is the
   validation metric of w + eta * (uniform average of the coalition's clipped updates).
   Uniform, not sample-weighted: a declared sample count steers FedAvg but cannot buy reward.
4. **Aggregate.** With ``exclude_negative``, organisations whose value is negative (their
   update made the model worse on the validation set: sign flips, noise) are left out; the rest
   are aggregated by the policy's rule (FedAvg by sample counts, median or trimmed mean; the
   updates already left out count towards the trimmed mean's trim).
5. **Pay.** The budget is split pro rata to positive values, in exact integer units; a flagged
   organisation is paid nothing.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fedledger.coordinator.aggregation import AggregationMethod, aggregate, clip_by_norm
from fedledger.incentive.rewards import split_rewards, to_fixed_point
from fedledger.incentive.sampling import choose_valuator
from fedledger.incentive.shapley import ShapleyResult, Valuator
from fedledger.incentive.valuation import CoalitionUtility, Metric, flatten

__all__ = [
    "FORFEITING",
    "Flag",
    "PricingPolicy",
    "RoundPricing",
    "flag_names",
    "price_round",
]


class Flag(enum.IntFlag):
    """Why the coordinator flagged an update; recorded on-chain as a bit set (``flagsOf``)."""

    NORM_CLIPPED = 1  # norm above the round's bound: clipped (model-replacement attempt)
    ZERO_UPDATE = 2  # no change at all: a free-rider
    DUPLICATE_UPDATE = 4  # byte-identical to an update committed earlier by another organisation
    COPIED_UPDATE = 8  # a rescaled copy of an earlier organisation's update
    NEGATIVE_CONTRIBUTION = 16  # made the model worse on the validation set (sign flip, noise)
    UNALIGNED_UPDATE = 32  # no more aligned with the others' updates than random noise is


FORFEITING = (
    Flag.NORM_CLIPPED
    | Flag.ZERO_UPDATE
    | Flag.DUPLICATE_UPDATE
    | Flag.COPIED_UPDATE
    | Flag.NEGATIVE_CONTRIBUTION
    | Flag.UNALIGNED_UPDATE
)
"""Flags that cost an organisation the round's reward."""


def flag_names(flags: int) -> list[str]:
    """The names of the bits set in ``flags``, lower case, lowest bit first."""
    return [f.name.lower() for f in Flag if f.name is not None and flags & f]


@dataclass(frozen=True)
class PricingPolicy:
    """How a coordinator screens, values, aggregates and pays (``CoordinatorSettings`` holds it)."""

    aggregation: AggregationMethod = "fedavg"
    trim_fraction: float = 0.2
    clip_multiplier: float | None = 3.0
    exclude_negative: bool = True
    copy_cosine: float = 0.999
    zero_tolerance: float = 1e-6  # an update with norm <= this x the median norm counts as zero
    noise_sigmas: float = 4.0  # |cos| * sqrt(P) below this, with others and own last: noise
    eta: float = 1.0
    metric: Metric = "accuracy"
    valuation_weights: Literal["uniform", "samples"] = "uniform"
    max_exact_players: int = 10  # exact Shapley up to this many screened updates, sampled above
    valuation_budget: int | None = None  # the sampled valuator's utility evaluations


@dataclass(frozen=True)
class RoundPricing:
    """What a round's close decided, per update in the order given."""

    params: dict[str, Tensor]  # the new global model (CPU)
    values: list[float]  # Shapley values; 0.0 for updates screened out of the game
    scores: list[int]  # the values as on-chain fixed point
    rewards: list[int]  # token units; they sum to the budget unless nobody earned anything
    flags: list[int]  # ``Flag`` bits
    norms: list[float]
    norm_bound: float | None
    aggregated: list[int]  # indices of the updates in the new model
    method: str  # the valuator's method name
    evaluations: int  # coalition utilities the valuation cost
    notes: dict[int, str] = field(default_factory=dict)  # index -> why it was flagged, in words


def _cosine(unit: Tensor, other: Tensor) -> float:
    """cos(unit, other) for a unit vector ``unit`` (0 when ``other`` is 0)."""
    return float(unit @ other) / max(float(torch.linalg.vector_norm(other)), 1e-300)


def price_round(
    model: torch.nn.Module,
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    num_samples: Sequence[int],
    update_hashes: Sequence[str],
    x_val: Tensor,
    y_val: Tensor,
    *,
    policy: PricingPolicy,
    budget: int,
    valuator: Valuator | None = None,
    previous: Sequence[Mapping[str, Tensor] | None] | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> RoundPricing:
    """Screen, clip, value, aggregate and pay one round; deterministic for given inputs.

    ``deltas`` come in the order their organisations committed on-chain (earliest first):
    that order decides who is the original of a duplicate or a copy. ``previous[k]``, where
    given, is the same organisation's update in the round before (None if it had none).
    """
    count = len(deltas)
    if not (len(num_samples) == len(update_hashes) == count):
        raise ValueError(
            f"{count} deltas, {len(num_samples)} sample counts and {len(update_hashes)} hashes"
        )
    if count == 0:
        raise ValueError("a round needs at least one update to price")
    if previous is not None and len(previous) != count:
        raise ValueError(f"{count} deltas but {len(previous)} previous updates")
    flat = torch.stack([flatten(d, dtype=torch.float64) for d in deltas])  # (K, P)
    norms = [float(n) for n in torch.linalg.vector_norm(flat, dim=1)]
    if not all(math.isfinite(n) for n in norms):
        raise ValueError("updates must be finite to be priced")
    flags = [0] * count
    notes: dict[int, str] = {}

    # 1. Screen, in commit order.
    median_norm = statistics.median(norms)
    unit = flat / torch.clamp(torch.tensor(norms, dtype=torch.float64), min=1e-300).unsqueeze(1)
    cosine = unit @ unit.T
    kept: list[int] = []
    for k in range(count):
        if norms[k] <= policy.zero_tolerance * median_norm or norms[k] == 0.0:
            flags[k] |= Flag.ZERO_UPDATE
            notes[k] = "the update changes nothing"
            continue
        earlier = next((j for j in kept if update_hashes[j] == update_hashes[k]), None)
        if earlier is not None:
            flags[k] |= Flag.DUPLICATE_UPDATE
            notes[k] = f"byte-identical to update {update_hashes[earlier]}, committed earlier"
            continue
        copied = next((j for j in kept if abs(float(cosine[k, j])) >= policy.copy_cosine), None)
        if copied is not None:
            flags[k] |= Flag.COPIED_UPDATE
            notes[k] = (
                f"a rescaled copy (cosine {float(cosine[k, copied]):+.4f}) of update "
                f"{update_hashes[copied]}, committed earlier"
            )
            continue
        kept.append(k)
    # Pure noise: the cosine of a random direction with any fixed one is about N(0, 1/P), so
    # z = cos * sqrt(P) is about N(0, 1). An update within noise_sigmas of 0 both against the
    # sum of the others' directions and against the organisation's own previous update carries
    # no signal. Both, because honest updates on very different data can be unaligned with
    # the others in a round, but an organisation training on the same data keeps its direction
    # from one round to the next (z in the tens), while fresh noise does not.
    if len(kept) > 1:
        scale = math.sqrt(flat.shape[1])
        total = unit[kept].sum(dim=0)
        for k in kept:
            z_others = scale * _cosine(unit[k], total - unit[k])
            if abs(z_others) >= policy.noise_sigmas:
                continue
            own = previous[k] if previous is not None else None
            z_self = None
            if own is not None:
                z_self = scale * _cosine(unit[k], flatten(own, dtype=torch.float64))
                if abs(z_self) >= policy.noise_sigmas:
                    continue
            flags[k] |= Flag.UNALIGNED_UPDATE
            notes[k] = (
                f"no more aligned than noise (|z| < {policy.noise_sigmas:g}) with the other "
                f"updates (z {z_others:+.2f})"
                + ("" if z_self is None else f" or with its own previous update (z {z_self:+.2f})")
                + ": no signal"
            )
        kept = [k for k in kept if not flags[k] & Flag.UNALIGNED_UPDATE]
    del flat, unit

    # 2. Clip to the bound the screened updates set.
    bound: float | None = None
    inputs: dict[int, Mapping[str, Tensor]] = {k: deltas[k] for k in kept}
    if policy.clip_multiplier is not None and kept:
        bound = policy.clip_multiplier * statistics.median(norms[k] for k in kept)
        for k in kept:
            if norms[k] > bound:
                inputs[k] = clip_by_norm(deltas[k], bound)[0]
                flags[k] |= Flag.NORM_CLIPPED
                notes[k] = f"norm {norms[k]:.4g} above the round's bound {bound:.4g}: clipped"

    # 3. Value the screened organisations.
    values = [0.0] * count
    method, evaluations = "none", 0
    if kept:
        uniform = policy.valuation_weights == "uniform"
        utility = CoalitionUtility(
            model,
            base,
            [inputs[k] for k in kept],
            [1 if uniform else num_samples[k] for k in kept],
            x_val,
            y_val,
            eta=policy.eta,
            metric=policy.metric,
            device=device,
        )
        if valuator is None:
            valuator = choose_valuator(
                len(kept),
                max_exact=policy.max_exact_players,
                max_evaluations=policy.valuation_budget,
            )
        result: ShapleyResult = valuator.value(utility, len(kept), seed=seed)
        method, evaluations = result.method, result.evaluations
        for i, k in enumerate(kept):
            values[k] = float(result.values[i])
            if values[k] < 0:
                flags[k] |= Flag.NEGATIVE_CONTRIBUTION
                notes.setdefault(k, f"contribution {values[k]:+.4g}: made the model worse")

    # 4. Aggregate.
    members = [
        k for k in kept if not (policy.exclude_negative and flags[k] & Flag.NEGATIVE_CONTRIBUTION)
    ]
    if members:
        # The trim budget covers the round: updates already left out count towards it, so a
        # round whose attackers were screened out does not also lose honest minority updates.
        left_out = count - len(members)
        trim = max(0, math.floor(round(policy.trim_fraction * count, 9)) - left_out)
        params = aggregate(
            policy.aggregation,
            base,
            [inputs[k] for k in members],
            [num_samples[k] for k in members],
            eta=policy.eta,
            device=device,
            trim_fraction=trim / len(members),
        ).params
    else:
        params = {name: t.detach().to("cpu").clone() for name, t in base.items()}

    # 5. Pay.
    payable = [0.0 if flags[k] & FORFEITING else max(values[k], 0.0) for k in range(count)]
    rewards = split_rewards(budget, payable)
    return RoundPricing(
        params=params,
        values=values,
        scores=[to_fixed_point(v) for v in values],
        rewards=rewards,
        flags=[int(f) for f in flags],
        norms=norms,
        norm_bound=bound,
        aggregated=members,
        method=method,
        evaluations=evaluations,
        notes=notes,
    )

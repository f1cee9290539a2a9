"""The round's books: screen, clip, value, aggregate and pay, as pure functions of its inputs.

``close_books(inputs, policy)`` is the spine of the coordinator. The service loads a round's
inputs (``fedledger.coordinator.inputs``), calls it and settles what it returns; ``fedledger
audit`` loads the same inputs from a copy of the data directory, calls the same function and
compares. Nothing here reads a clock, a file or the chain, so the same inputs give the same
books, bit for bit, on any machine with the same torch.

1. **Screen** (``screen``). In the order the organisations committed on-chain, an update that
   is zero, that is byte-identical to an earlier organisation's, or that is a rescaled copy of
   one (|cosine| at least ``copy_cosine``) is flagged and left out of the game and the
   aggregate: copying someone else's work earns nothing and does not double its weight. So is
   one no more aligned than random noise would be with the others' updates and with the same
   organisation's update of the round before.
2. **Clip** (``clip``). The norm bound is ``clip_multiplier`` x the median norm of the screened
   updates (the median cannot be dragged up by fewer than half of them); larger updates are
   scaled down to it and flagged ``norm_clipped`` (the model-replacement defence of Sun et al.,
   2019).
3. **Value** (``value``). The Shapley value of each screened organisation in the game whose
   utility is the validation metric of w + eta * (uniform average of the coalition's clipped
   updates). Uniform, not sample-weighted: a declared sample count steers FedAvg but cannot buy
   reward.
4. **Aggregate** (``aggregate_round``). With ``exclude_negative``, organisations whose value is
   negative (their update made the model worse on the validation set: sign flips, noise) are
   left out; the rest are aggregated by the policy's rule (FedAvg by sample counts, median or
   trimmed mean; the updates already left out count towards the trimmed mean's trim). FedAvg's
   weights are capped at ``max_weight_multiple`` / K: a declared sample count is the
   organisation's own word, and without a cap one declaring 10^12 samples is the new model.
5. **Pay** (``pay``). The budget is split pro rata to positive values, in exact integer units;
   a flagged organisation is paid nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedledger.coordinator.aggregation import aggregate, clip_by_norm
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import canonical_bytes, keccak
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree
from fedledger.incentive.onchain import FORFEITING, Flag, ValuationRecord, hex32, to_fixed_point
from fedledger.incentive.rewards import split_rewards
from fedledger.incentive.sampling import choose_valuator
from fedledger.incentive.shapley import Valuator
from fedledger.incentive.tensors import flatten, l2_norm
from fedledger.incentive.utility import CoalitionUtility, evaluate_params

Tensors = Mapping[str, Tensor]


@dataclass(frozen=True)
class UpdateInput:
    """One organisation's accepted update, as the books see it."""

    organisation: str
    update_hash: str  # 0x-hex keccak256 of its canonical bytes (== its on-chain commitment)
    num_samples: int
    delta: Tensors
    previous: Tensors | None = None  # the same organisation's update of the round before


@dataclass(frozen=True)
class RoundInputs:
    """Everything a round's books depend on, besides the policy."""

    round_id: int
    model: torch.nn.Module  # the task's architecture; its own parameters play no part
    base: Tensors  # the round's global model w_r
    updates: Sequence[UpdateInput]  # in on-chain commit order (earliest first)
    x_val: Tensor
    y_val: Tensor

    @property
    def validation_hash(self) -> bytes:
        """keccak256 of the validation set's canonical bytes, recorded on-chain with the scores."""
        return keccak(canonical_bytes({"x": self.x_val, "y": self.y_val}))


@dataclass(frozen=True)
class Screening:
    """Which updates go on to the game, and why the others do not."""

    kept: list[int]  # indices of the screened-in updates, in commit order
    flags: list[int]  # ``Flag`` bits per update
    notes: dict[int, str]  # index -> why it was flagged, in words


@dataclass(frozen=True)
class Clipping:
    inputs: dict[int, Tensors]  # kept index -> its update, scaled down to the bound if above it
    bound: float | None  # None when clipping is off (or nothing was kept)
    clipped: list[int]


@dataclass(frozen=True)
class Values:
    values: list[float]  # Shapley values; 0.0 for updates screened out of the game
    method: str  # the valuator's method name ("none" when nobody was valued)
    evaluations: int  # coalition utilities the valuation cost


@dataclass(frozen=True)
class Books:
    """What a round's close decided; lists run over the updates in on-chain commit order."""

    round_id: int
    organisations: list[str]
    update_hashes: list[str]
    num_samples: list[int]
    values: list[float]  # Shapley values (floats)
    scores: list[int]  # the values as the on-chain fixed-point score
    rewards: list[int]  # token units; they sum to the budget unless nobody earned anything
    flags: list[int]  # ``Flag`` bits
    norms: list[float]
    norm_bound: float | None
    aggregated: list[int]  # indices of the updates in the new model
    method: str
    evaluations: int
    params: dict[str, Tensor]  # the new global model (CPU)
    new_bytes: bytes  # its canonical bytes
    new_hash: str  # 0x-hex keccak256 of new_bytes
    accuracy: float  # validation accuracy of the new model
    valuation: ValuationRecord  # method, seed and validation hash, as recorded on-chain
    tree: SettlementTree | None  # the Merkle settlement, when the round settles by claims
    notes: dict[int, str] = field(default_factory=dict)

    @property
    def by_claims(self) -> bool:
        return self.tree is not None

    @property
    def flagged(self) -> dict[str, int]:
        """Organisation -> its flags, for the flagged ones only."""
        return {o: f for o, f in zip(self.organisations, self.flags, strict=True) if f}


def screen(
    deltas: Sequence[Tensors],
    update_hashes: Sequence[str],
    norms: Sequence[float],
    policy: PricingPolicy,
    previous: Sequence[Tensors | None] | None = None,
) -> Screening:
    """Flag zero, duplicate, copied and noise updates, in commit order; keep the rest."""
    count = len(deltas)
    flags = [0] * count
    notes: dict[int, str] = {}
    flat = torch.stack([flatten(d, dtype=torch.float64) for d in deltas])  # (K, P)
    unit = flat / torch.clamp(torch.tensor(norms, dtype=torch.float64), min=1e-300).unsqueeze(1)
    cosine = unit @ unit.T
    median_norm = statistics.median(norms)
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
    return Screening(kept=kept, flags=flags, notes=notes)


def _cosine(unit: Tensor, other: Tensor) -> float:
    """cos(unit, other) for a unit vector ``unit`` (0 when ``other`` is 0)."""
    return float(unit @ other) / max(float(torch.linalg.vector_norm(other)), 1e-300)


def clip(
    deltas: Sequence[Tensors], norms: Sequence[float], kept: Sequence[int], policy: PricingPolicy
) -> Clipping:
    """Scale the kept updates above ``clip_multiplier`` x their median norm down to it."""
    inputs: dict[int, Tensors] = {k: deltas[k] for k in kept}
    if policy.clip_multiplier is None or not kept:
        return Clipping(inputs=inputs, bound=None, clipped=[])
    bound = policy.clip_multiplier * statistics.median(norms[k] for k in kept)
    clipped = [k for k in kept if norms[k] > bound]
    for k in clipped:
        inputs[k] = clip_by_norm(deltas[k], bound, norm=norms[k])
    return Clipping(inputs=inputs, bound=bound, clipped=clipped)


def value(
    inputs: RoundInputs,
    clipping: Clipping,
    kept: Sequence[int],
    policy: PricingPolicy,
    *,
    valuator: Valuator | None = None,
    device: torch.device | None = None,
) -> Values:
    """Each kept organisation's Shapley value in the round's coalition game (0 for the rest)."""
    values = [0.0] * len(inputs.updates)
    if not kept:
        return Values(values=values, method="none", evaluations=0)
    uniform = policy.valuation_weights == "uniform"
    utility = CoalitionUtility(
        inputs.model,
        inputs.base,
        [clipping.inputs[k] for k in kept],
        [1 if uniform else inputs.updates[k].num_samples for k in kept],
        inputs.x_val,
        inputs.y_val,
        eta=policy.eta,
        metric=policy.metric,
        device=device,
    )
    if valuator is None:
        valuator = choose_valuator(
            len(kept),
            max_exact=policy.max_exact_players,
            max_evaluations=policy.valuation_budget_for(len(kept)),
        )
    result = valuator.value(utility, len(kept), seed=inputs.round_id)
    for i, k in enumerate(kept):
        values[k] = float(result.values[i])
    return Values(values=values, method=result.method, evaluations=result.evaluations)


def aggregate_round(
    inputs: RoundInputs,
    clipping: Clipping,
    members: Sequence[int],
    policy: PricingPolicy,
    *,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """The new global model from the ``members``' (clipped) updates by the policy's rule."""
    if not members:
        return {name: t.detach().to("cpu").clone() for name, t in inputs.base.items()}
    # The trim budget covers the round: updates already left out count towards it, so a round
    # whose attackers were screened out does not also lose honest minority updates.
    count = len(inputs.updates)
    left_out = count - len(members)
    trim = max(0, math.floor(round(policy.trim_fraction * count, 9)) - left_out)
    return aggregate(
        policy.aggregation,
        inputs.base,
        [clipping.inputs[k] for k in members],
        [inputs.updates[k].num_samples for k in members],
        eta=policy.eta,
        device=device,
        trim_fraction=trim / len(members),
        max_share=None
        if policy.max_weight_multiple is None
        else min(1.0, policy.max_weight_multiple / len(members)),
    )


def pay(budget: int, values: Sequence[float], flags: Sequence[int]) -> list[int]:
    """``budget`` split pro rata to positive values in exact units; flagged organisations get 0."""
    payable = [0.0 if f & FORFEITING else max(v, 0.0) for v, f in zip(values, flags, strict=True)]
    return split_rewards(budget, payable)


def close_books(
    inputs: RoundInputs,
    policy: PricingPolicy,
    *,
    valuator: Valuator | None = None,
    device: torch.device | None = None,
) -> Books:
    """Screen, clip, value, aggregate and pay one round: deterministic for given inputs."""
    updates = inputs.updates
    if not updates:
        raise ValueError("a round needs at least one update to close its books")
    deltas = [u.delta for u in updates]
    hashes = [u.update_hash for u in updates]
    norms = [l2_norm(d) for d in deltas]
    if not all(math.isfinite(n) for n in norms):
        raise ValueError("updates must be finite to be priced")

    screening = screen(deltas, hashes, norms, policy, [u.previous for u in updates])
    flags, notes = list(screening.flags), dict(screening.notes)
    kept = screening.kept
    clipping = clip(deltas, norms, kept, policy)
    for k in clipping.clipped:
        flags[k] |= Flag.NORM_CLIPPED
        notes[k] = f"norm {norms[k]:.4g} above the round's bound {clipping.bound:.4g}: clipped"
    values = value(inputs, clipping, kept, policy, valuator=valuator, device=device)
    for k in kept:
        if values.values[k] < 0:
            flags[k] |= Flag.NEGATIVE_CONTRIBUTION
            notes.setdefault(k, f"contribution {values.values[k]:+.4g}: made the model worse")
    members = [
        k for k in kept if not (policy.exclude_negative and flags[k] & Flag.NEGATIVE_CONTRIBUTION)
    ]
    params = aggregate_round(inputs, clipping, members, policy, device=device)
    rewards = pay(policy.reward_per_round, values.values, flags)

    scores = [to_fixed_point(v) for v in values.values]
    organisations = [u.organisation for u in updates]
    new_bytes = canonical_bytes(params)
    tree = None
    if len(updates) > policy.claims_above:
        tree = SettlementTree.build(
            [
                SettlementLeaf(inputs.round_id, org, score, reward, flag)
                for org, score, reward, flag in zip(
                    organisations, scores, rewards, flags, strict=True
                )
            ]
        )
    return Books(
        round_id=inputs.round_id,
        organisations=organisations,
        update_hashes=hashes,
        num_samples=[u.num_samples for u in updates],
        values=values.values,
        scores=scores,
        rewards=rewards,
        flags=[int(f) for f in flags],
        norms=norms,
        norm_bound=clipping.bound,
        aggregated=members,
        method=values.method,
        evaluations=values.evaluations,
        params=params,
        new_bytes=new_bytes,
        new_hash=hex32(keccak(new_bytes)),
        accuracy=evaluate_params(inputs.model, params, inputs.x_val, inputs.y_val, "accuracy"),
        valuation=ValuationRecord(
            method=f"{values.method}:{policy.metric}",
            seed=inputs.round_id,
            validation_hash=inputs.validation_hash,
        ),
        tree=tree,
        notes=notes,
    )

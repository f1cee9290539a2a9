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
   2019). Updates at least ``twin_cosine`` alike (``twin_groups``: the same records trained
   twice) are one player from here on, their mean with their mean sample count, in the game
   and the aggregate alike, and share its value equally.
3. **Value** (``value``). The Shapley value of each screened organisation in the game whose
   utility is the validation metric of w + eta * (the coalition's FedAvg step: its clipped
   updates averaged by sample count, capped as the aggregate caps them), the step rescaled to
   the length of the whole consortium's (``coalition_steps``). Rescaled, because one local
   epoch carries an organisation with four times the data four times as far, and a game that
   moves each coalition only as far as its members' training went pays for that length
   rather than for what the data says; measured against retraining every coalition from
   scratch (``bench/fairness.py``), the largest organisation's share was up to 42 points too
   high unrescaled; rescaled, every share is within 7.7 points on digits (within 18.9 on the
   breast-cancer task, where any share alone learns the task: a game valued at the shared
   model cannot credit what the model already knows). The metric is a mean over validation
   samples, so (Shapley being linear) each value
   is the mean of the organisation's values in the per-sample games; their spread gives the
   value's standard error, which says how much of it the validation set's luck could explain.
   A round valued by sampling adds the estimator's own standard error (in quadrature: the
   draw of coalitions and of the validation set are independent) and stops drawing once that
   is small beside the validation error (``valuation_stop_ratio``).
   A value more than ``negative_sigmas`` standard errors below 0 is a ``negative_contribution``:
   the harm is clear, not the noise of a finite validation set.
4. **Aggregate** (``aggregate_round``). With ``exclude_negative``, organisations flagged
   ``negative_contribution`` (their update made the model worse: sign flips, noise) are
   left out; the rest are aggregated by the policy's rule (FedAvg by sample counts, median or
   trimmed mean; the updates already left out count towards the trimmed mean's trim). FedAvg's
   weights are capped at ``max_weight_multiple`` / K: a declared sample count is the
   organisation's own word, and without a cap one declaring 10^12 samples is the new model.
5. **Pay** (``pay``). A round pays for what it measurably gained: ``reward_per_gain`` tokens per
   1.0 of the metric's rise from the old model to the new one, split pro rata to positive
   values, never more than ``reward_per_gain`` x an organisation's own value, nor than
   ``reward_per_round`` in all. A round that improved nothing pays nothing, so nobody is paid a
   round's budget for an estimate a hair above zero; over a run, the gains add up to the
   final model's rise over the initial one. A flagged organisation is paid nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
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
from fedledger.incentive.tensors import flatten, flatten_rows, l2_norm
from fedledger.incentive.utility import CoalitionUtility, descent_direction, evaluate_params

Tensors = Mapping[str, Tensor]

PUBLIC_STEPS = 2
"""How many of the last global steps the screen treats as public information."""

REPLAY_COSINE = 1 - 1e-9
"""|cosine| with an update of the round before above which an update is a rescaled replay of
it: honest updates of consecutive rounds on the same data (one organisation's, or two holding
the same records) can be 0.999 alike, so the screen's ``copy_cosine`` would flag them; a
replay, rescaled in float32, is 1 to ~1e-14."""


@dataclass(frozen=True)
class UpdateInput:
    """One organisation's accepted update, as the books see it."""

    organisation: str
    update_hash: str  # 0x-hex keccak256 of its canonical bytes (== its on-chain commitment)
    num_samples: int
    delta: Tensors
    previous: Tensors | None = None  # the same organisation's update of the round before
    previous_flags: int = 0  # the ``Flag`` bits that update was given (0: none, or no update)


@dataclass(frozen=True)
class RoundInputs:
    """Everything a round's books depend on, besides the policy."""

    round_id: int
    model: torch.nn.Module  # the task's architecture; its own parameters play no part
    base: Tensors  # the round's global model w_r
    updates: Sequence[UpdateInput]  # in on-chain commit order (earliest first)
    x_val: Tensor
    y_val: Tensor
    # Public: the last global steps w_r - w_{r-1}, w_{r-1} - w_{r-2} (newest first, at most
    # PUBLIC_STEPS). Anyone can upload them without data, so they are worth nothing.
    public_steps: Sequence[Tensors] = ()

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
    # The kept updates as the game's players, in commit order: each alone, or twins together
    # (``twin_groups``), the earliest first.
    groups: list[list[int]]


@dataclass(frozen=True)
class Clipping:
    inputs: dict[int, Tensors]  # kept index -> its update, scaled down to the bound if above it
    bound: float | None  # None when clipping is off (or nothing was kept)
    clipped: list[int]


@dataclass(frozen=True)
class Values:
    values: list[float]  # Shapley values; 0.0 for updates screened out of the game
    errors: list[float]  # their standard errors: over the validation samples, and for a round
    # valued by sampling the estimator's own besides, in quadrature (0.0 likewise)
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
    errors: list[float]  # the values' standard errors over the validation samples
    scores: list[int]  # the values as the on-chain fixed-point score
    rewards: list[int]  # token units: what the round's measured gain earned, split by value
    flags: list[int]  # ``Flag`` bits
    norms: list[float]
    norm_bound: float | None
    aggregated: list[int]  # indices of the updates in the new model
    method: str
    evaluations: int
    params: dict[str, Tensor]  # the new global model (CPU)
    new_bytes: bytes  # its canonical bytes
    new_hash: str  # 0x-hex keccak256 of new_bytes
    accuracy: float | None  # validation accuracy of the new model (None: a regression task)
    utility: float  # the new model's validation metric (the policy's)
    gain: float  # how much the round raised it: utility - the old model's
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


def screen(inputs: RoundInputs, norms: Sequence[float], policy: PricingPolicy) -> Screening:
    """Flag zero, duplicate, copied, replayed and noise updates, in commit order; keep the rest."""
    deltas = [u.delta for u in inputs.updates]
    count = len(deltas)
    flags = [0] * count
    notes: dict[int, str] = {}
    # The updates' directions (K, P), divided in place: every test below is blind to an
    # update's length, and a second matrix beside it would be gigabytes at scale.
    unit = flatten_rows(deltas, dtype=torch.float64)
    unit /= torch.clamp(torch.tensor(norms, dtype=torch.float64), min=1e-300).unsqueeze(1)
    cosine = unit @ unit.T
    median_norm = statistics.median(norms)
    public = _orthonormal([flatten(s, dtype=torch.float64) for s in inputs.public_steps])
    previous = [
        None if u.previous is None else flatten(u.previous, dtype=torch.float64)
        for u in inputs.updates
    ]
    replays = _cosines_with(unit, previous)  # (K, K): update k against j's of the round before
    kept: list[int] = []
    for k in range(count):
        if norms[k] <= policy.zero_tolerance * median_norm or norms[k] == 0.0:
            flags[k] |= Flag.ZERO_UPDATE
            notes[k] = "the update changes nothing"
            continue
        u_hash = inputs.updates[k].update_hash
        earlier = next((j for j in kept if inputs.updates[j].update_hash == u_hash), None)
        if earlier is not None:
            flags[k] |= Flag.DUPLICATE_UPDATE
            notes[k] = (
                f"byte-identical to update {inputs.updates[earlier].update_hash}, committed earlier"
            )
            continue
        copied = next((j for j in kept if abs(float(cosine[k, j])) >= policy.copy_cosine), None)
        if copied is not None:
            flags[k] |= Flag.COPIED_UPDATE
            notes[k] = (
                f"a rescaled copy (cosine {float(cosine[k, copied]):+.4f}) of update "
                f"{inputs.updates[copied].update_hash}, committed earlier"
            )
            continue
        replay = _replayed(inputs, replays[k], k, unit[k], public, policy)
        if replay is not None:
            flags[k] |= Flag.COPIED_UPDATE
            notes[k] = replay
            continue
        kept.append(k)
    # Pure noise: the cosine of a random direction with any fixed one is about N(0, 1/P), so
    # z = cos * sqrt(P) is about N(0, 1). An update within noise_sigmas of 0 against the sum
    # of the others' directions, against the organisation's own previous update and against
    # the validation set's descent direction carries no signal. All three, because honest
    # updates on very different data can be unaligned with the others in a round (a label-
    # skewed organisation in round 1, with no previous update), but an organisation training
    # on the same data keeps its direction from one round to the next (z in the tens), and
    # training on any labelled data lowers the validation loss too, while fresh noise does
    # neither.
    descent = flatten(
        descent_direction(
            inputs.model,
            inputs.base,
            inputs.x_val,
            inputs.y_val,
            regression=policy.metric == "neg_mse",
        ),
        dtype=torch.float64,
    )
    allowed = _dp_noise_norms(inputs, unit.shape[1], policy)

    def unaligned(found: dict[int, _Alignment], why: Callable[[int], str]) -> list[int]:
        """Flag the updates ``found`` as noise (``why`` k: what the note says first) and
        return the kept ones left."""
        for k, z in found.items():
            if norms[k] <= allowed[k]:
                continue  # as noisy as DP makes an honest update: the game prices it
            flags[k] |= Flag.UNALIGNED_UPDATE
            notes[k] = why(k) + _noise_note(z, policy) + _dp_note(norms[k], allowed[k], policy)
        return [k for k in kept if not flags[k] & Flag.UNALIGNED_UPDATE]

    if len(kept) > 1:
        kept = unaligned(_noise(unit, previous, descent, kept, policy), lambda k: "")
    # The public step dressed up with noise: take the public global steps out of every update
    # (and out of the directions it is tested against); one whose remainder is noise by the
    # test above added nothing to what anyone could upload, however small that noise. An
    # honest update's remainder carries what its data says this round, which lines up with
    # the others', with its own of the round before or with the validation set's descent.
    if len(kept) > 1 and public.shape[0]:
        private = _residual(unit, public)
        left = torch.linalg.vector_norm(private, dim=1) / torch.linalg.vector_norm(unit, dim=1)
        own_private = [None if p is None else _residual(p[None], public)[0] for p in previous]
        private_descent = _residual(descent[None], public)[0]
        kept = unaligned(
            _noise(_unit(private), own_private, private_descent, kept, policy),
            lambda k: (
                f"the public global steps leave {float(left[k]):.0%} of it, and that part is "
            ),
        )
    if len(kept) > 1:
        sources = _noisy_replays(inputs, unit, previous, descent, public, replays, kept, policy)
        kept = unaligned(
            {k: z for k, (_, z) in sources.items()},
            lambda k: (
                f"a noisy replay of the update of {inputs.updates[sources[k][0]].organisation} of "
                f"the round before (cosine {float(replays[k, sources[k][0]]):+.3f}): what is left "
                "once that update is taken out is "
            ),
        )
    groups = twin_groups(cosine, kept, policy)
    for group in groups:
        for k in group[1:]:
            notes[k] = (
                f"counted as one with update {inputs.updates[group[0]].update_hash}, committed "
                f"earlier (cosine {float(cosine[k, group[0]]):+.4f}: the same records): their "
                "mean is in the game and the aggregate once, and they share its value"
            )
    return Screening(kept=kept, flags=flags, notes=notes, groups=groups)


def twin_groups(cosine: Tensor, kept: Sequence[int], policy: PricingPolicy) -> list[list[int]]:
    """The kept updates in groups of twins, in commit order: an update at least
    ``twin_cosine`` alike to the first of an earlier group joins it, else starts its own.

    Two organisations training on the same records send updates 0.97-0.999 alike (distinct
    shares of a task: at most 0.86 on digits, 0.97 on breast cancer, measured). Counted twice,
    their records pull the aggregate twice as hard, every later model already carries them
    twice, and what their updates add to it is worth less each round: the organisation whose
    records were copied lost about half its pay to the copy (docs/benchmarks.md, section 6).
    Counted once, the pair is paid the value of the records once, shared."""
    groups: list[list[int]] = []
    for k in kept:
        leader = None
        if policy.twin_cosine is not None:
            leader = next((g for g in groups if float(cosine[k, g[0]]) >= policy.twin_cosine), None)
        if leader is None:
            groups.append([k])
        else:
            leader.append(k)
    return groups


def player_inputs(
    inputs: RoundInputs, clipping: Clipping, groups: Sequence[Sequence[int]]
) -> tuple[list[Tensors], list[int]]:
    """Each group's update (its members' clipped updates averaged) and sample count (their
    mean, rounded, at least 1): what the game and the aggregate take as one player."""
    deltas: list[Tensors] = []
    counts: list[int] = []
    for group in groups:
        if len(group) == 1:
            deltas.append(clipping.inputs[group[0]])
        else:
            members = [clipping.inputs[k] for k in group]
            deltas.append({n: torch.stack([m[n] for m in members]).mean(dim=0) for n in members[0]})
        counts.append(max(1, round(statistics.fmean(inputs.updates[k].num_samples for k in group))))
    return deltas, counts


NOISY_REPLAY_COSINE = 0.3
"""|cosine| with another organisation's update of the round before from which an update is
tested for being that update plus noise (``_noisy_replays``)."""

NOT_A_SOURCE = Flag.DUPLICATE_UPDATE | Flag.COPIED_UPDATE | Flag.UNALIGNED_UPDATE
"""An update of the round before flagged with any of these was not its sender's data (a copy,
a replay, noise): an update close to it is not tested as its noisy replay. (Otherwise an
organisation whose update of two rounds before was replayed the round before would be tested
against its own older update.)"""


def _noisy_replays(
    inputs: RoundInputs,
    unit: Tensor,
    previous: Sequence[Tensor | None],
    descent: Tensor,
    public: Tensor,
    replays: Tensor,
    kept: Sequence[int],
    policy: PricingPolicy,
) -> dict[int, tuple[int, _Alignment]]:
    """Kept updates that are another organisation's update of the round before plus noise,
    with whose and their z: for an update within ``NOISY_REPLAY_COSINE`` of one (not itself
    flagged ``NOT_A_SOURCE`` the round before), and closer to it than to its own update of
    the round before and to the others' of this round (their directions summed), that update
    and the public steps are taken out of it and of what it is tested against (the others'
    directions, its own previous update, the descent direction); a remainder no more aligned
    than noise added nothing to what the round before had published.

    An organisation's own previous update is not taken out: honest updates of consecutive
    rounds on the same data line up, and that is what keeps a label-skewed one."""
    scale = _noise_scale(unit, policy)
    if scale is None:
        return {}
    total, consensus_of = _consensus(unit, kept)
    found: dict[int, tuple[int, _Alignment]] = {}
    for k in kept:
        closest = [
            (abs(c), j)
            for j, c in enumerate(replays[k].tolist())
            if j != k
            and abs(c) >= NOISY_REPLAY_COSINE  # False for NaN: no update the round before
            and not inputs.updates[j].previous_flags & NOT_A_SOURCE
        ]
        own_cosine = abs(float(replays[k, k]))
        if math.isnan(own_cosine):  # no update of its own the round before
            own_cosine = 0.0
        consensus = abs(consensus_of[k])
        if not closest or max(closest)[0] <= max(own_cosine, consensus):
            # Closer to its own update of the round before, or to this round's others: what
            # training on data does; a replay is closest to what it replays.
            continue
        _, j = max(closest)
        source = previous[j]
        assert source is not None  # a cosine was taken with it
        basis = _orthonormal([*public, source])
        rest = _residual(torch.stack([unit[k], total - unit[k], descent]), basis)
        direction = _unit(rest[:1])[0]
        own = previous[k]
        z = _Alignment(
            others=scale * _cosine(direction, rest[1]),
            own=None if own is None else scale * _cosine(direction, _residual(own[None], basis)[0]),
            descent=scale * _cosine(direction, rest[2]),
        )
        if z.is_noise(policy.noise_sigmas):
            found[k] = (j, z)
    return found


def _cosines_with(units: Tensor, others: Sequence[Tensor | None]) -> Tensor:
    """cos(units[k], others[j]) for every k and j, in one product (NaN where others[j] is
    None, 0 where it is zero): (len(units), len(others))."""
    out = torch.full((units.shape[0], len(others)), math.nan, dtype=torch.float64)
    present = [j for j, other in enumerate(others) if other is not None]
    if present:
        stacked = torch.stack([other for other in others if other is not None])
        out[:, present] = units @ _unit(stacked).T
    return out


def _replayed(
    inputs: RoundInputs,
    replays: Tensor,
    k: int,
    unit: Tensor,
    public: Tensor,
    policy: PricingPolicy,
) -> str | None:
    """Why update k replays what came before (None if it does not): the public global steps
    (or a combination of them, |cosine| >= ``copy_cosine``), or an update of the round before,
    its own or another's (rescaled; ``replays``: k's cosines with them, ``_cosines_with``)."""
    if public.shape[0]:
        left = float(torch.linalg.vector_norm(_residual(unit[None], public)))
        if left <= math.sqrt(max(0.0, 1 - policy.copy_cosine**2)):
            return (
                f"a replay of the public global steps of the last {public.shape[0]} round(s) "
                f"(all but {left:.2g} of its direction): no data behind it"
            )
    for j, c in enumerate(replays.tolist()):
        if abs(c) >= REPLAY_COSINE:  # False for NaN: j had no update the round before
            whose = (
                "its own update" if j == k else f"the update of {inputs.updates[j].organisation}"
            )
            return f"a replay (cosine {c:+.4f}) of {whose} of the round before"
    return None


def _orthonormal(vectors: Sequence[Tensor]) -> Tensor:
    """An orthonormal basis (rows) of the span of ``vectors`` (float64, shape (d, P))."""
    if not vectors:
        return torch.zeros(0, 0, dtype=torch.float64)
    stacked = torch.stack(list(vectors))
    q, r = torch.linalg.qr(stacked.T)
    keep = torch.abs(torch.diagonal(r)) > 1e-12 * max(float(torch.abs(r).max()), 1e-300)
    basis: Tensor = q.T[keep]
    return basis


def _residual(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows`` (n, P) with their components in the span of ``basis`` (d, P) removed."""
    if basis.shape[0] == 0:
        return rows
    return rows - (rows @ basis.T) @ basis


def _unit(rows: Tensor) -> Tensor:
    return rows / torch.clamp(torch.linalg.vector_norm(rows, dim=1, keepdim=True), min=1e-300)


@dataclass(frozen=True)
class _Alignment:
    """z of an update's direction against the others', its own previous and the descent."""

    others: float
    own: float | None  # None without a previous update
    descent: float

    def is_noise(self, sigmas: float) -> bool:
        return all(abs(z) < sigmas for z in (self.others, self.descent, self.own or 0.0))


NOISE_TEST_MAX_COSINE = 0.5
"""The noise test abstains on models whose ``noise_sigmas`` threshold lies above this cosine
(fewer than (noise_sigmas / 0.5)^2 = 36 parameters at the default): there a random direction
is as often this aligned as an honest update is, so the test cannot tell them apart (a linear
regression on ten features flagged every honest update as noise)."""


def _noise(
    units: Tensor,
    previous: Sequence[Tensor | None],
    descent: Tensor,
    kept: Sequence[int],
    policy: PricingPolicy,
) -> dict[int, _Alignment]:
    """The kept updates (``units``: every update's direction) within ``noise_sigmas`` of 0 on
    every alignment, with their z; none when the model is too small for the test to tell
    (``NOISE_TEST_MAX_COSINE``)."""
    scale = _noise_scale(units, policy)
    if scale is None:
        return {}
    _, others = _consensus(units, kept)
    descent_norm = max(float(torch.linalg.vector_norm(descent)), 1e-300)
    towards_descent = (units @ descent / descent_norm).tolist()
    found: dict[int, _Alignment] = {}
    for k in kept:
        own = previous[k]
        z = _Alignment(
            others=scale * others[k],
            own=None if own is None else scale * _cosine(units[k], own),
            descent=scale * towards_descent[k],
        )
        if z.is_noise(policy.noise_sigmas):
            found[k] = z
    return found


def _noise_scale(units: Tensor, policy: PricingPolicy) -> float | None:
    """sqrt(P), which turns a cosine into its z under noise; None where the model is too small
    for the noise test to tell (``NOISE_TEST_MAX_COSINE``)."""
    scale = math.sqrt(units.shape[1])
    return None if policy.noise_sigmas / scale > NOISE_TEST_MAX_COSINE else scale


def _consensus(units: Tensor, kept: Sequence[int]) -> tuple[Tensor, list[float]]:
    """The kept rows of ``units`` summed, and each row's cosine with that sum less itself
    (its alignment with the others), by products with the whole (K, P) matrix only: a copy
    of it is gigabytes at scale. |total - u_k|^2 = |total|^2 - 2 u_k.total + |u_k|^2."""
    members = torch.zeros(units.shape[0], dtype=units.dtype)
    members[list(kept)] = 1.0
    total = members @ units
    dots = units @ total
    squares = torch.linalg.vector_norm(units, dim=1) ** 2
    rest = (float(total @ total) - 2 * dots + squares).clamp(min=0.0).sqrt()
    return total, ((dots - squares) / rest.clamp(min=1e-300)).tolist()


def _noise_note(z: _Alignment, policy: PricingPolicy) -> str:
    return (
        f"no more aligned than noise (|z| < {policy.noise_sigmas:g}) with the other "
        f"updates (z {z.others:+.2f})"
        + ("" if z.own is None else f", its own previous update (z {z.own:+.2f})")
        + f" or the validation set's descent direction (z {z.descent:+.2f}): no signal"
    )


def _dp_noise_norms(inputs: RoundInputs, num_params: int, policy: PricingPolicy) -> list[float]:
    """Per update, the norm up to which the noise screen keeps an unaligned update: with DP,
    ``dp_noise_multiple`` x the norm of the DP noise its declared sample count's training
    carries (Opacus adds it whatever the data, so an honest update is at least that long
    and, with little signal per round, as unaligned as noise); without DP, none (-1)."""
    noise = policy.privacy_noise
    if noise is None:
        return [-1.0] * len(inputs.updates)
    return [
        policy.dp_noise_multiple * noise.norm(u.num_samples, num_params) for u in inputs.updates
    ]


def _dp_note(norm: float, allowed: float, policy: PricingPolicy) -> str:
    if policy.privacy_noise is None:
        return ""
    return (
        f"; its norm {norm:.4g} is above {policy.dp_noise_multiple:g} x that of the task's DP "
        f"noise ({allowed / policy.dp_noise_multiple:.4g}), so DP does not explain it"
    )


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


def coalition_game(
    model: torch.nn.Module,
    base: Tensors,
    deltas: Sequence[Tensors],
    num_samples: Sequence[int],
    x_val: Tensor,
    y_val: Tensor,
    policy: PricingPolicy,
    *,
    device: torch.device | None = None,
    per_sample: bool = False,
) -> CoalitionUtility:
    """The coalition game ``value`` prices under ``policy`` (benchmarks price the same one)."""
    uniform = policy.valuation_weights == "uniform"
    return CoalitionUtility(
        model,
        base,
        deltas,
        [1] * len(deltas) if uniform else num_samples,
        x_val,
        y_val,
        eta=policy.eta,
        metric=policy.metric,
        device=device,
        per_sample=per_sample,
        max_multiple=None if uniform else policy.max_weight_multiple,
        rescale_steps=policy.coalition_steps == "rescaled",
    )


def value(
    inputs: RoundInputs,
    clipping: Clipping,
    kept: Sequence[int],
    policy: PricingPolicy,
    *,
    groups: Sequence[Sequence[int]] | None = None,
    valuator: Valuator | None = None,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Values:
    """Each kept organisation's Shapley value in the round's coalition game and its standard
    error over the validation samples, with a sampled valuator's own error added in quadrature
    (0 for the rest); ``progress`` is told (coalitions
    scored, coalitions asked) as the valuation goes. The players are ``groups`` of the kept
    updates (default: each alone; ``player_inputs``), and a group's value and error are
    shared equally by its members."""
    values = [0.0] * len(inputs.updates)
    errors = [0.0] * len(inputs.updates)
    if not kept:
        return Values(values=values, errors=errors, method="none", evaluations=0)
    players = [[k] for k in kept] if groups is None else [list(g) for g in groups]
    deltas, counts = player_inputs(inputs, clipping, players)
    drawn = validation_draw(len(inputs.y_val), len(players), policy, seed=inputs.round_id)
    utility = coalition_game(
        inputs.model,
        inputs.base,
        deltas,
        counts,
        inputs.x_val if drawn is None else inputs.x_val[drawn],
        inputs.y_val if drawn is None else inputs.y_val[drawn],
        policy,
        device=device,
        per_sample=True,
    )
    utility.on_progress = progress
    if valuator is None:
        valuator = choose_valuator(
            len(players),
            max_exact=policy.max_exact_players,
            max_evaluations=policy.valuation_budget_for(len(players)),
            stop_ratio=policy.valuation_stop_ratio,
        )
    result = valuator.value(utility, len(players), seed=inputs.round_id)
    per_sample = np.asarray(result.values, dtype=np.float64).reshape(len(players), -1)  # (K, n)
    samples = per_sample.shape[1]
    spread = per_sample.std(axis=1, ddof=1) if samples > 1 else np.zeros(len(players))
    sampling = np.zeros(len(players)) if result.errors is None else result.errors
    for i, group in enumerate(players):
        error = math.hypot(float(spread[i]) / math.sqrt(samples), float(sampling[i]))
        for k in group:
            values[k] = float(per_sample[i].mean()) / len(group)
            errors[k] = error / len(group)
    return Values(
        values=values, errors=errors, method=result.method, evaluations=result.evaluations
    )


def validation_draw(
    num_samples: int, num_players: int, policy: PricingPolicy, *, seed: int
) -> Tensor | None:
    """The validation samples a round's coalitions are scored on, when fewer than all
    (``valuation_samples``, for a round valued by sampling): sorted indices drawn without
    replacement from ``seed`` (the round), so the audit draws the same."""
    wanted = policy.valuation_samples
    if wanted is None or wanted >= num_samples or num_players <= policy.max_exact_players:
        return None
    picked = np.random.default_rng(seed).choice(num_samples, size=wanted, replace=False)
    return torch.from_numpy(np.sort(picked))


def clearly_negative(value: float, error: float, policy: PricingPolicy) -> bool:
    """Whether a value is more than ``negative_sigmas`` standard errors below zero."""
    return value + policy.negative_sigmas * error < 0


def aggregate_round(
    inputs: RoundInputs,
    clipping: Clipping,
    members: Sequence[int],
    policy: PricingPolicy,
    *,
    groups: Sequence[Sequence[int]] | None = None,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """The new global model from the ``members``' (clipped) updates by the policy's rule,
    twins (``groups`` of them, every member in ``members`` or none) counted once."""
    if not members:
        return {name: t.detach().to("cpu").clone() for name, t in inputs.base.items()}
    wanted = set(members)
    players = (
        [[k] for k in members] if groups is None else [list(g) for g in groups if g[0] in wanted]
    )
    deltas, counts = player_inputs(inputs, clipping, players)
    # The trim budget covers the round: updates already left out count towards it, so a round
    # whose attackers were screened out does not also lose honest minority updates.
    count = len(inputs.updates)
    left_out = count - len(members)
    trim = max(0, math.floor(round(policy.trim_fraction * count, 9)) - left_out)
    trim = min(trim, (len(players) - 1) // 2)  # twins counted once: fewer inputs to trim
    return aggregate(
        policy.aggregation,
        inputs.base,
        deltas,
        counts,
        eta=policy.eta,
        device=device,
        trim_fraction=trim / len(players),
        max_share=None
        if policy.max_weight_multiple is None
        else min(1.0, policy.max_weight_multiple / len(players)),
    )


def payable_values(values: Sequence[float], flags: Sequence[int]) -> list[float]:
    """The values a round pays for: positive ones of organisations that did not forfeit."""
    return [0.0 if f & FORFEITING else max(v, 0.0) for v, f in zip(values, flags, strict=True)]


def round_pool(
    policy: PricingPolicy, values: Sequence[float], flags: Sequence[int], gain: float
) -> int:
    """Token units a round pays in all: ``reward_per_gain`` x its measured ``gain``, at most
    ``reward_per_gain`` x the sum of the payable values (nobody is paid more than its own
    value is worth) and at most ``reward_per_round``; 0 for a round that gained nothing."""
    worth = min(max(gain, 0.0), math.fsum(payable_values(values, flags)))
    return min(policy.reward_per_round, math.floor(policy.reward_per_gain * worth))


def pay(
    policy: PricingPolicy, values: Sequence[float], flags: Sequence[int], gain: float
) -> list[int]:
    """The round's pool (``round_pool``) split pro rata to payable values in exact units."""
    return split_rewards(round_pool(policy, values, flags, gain), payable_values(values, flags))


def close_books(
    inputs: RoundInputs,
    policy: PricingPolicy,
    *,
    valuator: Valuator | None = None,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Books:
    """Screen, clip, value, aggregate and pay one round: deterministic for given inputs
    (``progress``: see ``value``)."""
    updates = inputs.updates
    if not updates:
        raise ValueError("a round needs at least one update to close its books")
    deltas = [u.delta for u in updates]
    hashes = [u.update_hash for u in updates]
    norms = [l2_norm(d) for d in deltas]
    if not all(math.isfinite(n) for n in norms):
        raise ValueError("updates must be finite to be priced")

    screening = screen(inputs, norms, policy)
    flags, notes = list(screening.flags), dict(screening.notes)
    kept = screening.kept
    clipping = clip(deltas, norms, kept, policy)
    for k in clipping.clipped:
        flags[k] |= Flag.NORM_CLIPPED
        notes[k] = f"norm {norms[k]:.4g} above the round's bound {clipping.bound:.4g}: clipped"
    groups = screening.groups
    values = value(
        inputs,
        clipping,
        kept,
        policy,
        groups=groups,
        valuator=valuator,
        device=device,
        progress=progress,
    )
    for k in kept:
        v, error = values.values[k], values.errors[k]
        if clearly_negative(v, error, policy):
            flags[k] |= Flag.NEGATIVE_CONTRIBUTION
            notes.setdefault(
                k,
                f"contribution {v:+.4g} ± {error:.2g} (standard error), more than "
                f"{policy.negative_sigmas:g} below zero: made the model worse",
            )
    members = [
        k for k in kept if not (policy.exclude_negative and flags[k] & Flag.NEGATIVE_CONTRIBUTION)
    ]
    params = aggregate_round(inputs, clipping, members, policy, groups=groups, device=device)
    before = evaluate_params(inputs.model, inputs.base, inputs.x_val, inputs.y_val, policy.metric)
    after = evaluate_params(inputs.model, params, inputs.x_val, inputs.y_val, policy.metric)
    rewards = pay(policy, values.values, flags, after - before)

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
        errors=values.errors,
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
        accuracy=None
        if policy.metric == "neg_mse"
        else evaluate_params(inputs.model, params, inputs.x_val, inputs.y_val, "accuracy"),
        utility=after,
        gain=after - before,
        valuation=ValuationRecord(
            method=f"{values.method}:{policy.metric}",
            seed=inputs.round_id,
            validation_hash=inputs.validation_hash,
        ),
        tree=tree,
        notes=notes,
    )

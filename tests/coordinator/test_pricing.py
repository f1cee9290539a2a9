"""How a round is priced, on small real federations (digits, 10 organisations, real training).

Free-riders and attackers: an organisation uploading nothing, noise, a copy of another's update
or a boosted update earns at most 1% of the budget and is flagged; two attackers of ten cannot
cost the model more than 2 points of accuracy; a lie about the sample count buys next to nothing.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fedledger.coordinator.books import RoundInputs, UpdateInput, close_books
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.onchain import Flag, flag_names
from fedledger.incentive.tensors import flatten
from fedledger.simulation import (
    Attack,
    Federation,
    address_of,
    copy_of,
    noise,
    replay_global_step,
    replay_update,
    run_federation,
    scaled,
    sign_flip,
    zero,
)
from fedledger.tasks import DigitsTask

pytestmark = pytest.mark.slow

FREE_RIDER = 4
VICTIM = 3  # commits before the free-rider; copies are of its update


@functools.cache
def clean(rounds: int, aggregation: str = "fedavg") -> Federation:
    return run_federation(rounds=rounds, policy=PricingPolicy(aggregation=aggregation))  # type: ignore[arg-type]


# ------------------------------------------------------------------ free-riders


@pytest.mark.parametrize(
    ("attack", "flag"),
    [
        (zero, Flag.ZERO_UPDATE),
        (noise, Flag.UNALIGNED_UPDATE),
        (copy_of(VICTIM), Flag.DUPLICATE_UPDATE),
        (copy_of(VICTIM, factor=3.0), Flag.COPIED_UPDATE),
        (copy_of(VICTIM, factor=-0.5), Flag.COPIED_UPDATE),
        (scaled(100.0), Flag.NORM_CLIPPED),
    ],
    ids=["zero", "noise", "byte-identical", "copy-x3", "copy-x-0.5", "boosted-x100"],
)
def test_free_riders_earn_at_most_one_percent_and_are_flagged(attack: Attack, flag: Flag) -> None:
    rounds = 8
    fed = run_federation(rounds=rounds, attacks={FREE_RIDER: attack})
    assert fed.paid_share([FREE_RIDER]) <= 0.01
    assert fed.flagged(FREE_RIDER, flag) == rounds
    # The flag reaches the round's notes in words; nobody honest is flagged for the same reason.
    for priced in fed.rounds:
        assert flag.name is not None and flag.name.lower() in flag_names(priced.flags[FREE_RIDER])
        assert FREE_RIDER in priced.notes
        assert not any(priced.flags[k] & flag for k in range(10) if k != FREE_RIDER)
    # The rewards go to the others, the copied organisation included.
    assert fed.paid_share([k for k in range(10) if k != FREE_RIDER]) >= 0.99
    assert fed.paid_share([VICTIM]) > 0.0


@pytest.mark.parametrize(
    ("attack", "flag"),
    [
        (replay_global_step(), Flag.COPIED_UPDATE),
        (replay_global_step(noise_ratio=0.1), Flag.UNALIGNED_UPDATE),
        (replay_global_step(noise_ratio=1.0), Flag.UNALIGNED_UPDATE),
        (replay_update(VICTIM), Flag.COPIED_UPDATE),
        (replay_update(VICTIM, noise_ratio=1.0), Flag.UNALIGNED_UPDATE),
        (replay_update(FREE_RIDER), Flag.COPIED_UPDATE),
    ],
    ids=[
        "global-step",
        "global-step+10%-noise",
        "global-step+100%-noise",
        "another's-last-update",
        "another's-last-update+100%-noise",
        "own-last-update",
    ],
)
def test_replaying_what_came_before_earns_nothing(attack: Attack, flag: Flag) -> None:
    """A data-less organisation uploading the last public global step (as is, or with noise of
    10% or 100% of its norm), or an update of the round before (another's, as is or with noise
    of its norm, or its own), is flagged in every round after the first (in the first it has
    nothing to replay and sends noise) and paid under 1%; no honest organisation is taken for
    a replayer."""
    rounds = 6
    fed = run_federation(rounds=rounds, attacks={FREE_RIDER: attack})
    assert fed.paid_share([FREE_RIDER]) <= 0.01
    assert fed.flagged(FREE_RIDER, flag) >= rounds - 1
    for priced in fed.rounds[1:]:
        note = priced.notes[FREE_RIDER]
        assert priced.flags[FREE_RIDER] & flag
        assert "replay" in note or "the public global steps leave" in note
        assert not any(priced.flags[k] for k in range(10) if k != FREE_RIDER)
    assert fed.accuracy >= clean(rounds).accuracy - 0.01


def test_declaring_a_trillion_samples_does_not_take_over_the_model() -> None:
    """Two defences, each enough alone. Capped at 3x the uniform weight (0.3 of ten), the
    liar's update cannot be the model. Uncapped, it is all of every coalition model it is in,
    so the game sees what it does to the model: clearly harmful (its 72 samples are label-
    skewed), flagged negative_contribution and left out. Either way the model stays within 2
    points of the honest run."""
    rounds = 8
    honest = clean(rounds)
    liar = run_federation(rounds=rounds, declared={FREE_RIDER: 10**12})
    assert liar.accuracy >= honest.accuracy - 0.02
    uncapped = run_federation(
        rounds=rounds, declared={FREE_RIDER: 10**12}, policy=PricingPolicy(max_weight_multiple=None)
    )
    assert uncapped.accuracy >= honest.accuracy - 0.02
    assert uncapped.flagged(FREE_RIDER, Flag.NEGATIVE_CONTRIBUTION) >= rounds // 2
    assert uncapped.paid_share([FREE_RIDER]) <= 0.01


def test_lying_about_the_sample_count_buys_at_most_a_few_percent() -> None:
    rounds = 8
    honest = clean(rounds)
    share = honest.paid_share([FREE_RIDER])
    inflated = run_federation(
        rounds=rounds, declared={FREE_RIDER: 10 * honest.num_samples[FREE_RIDER]}
    )
    assert inflated.num_samples[FREE_RIDER] == 10 * honest.num_samples[FREE_RIDER]
    assert share > 0.02  # an organisation with something to gain
    assert inflated.paid_share([FREE_RIDER]) <= share * 1.05 + 0.005


# ------------------------------------------------------------------ model replacement (#18)


def test_a_boosted_update_is_clipped_flagged_and_moves_the_model_at_most_the_bound() -> None:
    task = DigitsTask()
    model = task.build_model(seed=0)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x_val, y_val = task.validation_data()
    gen = torch.Generator().manual_seed(0)
    common = {n: 0.01 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
    # Six updates aligned with each other, as real ones are; the third is boosted x100.
    deltas = [
        {n: t + 0.003 * torch.randn(t.shape, generator=gen) for n, t in common.items()}
        for _ in range(6)
    ]
    deltas[2] = {n: 100.0 * t for n, t in deltas[2].items()}
    hashes = ["0x" + encode_tensors(d)[1].hex() for d in deltas]

    updates = [
        UpdateInput(address_of(k), digest, 50, delta)
        for k, (digest, delta) in enumerate(zip(hashes, deltas, strict=True))
    ]
    inputs = RoundInputs(1, model, base, updates, x_val, y_val)

    def moved(policy: PricingPolicy) -> tuple[float, float | None, list[int]]:
        books = close_books(inputs, policy, device=torch.device("cpu"))
        step = float((flatten(books.params) - flatten(base)).norm())
        return step, books.norm_bound, books.flags

    step, bound, flags = moved(PricingPolicy())
    assert bound is not None
    assert flags[2] & Flag.NORM_CLIPPED and all(f == 0 for i, f in enumerate(flags) if i != 2)
    assert step <= bound * (1 + 1e-5)  # eta = 1: a convex combination of clipped updates
    unclipped, _, _ = moved(PricingPolicy(clip_multiplier=None, exclude_negative=False))
    assert unclipped > 5 * bound  # what the bound prevented: the attacker alone moves it ~16x


# ------------------------------------------------------------------ two attackers of ten (#19)

ATTACKERS = [2, 3]  # the two largest partitions of the split: a third of the data
# Sign flips under median or trimmed mean are left out on purpose: the flippers are screened
# out every round, and those rules then aggregate the remaining two thirds of the data without
# sample weights, 4 to 7 points below their clean runs (docs/faults.md has the figures).


@pytest.mark.parametrize(
    ("attack", "aggregation"),
    [
        (sign_flip, "fedavg"),
        (scaled(10.0), "fedavg"),
        (scaled(10.0), "trimmed_mean"),
        (scaled(10.0), "median"),
    ],
    ids=["sign-flip", "x10", "x10-trimmed", "x10-median"],
)
def test_two_attackers_cost_under_two_points_and_earn_under_one_percent(
    attack: Attack, aggregation: str
) -> None:
    rounds = 30
    baseline = clean(rounds, aggregation)
    fed = run_federation(
        rounds=rounds,
        attacks=dict.fromkeys(ATTACKERS, attack),
        policy=PricingPolicy(aggregation=aggregation),  # type: ignore[arg-type]
    )
    assert baseline.accuracy >= 0.85
    assert fed.accuracy >= baseline.accuracy - 0.02
    assert fed.paid_share(ATTACKERS) <= 0.01


# ------------------------------------------------------------------ above max_exact_players


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0] * len(values)
    for rank, k in enumerate(order):
        ranks[k] = rank
    return ranks


def test_above_max_exact_the_sampled_valuator_prices_the_round() -> None:
    """With max_exact_players=4, ten organisations are valued by the sampled valuator within
    its budget, close to exact Shapley, and attackers still earn nothing."""
    sampled = PricingPolicy(max_exact_players=4, valuation_budget=200)
    exact_round = clean(1).rounds[0]
    fed = run_federation(rounds=6, policy=sampled, attacks=dict.fromkeys(ATTACKERS, sign_flip))
    assert all(r.method == "stratified-kernel" and r.evaluations <= 200 for r in fed.rounds)
    assert exact_round.method == "exact" and exact_round.evaluations == 1024
    assert fed.paid_share(ATTACKERS) <= 0.01

    first = run_federation(rounds=1, policy=sampled).rounds[0]
    a, b = _ranks(first.values), _ranks(exact_round.values)
    n = len(a)
    spearman = 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / (n * (n * n - 1))
    assert spearman >= 0.9

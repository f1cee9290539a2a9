"""Robust aggregation and norm clipping as the books run them: hand-computed median and trimmed
mean, ``clip_by_norm``, the books' ``clip`` step (bound from the round's median norm), outliers,
refusals."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from fedledger.coordinator.aggregation import (
    aggregate,
    clip_by_norm,
    coordinate_median,
    fedavg,
    trimmed_mean,
)
from fedledger.coordinator.books import clip
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.tensors import l2_norm
from fedledger.incentive.utility import capped_weights

CPU = torch.device("cpu")
SHAPES = {"w": (2, 3), "b": (3,)}
SIZE = sum(math.prod(s) for s in SHAPES.values())

# No subnormals: a library loaded into the same process may set flush-to-zero (a process-wide
# CPU flag), and these properties are about the aggregation rules, not about IEEE underflow.
finite = st.floats(
    min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False
)
flat_delta = st.lists(finite, min_size=SIZE, max_size=SIZE)


def from_flat(values: list[float]) -> dict[str, Tensor]:
    flat = torch.tensor(values, dtype=torch.float32)
    return {"b": flat[:3].clone(), "w": flat[3:].reshape(2, 3).clone()}


def random_state(seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: a[name].double() - b[name].double() for name in a}


def scalars(*values: float) -> list[dict[str, Tensor]]:
    return [{"x": torch.tensor([v])} for v in values]


# ------------------------------------------------------------------ hand computations


def test_median_hand_computed() -> None:
    base = {"x": torch.tensor([10.0, 0.0])}
    deltas = [
        {"x": torch.tensor([1.0, -5.0])},
        {"x": torch.tensor([7.0, 2.0])},
        {"x": torch.tensor([3.0, 100.0])},
        {"x": torch.tensor([-40.0, 1.0])},
        {"x": torch.tensor([2.0, 3.0])},
    ]
    # Sorted per coordinate: [-40, 1, 2, 3, 7] -> 2 and [-5, 1, 2, 3, 100] -> 2.
    assert coordinate_median(base, deltas, device=CPU)["x"].tolist() == [12.0, 2.0]
    # An even count averages the two middle values: [1, 3, 7, -40] -> (1 + 3) / 2.
    four = coordinate_median(base, deltas[:4], eta=0.5, device=CPU)
    assert four["x"].tolist() == [10.0 + 0.5 * 2.0, 0.0 + 0.5 * 1.5]


def test_trimmed_mean_hand_computed() -> None:
    base = {"x": torch.tensor([0.0])}
    deltas = scalars(1.0, 2.0, 3.0, 4.0, 100.0)
    # beta = 0.2 of 5 drops one from each end: mean(2, 3, 4) = 3.
    assert trimmed_mean(base, deltas, trim_fraction=0.2, device=CPU)["x"].item() == 3.0
    # beta = 0.1 of 5 drops none (floor 0.5 = 0): the plain mean, 110 / 5 = 22.
    assert trimmed_mean(base, deltas, trim_fraction=0.1, device=CPU)["x"].item() == 22.0
    # beta = 0.4 of 5 drops two from each end: the median.
    assert trimmed_mean(base, deltas, trim_fraction=0.4, device=CPU)["x"].item() == 3.0
    # beta = 0.3 of 10 drops 3 from each end: mean(1, 2, 3, 4) = 2.5, times eta = 2.
    ten = scalars(-50.0, -9.0, -8.0, 1.0, 2.0, 3.0, 4.0, 70.0, 80.0, 90.0)
    assert trimmed_mean(base, ten, trim_fraction=0.3, eta=2.0, device=CPU)["x"].item() == 5.0
    # beta = 0.29 of 100 drops 29 from each end although 0.29 * 100 < 29 in float64.
    squares = scalars(*(float(k * k) for k in range(100)))
    expected = sum(k * k for k in range(29, 71)) / 42
    out = trimmed_mean(base, squares, trim_fraction=0.29, device=CPU)["x"].item()
    assert out == pytest.approx(expected, rel=1e-6)


def test_sample_counts_do_not_weight_the_robust_methods() -> None:
    base = {"x": torch.tensor([0.0])}
    deltas = scalars(0.0, 1.0, 10.0)
    for method in ("median", "trimmed_mean"):
        light = aggregate(method, base, deltas, [1, 1, 1], trim_fraction=0.0, device=CPU)
        heavy = aggregate(method, base, deltas, [1000, 1, 1], trim_fraction=0.0, device=CPU)
        assert torch.equal(light["x"], heavy["x"])
    # FedAvg does weight them: (1000 * 0 + 1 + 10) / 1002.
    weighted = aggregate("fedavg", base, deltas, [1000, 1, 1], device=CPU)["x"]
    assert weighted.item() == pytest.approx(11 / 1002)


def test_aggregate_fedavg_is_fedavg() -> None:
    base = random_state(0)
    deltas = [random_state(k + 1) for k in range(4)]
    result = aggregate("fedavg", base, deltas, [5, 1, 9, 3], eta=0.7, device=CPU)
    expected = fedavg(base, deltas, [5, 1, 9, 3], eta=0.7, device=CPU)
    for name in base:
        assert torch.equal(result[name], expected[name])


def test_dtypes_shapes_and_layout_preserved() -> None:
    base = {
        "double": torch.ones(4, dtype=torch.float64),
        "count": torch.tensor(7, dtype=torch.int64),
        "t": torch.ones(3, 2).t(),  # non-contiguous
    }
    deltas = [
        {
            "double": torch.full((4,), 1e-12 * k, dtype=torch.float64),
            "count": torch.tensor(k, dtype=torch.int64),
            "t": torch.full((2, 3), float(k)),
        }
        for k in (1, 2, 3)
    ]
    for method in ("fedavg", "median", "trimmed_mean"):
        out = aggregate(method, base, deltas, [1, 1, 1], device=CPU)
        assert list(out) == sorted(base)
        for name, ref in base.items():
            assert out[name].dtype == ref.dtype
            assert out[name].shape == ref.shape
            assert out[name].is_contiguous()
            assert out[name].device.type == "cpu"
        assert out["count"].item() == 9
        assert torch.all(out["double"] == 1.0 + 2e-12)


def test_inputs_are_not_modified() -> None:
    base = random_state(0)
    deltas = [random_state(1), random_state(2, scale=100.0), random_state(3)]
    before = [{k: v.clone() for k, v in d.items()} for d in [base, *deltas]]
    for method in ("fedavg", "median", "trimmed_mean"):
        aggregate(method, base, deltas, [1, 2, 3], device=CPU)
    clip(deltas, [l2_norm(d) for d in deltas], [0, 1, 2], PricingPolicy(clip_multiplier=1.0))
    for original, kept in zip([base, *deltas], before, strict=True):
        for name in original:
            assert torch.equal(original[name], kept[name])


# ------------------------------------------------------------------ norm clipping


@settings(max_examples=60, deadline=None)
@given(flat_delta, st.floats(min_value=1e-3, max_value=1e4))
def test_clipping_bounds_the_norm_and_keeps_small_deltas(values: list[float], bound: float) -> None:
    delta = from_flat(values)
    clipped, norm = clip_by_norm(delta, bound), l2_norm(delta)
    assert clip_by_norm(delta, bound, norm=norm).keys() == clipped.keys()
    assert l2_norm(clipped) <= bound * (1 + 1e-6)
    if norm <= bound:
        assert all(clipped[name] is delta[name] for name in delta)
    else:
        # Same direction, length exactly the bound (up to float32 rounding).
        assert l2_norm(clipped) == pytest.approx(bound, rel=1e-6)
        scale = bound / norm
        for name in delta:
            torch.testing.assert_close(clipped[name], delta[name] * scale)


def test_clipping_a_zero_delta_is_a_no_op() -> None:
    zero = {"x": torch.zeros(3)}
    assert torch.equal(clip_by_norm(zero, 1.0)["x"], zero["x"])


def test_clip_bound_is_the_multiple_of_the_kept_median_norm_and_robust() -> None:
    norms = [3.0, 1.0, 2.0, 4.0]  # median (2 + 3) / 2 = 2.5
    deltas = [{"x": torch.tensor([n])} for n in norms]
    clipping = clip(deltas, norms, [0, 1, 2, 3], PricingPolicy(clip_multiplier=2.0))
    assert clipping.bound == 5.0 and clipping.clipped == []
    # Only the kept (screened-in) updates set the bound: without the 1.0 and the 2.0 it is 7.
    clipping = clip(deltas, norms, [0, 3], PricingPolicy(clip_multiplier=2.0))
    assert clipping.bound == 7.0 and set(clipping.inputs) == {0, 3}
    # Two of five updates boosted a million-fold cannot move the bound beyond the honest norms.
    honest = [random_state(k) for k in range(3)]
    boosted = [random_state(10, scale=1e6), random_state(11, scale=1e6)]
    everyone = [*honest, *boosted]
    honest_norms = [l2_norm(d) for d in honest]
    clipping = clip(
        everyone, [l2_norm(d) for d in everyone], range(5), PricingPolicy(clip_multiplier=1.0)
    )
    assert clipping.bound is not None
    assert min(honest_norms) <= clipping.bound <= max(honest_norms)
    assert set(clipping.clipped) >= {3, 4}
    for k in clipping.clipped:
        assert l2_norm(clipping.inputs[k]) == pytest.approx(clipping.bound, rel=1e-6)
    assert clip(everyone, [1.0] * 5, range(5), PricingPolicy(clip_multiplier=None)).bound is None


# ------------------------------------------------------------------ order invariance


@settings(max_examples=30, deadline=None)
@given(
    st.lists(flat_delta, min_size=1, max_size=7),
    st.sampled_from(["fedavg", "median", "trimmed_mean"]),
    st.floats(min_value=0.0, max_value=0.49),
    st.randoms(use_true_random=False),
)
def test_order_invariance(
    flat: list[list[float]], method: str, trim_fraction: float, rng: random.Random
) -> None:
    base = random_state(0)
    deltas = [from_flat(v) for v in flat]
    num_samples = [rng.randint(1, 100) for _ in deltas]
    norms = [l2_norm(d) for d in deltas]
    order = list(range(len(deltas)))
    rng.shuffle(order)
    policy = PricingPolicy(clip_multiplier=1.0)
    clipping = clip(deltas, norms, range(len(deltas)), policy)
    reordered = clip(
        [deltas[i] for i in order], [norms[i] for i in order], range(len(deltas)), policy
    )
    assert reordered.bound == clipping.bound
    assert sorted(order[i] for i in reordered.clipped) == clipping.clipped
    kwargs = {"trim_fraction": trim_fraction, "device": CPU}
    inputs = [clipping.inputs[k] for k in range(len(deltas))]
    out = aggregate(method, base, inputs, num_samples, **kwargs)  # type: ignore[arg-type]
    shuffled = aggregate(
        method,  # type: ignore[arg-type]
        base,
        [reordered.inputs[k] for k in range(len(deltas))],
        [num_samples[i] for i in order],
        **kwargs,  # type: ignore[arg-type]
    )
    # float32 sums depend on order (sorting does not): allow rounding relative to the terms.
    scale = max(1.0, *(float(t.abs().max()) for d in [base, *deltas] for t in d.values()))
    for name in base:
        if method == "fedavg":
            torch.testing.assert_close(out[name], shuffled[name], rtol=1e-5, atol=1e-6 * scale)
        else:
            assert torch.equal(out[name], shuffled[name])


# ------------------------------------------------------------------ attacks


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_model_replacement_is_clipped_flagged_and_bounded(eta: float) -> None:
    """One x100 delta among 5: clipped fedavg moves the model by at most its share of the bound."""
    base = random_state(0)
    honest = [random_state(k + 1, scale=0.01) for k in range(4)]
    attacker = {name: 100.0 * t for name, t in random_state(9, scale=0.01).items()}
    deltas = [honest[0], honest[1], attacker, honest[2], honest[3]]
    num_samples = [10, 20, 30, 40, 50]
    norms = [l2_norm(d) for d in deltas]
    clipping = clip(deltas, norms, range(5), PricingPolicy(clip_multiplier=2.0))
    bound = clipping.bound
    assert bound is not None and clipping.clipped == [2]
    assert norms[2] > 50 * bound  # the attack was two orders of magnitude over the bound
    clipped = [clipping.inputs[k] for k in range(5)]
    params = aggregate("fedavg", base, clipped, num_samples, eta=eta, device=CPU)

    # Without the attacker's contribution (its delta zeroed, the weights unchanged), the model
    # differs by eta * w_a * clip(delta_a), whose norm is at most eta * w_a * bound.
    zeroed = [*deltas[:2], {n: torch.zeros_like(t) for n, t in attacker.items()}, *deltas[3:]]
    without = fedavg(base, zeroed, num_samples, eta=eta, device=CPU)
    share = 30 / sum(num_samples)
    attack_move = l2_norm(diff(params, without))
    assert attack_move <= eta * share * bound * (1 + 1e-5)
    assert attack_move == pytest.approx(eta * share * bound, rel=1e-4)
    # Every clipped or unclipped delta has norm <= bound, so the whole step is <= eta * bound.
    assert l2_norm(diff(params, base)) <= eta * bound * (1 + 1e-5)
    # Unclipped, the same attack moves the model far more.
    plain = fedavg(base, deltas, num_samples, eta=eta, device=CPU)
    assert l2_norm(diff(plain, base)) > 10 * eta * bound


@settings(max_examples=50, deadline=None)
@given(
    st.lists(flat_delta, min_size=3, max_size=3),
    st.lists(
        st.lists(
            st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_subnormal=False),
            min_size=SIZE,
            max_size=SIZE,
        ),
        min_size=2,
        max_size=2,
    ),
    st.permutations(range(5)),
)
def test_two_of_five_arbitrary_outliers_stay_within_the_honest_range(
    honest_flat: list[list[float]], outlier_flat: list[list[float]], order: list[int]
) -> None:
    base = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    honest = [from_flat(v) for v in honest_flat]
    pool = [*honest, *(from_flat(v) for v in outlier_flat)]
    deltas = [pool[i] for i in order]
    stacked = {name: torch.stack([d[name] for d in honest]) for name in SHAPES}
    low = {name: s.min(dim=0).values for name, s in stacked.items()}
    high = {name: s.max(dim=0).values for name, s in stacked.items()}
    outputs = {
        "median": coordinate_median(base, deltas, device=CPU),
        # beta = 0.4 of 5 trims two from each end, so it tolerates two outliers too.
        "trimmed_mean": trimmed_mean(base, deltas, trim_fraction=0.4, device=CPU),
    }
    for out in outputs.values():
        for name in SHAPES:
            assert torch.all(out[name] >= low[name])
            assert torch.all(out[name] <= high[name])


def test_median_ignores_sign_flipped_and_scaled_minorities() -> None:
    base = random_state(0)
    honest = [random_state(1, scale=0.01) for _ in range(3)]  # identical honest updates
    flipped = {n: -10.0 * t for n, t in honest[0].items()}
    deltas = [honest[0], flipped, honest[1], flipped, honest[2]]
    out = aggregate("median", base, deltas, [1] * 5, device=CPU)
    expected = fedavg(base, honest, [1, 1, 1], device=CPU)
    for name in base:
        torch.testing.assert_close(out[name], expected[name])


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.7, 1.0, float("nan")])
def test_bad_trim_fractions_raise(bad: float) -> None:
    deltas = [random_state(1), random_state(2)]
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(random_state(0), deltas, trim_fraction=bad, device=CPU)
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregate("trimmed_mean", random_state(0), deltas, [1, 1], trim_fraction=bad, device=CPU)


def test_empty_input_raises() -> None:
    base = random_state(0)
    with pytest.raises(ValueError, match="at least one update"):
        coordinate_median(base, [], device=CPU)
    with pytest.raises(ValueError, match="at least one update"):
        trimmed_mean(base, [], trim_fraction=0.2, device=CPU)
    for method in ("fedavg", "median", "trimmed_mean"):
        with pytest.raises(ValueError, match="at least one update"):
            aggregate(method, base, [], [], device=CPU)


def test_other_refusals() -> None:
    base = random_state(0)
    deltas = [random_state(1), random_state(2)]
    with pytest.raises(ValueError, match="unknown aggregation method"):
        aggregate("krum", base, deltas, [1, 1], device=CPU)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample counts"):
        aggregate("median", base, deltas, [1], device=CPU)
    with pytest.raises(ValueError, match="num_samples"):
        aggregate("median", base, deltas, [1, 0], device=CPU)
    for bound in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            clip_by_norm(deltas[0], bound)
    poisoned = {"b": torch.tensor([1.0, float("nan"), 0.0]), "w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="finite"):
        clip_by_norm(poisoned, 1.0)
    wrong = random_state(1) | {"extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        coordinate_median(base, [wrong], device=CPU)


def test_default_device_matches_cpu() -> None:
    """With no device given, aggregation runs on CUDA when there is one, else on the CPU; either
    way the result comes back on the CPU and equals the CPU computation."""
    base = random_state(0)
    deltas = [random_state(k + 1) for k in range(5)]
    for method in ("fedavg", "median", "trimmed_mean"):
        cpu = aggregate(method, base, deltas, [1, 2, 3, 4, 5], device=CPU)
        default = aggregate(method, base, deltas, [1, 2, 3, 4, 5])
        for name in base:
            assert default[name].device.type == "cpu"
            torch.testing.assert_close(default[name], cpu[name])


# ------------------------------------------------------------------ capped FedAvg weights


def test_capped_weights_hand_computed() -> None:
    assert capped_weights([1, 1, 10**12], 0.5) == [0.25, 0.25, 0.5]
    assert capped_weights([10**12, 10**12, 1, 1], 0.3) == pytest.approx([0.3, 0.3, 0.2, 0.2])
    assert capped_weights([3, 1], 0.1) == [0.5, 0.5]  # below 1/K: uniform
    assert capped_weights([5, 3, 2], 1.0) == [0.5, 0.3, 0.2]  # no cap: n_k / n exactly
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_share"):
            capped_weights([1, 2], bad)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 10**15), min_size=1, max_size=12),
    st.floats(min_value=0.01, max_value=1.0),
)
def test_capped_weights_sum_to_one_respect_the_cap_and_keep_the_order(
    counts: list[int], cap: float
) -> None:
    weights = capped_weights(counts, cap)
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    bound = max(cap, 1 / len(counts))
    assert max(weights) <= bound * (1 + 1e-12)
    for i in range(len(counts)):
        for j in range(len(counts)):
            if counts[i] < counts[j]:
                assert weights[i] <= weights[j] * (1 + 1e-12)
    plain = [c / sum(counts) for c in counts]
    if max(plain) <= bound:
        assert weights == pytest.approx(plain, rel=1e-12)


def test_a_huge_declared_count_moves_fedavg_at_most_its_capped_share() -> None:
    base = {"x": torch.zeros(1)}
    deltas = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([1.0])}, {"x": torch.tensor([-9.0])}]
    liar = [10, 10, 10**12]
    uncapped = fedavg(base, deltas, liar, device=CPU)["x"].item()
    capped = fedavg(base, deltas, liar, device=CPU, max_share=0.5)["x"].item()
    assert uncapped == pytest.approx(-9.0, abs=1e-6)  # the liar is the model
    assert capped == pytest.approx(0.5 * 1.0 + 0.5 * -9.0)
    via_rule = aggregate("fedavg", base, deltas, liar, device=CPU, max_share=0.5)["x"].item()
    assert via_rule == capped

"""FedAvg aggregation: hand computations, a stack-based reference, order invariance, refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from fedledger.coordinator.aggregation import fedavg

CPU = torch.device("cpu")


def random_state(seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(5, 4, generator=gen),
        "layer.bias": torch.randn(5, generator=gen),
        "head.weight": torch.randn(3, 5, generator=gen),
    }


def stack_reference(
    base: dict[str, Tensor], deltas: list[dict[str, Tensor]], num_samples: list[int], eta: float
) -> dict[str, Tensor]:
    """w + eta * sum_k (n_k / n) delta_k with torch.stack, in float64."""
    n = torch.tensor(num_samples, dtype=torch.float64)
    weights = n / n.sum()
    out = {}
    for name, w in base.items():
        stacked = torch.stack([d[name].double() for d in deltas])
        weighted = (weights.view(-1, *([1] * w.dim())) * stacked).sum(0)
        out[name] = (w.double() + eta * weighted).to(w.dtype)
    return out


def test_hand_computed() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
    deltas = [
        {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor(1.0)},
        {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor(-1.0)},
    ]
    # Weights 1/4 and 3/4: w + [0.25, 3.0], b + (0.25 - 0.75).
    out = fedavg(base, deltas, [10, 30], device=CPU)
    assert out["w"].tolist() == [1.25, 5.0]
    assert out["b"].item() == 0.0
    # eta = 2 doubles the step.
    out2 = fedavg(base, deltas, [10, 30], eta=2.0, device=CPU)
    assert out2["w"].tolist() == [1.5, 8.0]
    assert out2["b"].item() == -0.5


def test_equals_stack_reference() -> None:
    base = random_state(0)
    deltas = [random_state(k + 1) for k in range(5)]
    num_samples = [3, 100, 17, 1, 60]
    out = fedavg(base, deltas, num_samples, eta=0.5, device=CPU)
    expected = stack_reference(base, deltas, num_samples, 0.5)
    assert list(out) == sorted(base)
    for name in base:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-6, atol=1e-6)


def test_default_device_returns_cpu_tensors() -> None:
    out = fedavg(random_state(0), [random_state(1)], [1])
    assert all(t.device.type == "cpu" for t in out.values())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=7),
    st.randoms(use_true_random=False),
)
def test_permutation_invariance(num_samples: list[int], rng: object) -> None:
    import random

    assert isinstance(rng, random.Random)
    base = random_state(0)
    deltas = [random_state(k + 10) for k in range(len(num_samples))]
    order = list(range(len(num_samples)))
    rng.shuffle(order)
    out = fedavg(base, deltas, num_samples, device=CPU)
    shuffled = fedavg(base, [deltas[i] for i in order], [num_samples[i] for i in order], device=CPU)
    # float32 sums depend on their order: allow a few ulps of the terms (|terms| < ~5 here,
    # an ulp of 4 is 4.8e-7), even where the result itself is near 0.
    for name in base:
        torch.testing.assert_close(out[name], shuffled[name], rtol=1e-6, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=0.01, max_value=10.0))
def test_eta_scales_the_step(eta: float) -> None:
    base = random_state(0)
    deltas = [random_state(1), random_state(2)]
    step1 = {k: v - base[k] for k, v in fedavg(base, deltas, [2, 5], eta=1.0, device=CPU).items()}
    step = {k: v - base[k] for k, v in fedavg(base, deltas, [2, 5], eta=eta, device=CPU).items()}
    for name in base:
        torch.testing.assert_close(step[name], eta * step1[name], rtol=1e-5, atol=1e-5)


def test_dtypes_shapes_and_layout_preserved() -> None:
    base = {
        "half": torch.ones(2, 3, dtype=torch.float16),
        "double": torch.ones(4, dtype=torch.float64),
        "count": torch.tensor(7, dtype=torch.int64),
        "t": torch.ones(3, 2).t(),  # non-contiguous
    }
    delta = {
        "half": torch.full((2, 3), 0.5, dtype=torch.float16),
        "double": torch.full((4,), 1e-12, dtype=torch.float64),
        "count": torch.tensor(2, dtype=torch.int64),
        "t": torch.ones(2, 3),
    }
    out = fedavg(base, [delta], [4], device=CPU)
    for name, ref in base.items():
        assert out[name].dtype == ref.dtype
        assert out[name].shape == ref.shape
        assert out[name].is_contiguous()
    assert out["count"].item() == 9
    assert torch.all(out["half"] == 1.5)
    # float64 stays float64: a float32 sum would lose the 1e-12.
    assert torch.all(out["double"] == 1.0 + 1e-12)


def test_inputs_are_not_modified() -> None:
    base = random_state(0)
    deltas = [random_state(1)]
    before = {k: v.clone() for k, v in base.items()}
    fedavg(base, deltas, [1], device=CPU)
    for name in base:
        assert torch.equal(base[name], before[name])


def test_empty_deltas_raise() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        fedavg(random_state(0), [], [], device=CPU)


def test_mismatched_names_raise() -> None:
    delta = random_state(1)
    del delta["head.weight"]
    with pytest.raises(ValueError, match=r"missing \['head.weight'\]"):
        fedavg(random_state(0), [delta], [1], device=CPU)
    extra = random_state(1) | {"extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        fedavg(random_state(0), [extra], [1], device=CPU)


def test_mismatched_shape_raises() -> None:
    delta = random_state(1)
    delta["layer.bias"] = torch.zeros(6)
    with pytest.raises(ValueError, match=r"layer\.bias"):
        fedavg(random_state(0), [delta], [1], device=CPU)


@pytest.mark.parametrize("bad", [[0], [-3], [1.5]])
def test_non_positive_sample_counts_raise(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        fedavg(random_state(0), [random_state(1)], bad, device=CPU)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="sample counts"):
        fedavg(random_state(0), [random_state(1)], [1, 2], device=CPU)

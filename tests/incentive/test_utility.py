"""Batched coalition utility: equal to scoring each explicitly built coalition model one at a time."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fedledger.incentive.shapley import ExactShapley, all_coalitions
from fedledger.incentive.utility import (
    CoalitionUtility,
    capped_weights,
    coalition_weights,
    evaluate_params,
    per_sample_scores,
)

K = 4
NUM_SAMPLES = [30, 10, 45, 15]
ETA = 0.7
CPU = torch.device("cpu")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor]:
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    deltas = [
        {name: 0.3 * torch.randn(t.shape, generator=gen) for name, t in base.items()}
        for _ in range(K)
    ]
    x = torch.randn(200, 64, generator=gen)
    y = torch.randint(0, 10, (200,), generator=gen)
    return model, base, deltas, x, y


def explicit_coalition_params(
    base: dict[str, Tensor], deltas: list[dict[str, Tensor]], members: list[int]
) -> dict[str, Tensor]:
    """w_r + eta * sum_{k in S} (n_k / n_S) delta_k built tensor by tensor (w_r when S is empty)."""
    if not members:
        return {name: t.clone() for name, t in base.items()}
    n_s = sum(NUM_SAMPLES[k] for k in members)
    return {
        name: t + ETA * sum(NUM_SAMPLES[k] / n_s * deltas[k][name] for k in members)
        for name, t in base.items()
    }


def utility_for(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
    metric: Literal["accuracy", "neg_log_loss"],
    max_batch: int = 256,
) -> CoalitionUtility:
    model, base, deltas, x, y = setup
    return CoalitionUtility(
        model,
        base,
        deltas,
        NUM_SAMPLES,
        x,
        y,
        eta=ETA,
        metric=metric,
        device=CPU,
        max_batch=max_batch,
    )


@pytest.mark.parametrize("metric", ["accuracy", "neg_log_loss"])
def test_batched_equals_one_at_a_time_for_every_coalition(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
    metric: Literal["accuracy", "neg_log_loss"],
) -> None:
    model, base, deltas, x, y = setup
    masks = all_coalitions(K)
    batched = utility_for(setup, metric)(masks)
    reference = np.array(
        [
            evaluate_params(
                model,
                explicit_coalition_params(base, deltas, np.flatnonzero(row).tolist()),
                x,
                y,
                metric,
            )
            for row in masks
        ]
    )
    assert batched.dtype == np.float64
    assert batched.shape == (2**K,)
    if metric == "accuracy":
        np.testing.assert_array_equal(batched, reference)
    else:
        np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-5)
    # The coalitions really differ, so the comparison is not vacuous.
    assert len(set(batched.tolist())) > 4


def test_empty_coalition_is_the_base_model(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
) -> None:
    model, base, _, x, y = setup
    for metric in ("accuracy", "neg_log_loss"):
        utility = utility_for(setup, metric)
        empty = utility(np.zeros((1, K), dtype=bool))[0]
        assert empty == pytest.approx(evaluate_params(model, base, x, y, metric), abs=1e-6)
        with torch.no_grad():
            logits = model(x)
        if metric == "accuracy":
            assert empty == (logits.argmax(1) == y).double().mean().item()


def test_chunking_gives_identical_results(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
) -> None:
    masks = all_coalitions(K)
    for metric in ("accuracy", "neg_log_loss"):
        whole = utility_for(setup, metric)(masks)
        chunked_utility = utility_for(setup, metric, max_batch=3)
        chunked = chunked_utility(masks)
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)
        assert chunked_utility.evaluations == 2**K


def test_evaluations_counter_accumulates(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
) -> None:
    utility = utility_for(setup, "accuracy")
    utility(all_coalitions(K)[:5])
    utility(all_coalitions(K)[5:])
    assert utility.evaluations == 2**K


def test_shapley_over_the_model_is_efficient(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
) -> None:
    utility = utility_for(setup, "neg_log_loss")
    seen: list[np.ndarray] = []

    def recorded(masks: np.ndarray) -> np.ndarray:
        out: np.ndarray = utility(masks)
        seen.append(out)
        return out

    result = ExactShapley().value(recorded, K)
    (table,) = seen  # one batched call; row b is the coalition with bitmask b
    assert result.values.sum() == pytest.approx(table[-1] - table[0], abs=1e-9)
    assert result.evaluations == utility.evaluations == 2**K
    # Separately scored, the extreme coalitions agree up to float32 rounding of the batch.
    grand = utility(np.ones((1, K), dtype=bool))[0]
    empty = utility(np.zeros((1, K), dtype=bool))[0]
    assert result.values.sum() == pytest.approx(grand - empty, abs=1e-5)


def test_model_training_mode_is_restored(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
) -> None:
    model = setup[0]
    model.train()
    utility_for(setup, "accuracy")(all_coalitions(K))
    assert model.training


def test_buffers_come_from_base() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    base["1.running_mean"] = torch.linspace(-1, 1, 6)
    base["1.running_var"] = torch.linspace(0.5, 2, 6)
    gen = torch.Generator().manual_seed(3)
    deltas = [
        {
            name: (0.1 * torch.randn(t.shape, generator=gen)).to(t.dtype)
            if t.is_floating_point()
            else torch.zeros_like(t)
            for name, t in base.items()
        }
        for _ in range(2)
    ]
    x = torch.randn(50, 8, generator=gen)
    y = torch.randint(0, 3, (50,), generator=gen)
    utility = CoalitionUtility(model, base, deltas, [1, 3], x, y, metric="neg_log_loss", device=CPU)
    got = utility(all_coalitions(2))
    for row, value in zip(all_coalitions(2), got, strict=True):
        members = np.flatnonzero(row).tolist()
        n_s = sum([1, 3][k] for k in members)
        params = {
            name: t + sum(([1, 3][k] / n_s) * deltas[k][name] for k in members)
            if t.is_floating_point()
            else t
            for name, t in base.items()
        }
        assert value == pytest.approx(
            evaluate_params(model, params, x, y, "neg_log_loss"), abs=1e-5
        )


def test_coalition_weights_hand_computed() -> None:
    masks = np.array([[False, False, False], [True, False, True], [True, True, True]])
    weights = coalition_weights(masks, [1, 2, 3])
    assert weights.dtype == torch.float32
    expected = torch.tensor([[0, 0, 0], [1 / 4, 0, 3 / 4], [1 / 6, 2 / 6, 3 / 6]])
    torch.testing.assert_close(weights, expected)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=8).flatmap(
        lambda ns: st.tuples(
            st.just(ns),
            st.lists(
                st.lists(st.booleans(), min_size=len(ns), max_size=len(ns)),
                min_size=1,
                max_size=10,
            ),
        )
    )
)
def test_coalition_weights_rows_sum_to_one(case: tuple[list[int], list[list[bool]]]) -> None:
    num_samples, rows = case
    masks = np.array(rows, dtype=bool)
    weights = coalition_weights(masks, num_samples).double()
    sums = weights.sum(dim=1)
    for mask, total, row in zip(masks, sums.tolist(), weights, strict=True):
        if mask.any():
            assert total == pytest.approx(1.0, abs=1e-6)
        else:
            assert total == 0.0
        assert bool(((row > 0) == torch.from_numpy(mask)).all())


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(min_value=1, max_value=10**3), st.just(10**12)),
        min_size=1,
        max_size=9,
    ),
    st.sampled_from([0.5, 1.0, 1.5, 3.0, 100.0]),
)
def test_capped_coalition_weights_are_each_rows_capped_weights_to_the_bit(
    num_samples: list[int], max_multiple: float
) -> None:
    """Every coalition at once (the vectorised water-filling) gives the same floats as
    ``capped_weights`` of its members with a share of at most max_multiple / |S|, the rule
    the aggregate follows."""
    masks = all_coalitions(len(num_samples))
    weights = coalition_weights(masks, num_samples, max_multiple)
    for mask, row in zip(masks, weights, strict=True):
        members = np.flatnonzero(mask)
        expected = torch.zeros(len(num_samples), dtype=torch.float64)
        if members.size:
            share = min(1.0, max_multiple / members.size)
            expected[members] = torch.tensor(
                capped_weights([num_samples[k] for k in members], share), dtype=torch.float64
            )
        assert torch.equal(row, expected.to(torch.float32))


def test_per_sample_log_loss_is_minus_torch_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = 20 * torch.randn(500, 10, generator=generator)
    y = torch.randint(0, 10, (500,), generator=generator)
    expected = -torch.nn.functional.cross_entropy(logits.double(), y, reduction="none")
    torch.testing.assert_close(
        per_sample_scores(logits, y, "neg_log_loss"), expected, rtol=0, atol=1e-13
    )


def test_coalition_weights_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="sample counts"):
        coalition_weights(np.ones((1, 2), dtype=bool), [1])
    with pytest.raises(ValueError, match="> 0"):
        coalition_weights(np.ones((1, 2), dtype=bool), [1, 0])
    with pytest.raises(ValueError, match="bool"):
        coalition_weights(np.ones((1, 2)), [1, 1])


def test_mismatched_delta_is_refused(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
) -> None:
    model, base, deltas, x, y = setup
    bad = dict(deltas[0])
    bad["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"0\.weight"):
        CoalitionUtility(model, base, [bad], [1], x, y, device=CPU)
    with pytest.raises(ValueError, match="missing"):
        CoalitionUtility(model, {"x": torch.zeros(1)}, [], [], x, y, device=CPU)


def test_large_models_are_scored_in_smaller_batches() -> None:
    from fedledger.incentive.utility import MAX_BATCH_FLOATS, default_max_batch

    assert default_max_batch(2410) == 256  # the digits MLP: every game of 8 players in one call
    assert default_max_batch(1_000_000) == MAX_BATCH_FLOATS // 1_000_000 == 67
    assert default_max_batch(10**9) == 1


@pytest.mark.parametrize("metric", ["accuracy", "neg_log_loss", "neg_brier"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_an_mlp_is_scored_by_batched_products_as_vmap_scores_it(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
    metric: Literal["accuracy", "neg_log_loss", "neg_brier"],
    per_sample: bool,
    rescale: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The MLP path (batched matrix products) gives what vmap over functional_call gives, for
    every metric, per sample or averaged, with steps rescaled or not."""
    from fedledger.incentive import utility

    model, base, deltas, x, y = setup
    kwargs = {"eta": ETA, "metric": metric, "device": CPU, "per_sample": per_sample}
    fast = CoalitionUtility(model, base, deltas, NUM_SAMPLES, x, y, rescale_steps=rescale, **kwargs)
    monkeypatch.setattr(utility, "mlp_layers", lambda _model: None)
    generic = CoalitionUtility(
        model, base, deltas, NUM_SAMPLES, x, y, rescale_steps=rescale, **kwargs
    )
    assert (fast.path, generic.path) == ("batched-mlp", "vmap")
    masks = all_coalitions(K)
    ours, theirs = fast(masks), generic(masks)
    assert ours.shape == theirs.shape == ((2**K, len(y)) if per_sample else (2**K,))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert len({row.tobytes() for row in np.atleast_2d(ours.T).T}) > 4  # coalitions differ


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + torch.relu(self.inner(x)))


def test_only_a_plain_mlp_takes_the_batched_path() -> None:
    from fedledger.incentive.utility import mlp_layers

    model = make_model()
    layers = mlp_layers(model)
    assert layers is not None and [type(x) for x in layers] == [str, nn.ReLU, str]
    relu = layers[1]
    assert isinstance(relu, nn.ReLU) and relu.inplace and relu is not model[1]
    assert not model[1].inplace  # the model itself is left as it was
    assert mlp_layers(Residual()) is None
    assert mlp_layers(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))) is None
    assert mlp_layers(nn.Sequential(nn.ReLU(), nn.Linear(4, 4))) is None  # would overwrite x
    layers = mlp_layers(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(), nn.Linear(8, 2)))
    assert layers == ["0", torch.tanh_, "3"]


def test_every_elementwise_activation_scores_as_the_model_does() -> None:
    """In place or not, each activation the MLP path takes gives the model's own outputs."""
    from fedledger.incentive.utility import ELEMENTWISE, batched_mlp, mlp_layers

    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(2))
    for kind in ELEMENTWISE:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), kind(), nn.Linear(5, 3)).eval()
        layers = mlp_layers(model)
        assert layers is not None, kind
        params = {
            n: t.detach().unsqueeze(0).repeat(2, *[1] * t.dim())
            for n, t in model.state_dict().items()
        }
        weight = params.pop("0.weight")
        scratch: dict[str, Tensor] = {}
        with torch.no_grad():
            out = batched_mlp(layers, {**params, "0.weight": weight}, x)
            # The first layer two units at a time (tiles of 2, 2 and 1), twice on one scratch.
            for _ in range(2):
                tiled = batched_mlp(
                    layers,
                    params,
                    x,
                    scratch,
                    first_rows=lambda a, b, w=weight: w[:, a:b],
                    tile=2,
                )
                torch.testing.assert_close(tiled, out, msg=f"tiled {kind}")
            # The bias as the rows' last column, added by the product.
            rest = {n: t for n, t in params.items() if n != "0.bias"}
            rows = torch.cat([weight, params["0.bias"].unsqueeze(2)], dim=2)
            augmented = batched_mlp(
                layers, rest, x, scratch, first_rows=lambda a, b, w=rows: w[:, a:b], tile=3
            )
            torch.testing.assert_close(augmented, out, msg=f"bias in the rows, {kind}")
            expected = model(x)
        torch.testing.assert_close(out, expected.expand(2, -1, -1), msg=str(kind))


@pytest.mark.parametrize("first_bias", [True, False])
def test_a_tiled_first_layer_scores_as_the_whole_layer_does(
    monkeypatch: pytest.MonkeyPatch, first_bias: bool
) -> None:
    """Tiles of the first layer's units (built a tile at a time, the last tile shorter) give the
    outputs the generic path gives, through a non-in-place activation, a layer without a bias
    and a third layer after the tiled pair; chunks of coalitions share the buffers."""
    from fedledger.incentive import utility

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(8, 23, bias=first_bias),
        nn.GELU(),
        nn.Linear(23, 7, bias=False),
        nn.Tanh(),
        nn.Linear(7, 3),
    )
    gen = torch.Generator().manual_seed(4)
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    deltas = [
        {n: 0.5 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in "abcd"
    ]
    x = torch.randn(30, 8, generator=gen)
    y = torch.randint(0, 3, (30,), generator=gen)
    kwargs = {"metric": "neg_log_loss", "device": CPU, "per_sample": True, "rescale_steps": True}
    monkeypatch.setattr(utility, "TILE_FLOATS", 5 * 7 * 30)  # 5 coalitions x 7 units x 30 samples
    tiled = CoalitionUtility(model, base, deltas, NUM_SAMPLES, x, y, max_batch=5, **kwargs)
    assert tiled.path == "batched-mlp" and tiled._tile(5) == 7 and tiled._tile(1) == 35
    monkeypatch.setattr(utility, "mlp_layers", lambda _model: None)
    generic = CoalitionUtility(model, base, deltas, NUM_SAMPLES, x, y, **kwargs)
    masks = all_coalitions(K)
    np.testing.assert_allclose(tiled(masks), generic(masks), rtol=0, atol=1e-5)


def test_progress_is_told_after_every_batch(
    setup: tuple[nn.Module, dict[str, Tensor], list[dict[str, Tensor]], Tensor, Tensor],
) -> None:
    told: list[tuple[int, int]] = []
    utility = utility_for(setup, "accuracy", max_batch=5)
    utility.on_progress = lambda done, total: told.append((done, total))
    utility(all_coalitions(K))
    assert told == [(5, 16), (10, 16), (15, 16), (16, 16)]

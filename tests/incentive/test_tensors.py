"""flatten/unflatten and the one L2 norm: exact on known values, agreeing with torch's own norm."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedledger.incentive import tensors
from fedledger.incentive.tensors import flatten, flatten_rows, l2_norm, unflatten


def test_flatten_round_trip() -> None:
    params = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([7.0]), "c": torch.tensor(2)}
    flat = flatten(params)
    assert flat.tolist() == [7.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 2.0]  # sorted names: a, b, c
    back = unflatten(flat, params)
    assert list(back) == ["a", "b", "c"]
    for name, tensor in params.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor)
    with pytest.raises(ValueError, match="shape"):
        unflatten(flat[:-1], params)


def test_flatten_rows_is_the_stack_of_flattened_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
        for _ in range(3)
    ]
    for dtype in (torch.float32, torch.float64):
        stacked = torch.stack([flatten(r, dtype=dtype) for r in rows])
        assert torch.equal(flatten_rows(rows, dtype=dtype), stacked)
    assert flatten_rows([]).shape == (0, 0)
    for bad in (
        {"w": rows[0]["w"]},
        {"w": rows[0]["w"], "b": torch.zeros(5)},
        {"w": rows[0]["w"], "b": torch.zeros(3)},
    ):
        with pytest.raises(ValueError, match="row 1"):
            flatten_rows([rows[0], bad])


def test_l2_norm_of_known_tensors() -> None:
    assert l2_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == 5.0
    assert l2_norm({}) == 0.0
    assert l2_norm({"n": torch.tensor([1, 2, 2])}) == 3.0  # integer tensors count too


def test_l2_norm_sums_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor longer than one chunk is summed chunk by chunk, every element counted once."""
    monkeypatch.setattr(tensors, "_NORM_CHUNK", 7)
    values = torch.arange(1, 51, dtype=torch.float32)  # 50 elements: 7 full chunks and 1 part
    expected = math.sqrt(sum(v * v for v in range(1, 51)))
    assert l2_norm({"w": values.reshape(5, 10)}) == pytest.approx(expected, rel=1e-15)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=40), min_size=1, max_size=4
    )
)
def test_l2_norm_agrees_with_torch_on_the_concatenation(columns: list[list[float]]) -> None:
    params = {f"t{i}": torch.tensor(c, dtype=torch.float32) for i, c in enumerate(columns)}
    reference = float(torch.linalg.vector_norm(flatten(params, dtype=torch.float64)))
    assert l2_norm(params) == pytest.approx(reference, rel=1e-12, abs=1e-300)

"""Canonical update bytes, their keccak commitment, and the refusal of anything that is not them."""

from __future__ import annotations

import builtins
import io
import json
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from web3 import Web3

from fedledger.errors import CommitmentError
from fedledger.incentive.commitment import (
    TensorSpec,
    canonical_bytes,
    decode_tensors,
    decode_update,
    encode_tensors,
    keccak,
    specs_of,
)

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

TensorDict = dict[str, torch.Tensor]


def make_tensor(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, shape, generator=generator, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 10).to(dtype)


tensors = st.builds(
    make_tensor,
    shape=st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
names = st.from_regex(r"[a-z][a-z0-9_.]{0,10}", fullmatch=True)
tensor_dicts = st.dictionaries(names, tensors, max_size=5)


def same_tensors(a: TensorDict, b: TensorDict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and torch.equal(a[n], b[n]) for n in a
    )


def model() -> TensorDict:
    return {
        "layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "layer.bias": torch.tensor([0.5, -1.0], dtype=torch.float32),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


def refused(data: bytes, code: str) -> CommitmentError:
    with pytest.raises(CommitmentError) as info:
        decode_update(data, specs_of(model()))
    assert info.value.code == code
    return info.value


# ------------------------------------------------------------------ canonical bytes


@given(tensor_dicts, st.randoms(use_true_random=False))
def test_canonical_bytes_ignore_insertion_order(tensors: TensorDict, rnd: random.Random) -> None:
    items = list(tensors.items())
    rnd.shuffle(items)
    assert canonical_bytes(dict(items)) == canonical_bytes(tensors)
    assert canonical_bytes(dict(reversed(items))) == canonical_bytes(tensors)


@given(tensor_dicts)
def test_canonical_bytes_are_deterministic(tensors: TensorDict) -> None:
    first = canonical_bytes(tensors)
    assert canonical_bytes(tensors) == first
    assert canonical_bytes({n: t.clone() for n, t in tensors.items()}) == first


def test_canonical_bytes_ignore_memory_layout_and_autograd() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = base.t()
    assert not transposed.is_contiguous()
    assert canonical_bytes({"w": transposed}) == canonical_bytes({"w": transposed.contiguous()})
    with_grad = base.clone().requires_grad_(True)
    assert canonical_bytes({"w": with_grad}) == canonical_bytes({"w": base})


def test_canonical_bytes_carry_no_metadata() -> None:
    data = canonical_bytes(model())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert "__metadata__" not in header
    assert sorted(header) == sorted(model())


@given(tensor_dicts)
def test_round_trip(tensors: TensorDict) -> None:
    data = canonical_bytes(tensors)
    assert same_tensors(decode_tensors(data), tensors)


def test_round_trip_through_decode_update() -> None:
    decoded = decode_update(canonical_bytes(model()), specs_of(model()))
    assert same_tensors(decoded, model())


@given(tensor_dicts.filter(bool), st.data())
def test_changing_one_value_changes_the_commitment(
    tensors: TensorDict, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(tensors)))
    assume(tensors[name].numel() > 0)
    changed = dict(tensors)
    flat = tensors[name].clone().reshape(-1)
    flat[0] = ~flat[0] if flat.dtype == torch.bool else flat[0] + 1
    assume(not torch.equal(flat[0], tensors[name].reshape(-1)[0]))  # e.g. 1e8 + 1 in float16
    changed[name] = flat.reshape(tensors[name].shape)
    assert encode_tensors(changed)[1] != encode_tensors(tensors)[1]


# ------------------------------------------------------------------ keccak


def test_keccak_of_empty_input_is_the_known_constant() -> None:
    assert keccak(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"


@given(st.binary(max_size=512))
def test_keccak_equals_web3_keccak(data: bytes) -> None:
    assert keccak(data) == bytes(Web3.keccak(data))


@given(tensor_dicts)
def test_commitment_is_keccak_of_canonical_bytes(tensors: TensorDict) -> None:
    data, digest = encode_tensors(tensors)
    assert data == canonical_bytes(tensors)
    assert digest == bytes(Web3.keccak(data))
    assert len(digest) == 32


# ------------------------------------------------------------------ refusing pickles


def _torch_save(legacy: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(model(), buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(pickle.dumps(model()), id="pickle"),
        pytest.param(pickle.dumps(model(), protocol=0), id="pickle-protocol-0"),
        pytest.param(_torch_save(legacy=False), id="torch.save-zip"),
        pytest.param(_torch_save(legacy=True), id="torch.save-legacy"),
    ],
)
def test_pickled_payloads_are_refused(payload: bytes) -> None:
    refused(payload, "not_safetensors")
    with pytest.raises(CommitmentError) as info:
        decode_tensors(payload)
    assert info.value.code == "not_safetensors"


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (builtins.open, (str(self.path), "w"))


def _malicious(path: Path) -> bytes:
    return pickle.dumps({"layer.weight": _CreatesFile(path)})


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(_malicious(probe)).__getitem__("layer.weight").close()
    assert probe.exists(), "the payload must be live for this test to mean anything"

    target = tmp_path / "pwned"
    refused(_malicious(target), "not_safetensors")
    with pytest.raises(CommitmentError):
        decode_tensors(_malicious(target))
    assert not target.exists()


def test_malicious_pickle_inside_torch_save_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"layer.weight": _CreatesFile(target)}, buffer)
    assert not target.exists()
    refused(buffer.getvalue(), "not_safetensors")
    assert not target.exists()


# ------------------------------------------------------------------ tensor mismatches


@pytest.mark.parametrize(
    ("change", "expected_message"),
    [
        (lambda t: t.pop("layer.bias"), "missing tensor 'layer.bias'"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor 'extra'"),
        (
            lambda t: t.update({"layer.weight": torch.zeros(3, 2)}),
            "tensor 'layer.weight' is float32[3, 2], expected float32[2, 3]",
        ),
        (
            lambda t: t.update({"layer.bias": torch.zeros(2, dtype=torch.float64)}),
            "tensor 'layer.bias' is float64[2], expected float32[2]",
        ),
        (
            lambda t: t.update(steps=torch.tensor(3)),
            "tensor 'steps' is int64[], expected int64[1]",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype", "rank"],
)
def test_each_mismatch_is_named(change: object, expected_message: str) -> None:
    tensors = model()
    change(tensors)  # type: ignore[operator]
    error = refused(canonical_bytes(tensors), "tensor_mismatch")
    assert expected_message in error.message


def test_every_difference_is_reported_at_once() -> None:
    tensors = model()
    del tensors["steps"]
    tensors["extra"] = torch.zeros(1)
    tensors["layer.weight"] = torch.zeros(3, 2)
    tensors["layer.bias"] = torch.zeros(2, dtype=torch.float16)
    message = refused(canonical_bytes(tensors), "tensor_mismatch").message
    for part in (
        "missing tensor 'steps'",
        "unexpected tensor 'extra'",
        "tensor 'layer.weight' is float32[3, 2], expected float32[2, 3]",
        "tensor 'layer.bias' is float16[2], expected float32[2]",
    ):
        assert part in message


def test_empty_update_is_a_mismatch() -> None:
    message = refused(canonical_bytes({}), "tensor_mismatch").message
    assert all(f"missing tensor {name!r}" in message for name in model())


def test_mismatch_is_reported_before_non_finite_values() -> None:
    tensors = model()
    tensors["layer.bias"] = torch.tensor([float("nan"), 1.0, 2.0])
    refused(canonical_bytes(tensors), "tensor_mismatch")


def test_tensor_spec_describes_dtype_and_shape() -> None:
    assert TensorSpec((2, 3), torch.bfloat16).describe() == "bfloat16[2, 3]"
    assert specs_of(model())["steps"] == TensorSpec((1,), torch.int64)


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_values_are_refused_naming_the_tensor(bad: float, dtype: torch.dtype) -> None:
    tensors = {**model(), "layer.bias": torch.tensor([0.0, bad]).to(dtype)}
    expected = {**specs_of(model()), "layer.bias": TensorSpec((2,), dtype)}
    with pytest.raises(CommitmentError) as info:
        decode_update(canonical_bytes(tensors), expected)
    assert info.value.code == "non_finite"
    assert "layer.bias" in info.value.message
    assert "layer.weight" not in info.value.message


def test_every_non_finite_tensor_is_named() -> None:
    tensors = model()
    tensors["layer.weight"] = tensors["layer.weight"].clone()
    tensors["layer.weight"][1, 2] = float("inf")
    tensors["layer.bias"] = torch.tensor([float("nan"), 0.0])
    message = refused(canonical_bytes(tensors), "non_finite").message
    assert "layer.weight" in message
    assert "layer.bias" in message
    assert "steps" not in message


def test_extreme_but_finite_values_are_accepted() -> None:
    tensors = model()
    tensors["layer.bias"] = torch.tensor([torch.finfo(torch.float32).max, -1e-45])
    decoded = decode_update(canonical_bytes(tensors), specs_of(model()))
    assert torch.equal(decoded["layer.bias"], tensors["layer.bias"])


# ------------------------------------------------------------------ not safetensors at all


@settings(max_examples=50)
@given(tensor_dicts.filter(bool), st.data())
def test_truncated_bytes_are_refused(tensors: TensorDict, data: st.DataObject) -> None:
    full = canonical_bytes(tensors)
    cut = data.draw(st.integers(min_value=0, max_value=len(full) - 1))
    with pytest.raises(CommitmentError) as info:
        decode_tensors(full[:cut])
    assert info.value.code == "not_safetensors"


def test_trailing_bytes_are_refused() -> None:
    refused(canonical_bytes(model()) + b"\x00" * 8, "not_safetensors")


@given(st.binary(max_size=256))
def test_random_junk_is_refused(junk: bytes) -> None:
    assume(junk[8:9] != b"{")  # a safetensors header is a JSON object right after its length
    with pytest.raises(CommitmentError) as info:
        decode_tensors(junk)
    assert info.value.code == "not_safetensors"


HEADER_DTYPES = ["F32", "F64", "F16", "BF16", "I64", "U8", "BOOL", "F4", "F8_E8M0", "C64", "XX"]


def _safetensors_file(header: object, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


@given(
    st.dictionaries(
        names,
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(HEADER_DTYPES),
                "shape": st.lists(st.integers(min_value=-1, max_value=5), max_size=3),
                "data_offsets": st.lists(st.integers(min_value=-1, max_value=64), max_size=3),
            }
        ),
        max_size=3,
    ),
    st.binary(max_size=64),
)
def test_malformed_headers_raise_only_commitment_errors(
    header: dict[str, Any], body: bytes
) -> None:
    try:
        decoded = decode_tensors(_safetensors_file(header, body))
    except CommitmentError as exc:
        assert exc.code == "not_safetensors"
    else:
        assert set(decoded) == set(header)


@pytest.mark.parametrize(
    ("dtype", "num_bytes"), [("F4", 4), ("F6_E2M3", 6), ("F6_E3M2", 6), ("F8_E8M0", 8)]
)
def test_dtypes_torch_cannot_load_are_refused(dtype: str, num_bytes: int) -> None:
    """Eight elements of a valid safetensors dtype that torch has no type for: not a tensor
    file torch reads, and not the model's tensor (its header says so before it is parsed)."""
    entry = {"dtype": dtype, "shape": [8], "data_offsets": [0, num_bytes]}
    data = _safetensors_file({"w": entry}, bytes(num_bytes))
    with pytest.raises(CommitmentError) as info:
        decode_tensors(data)
    assert info.value.code == "not_safetensors"
    entries = {n: {**entry, "shape": list(s.shape)} for n, s in specs_of(model()).items()}
    mismatch = refused(_safetensors_file(entries, bytes(num_bytes)), "tensor_mismatch")
    assert f"is {dtype}[" in mismatch.message


def test_tied_weights_can_be_committed() -> None:
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tied = {"encoder.weight": shared, "decoder.weight": shared}
    untied = {name: t.clone() for name, t in tied.items()}
    assert canonical_bytes(tied) == canonical_bytes(untied)
    decoded = decode_tensors(canonical_bytes(tied))
    assert same_tensors(decoded, untied)


def test_views_of_one_buffer_can_be_committed() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    views = {"a": base[0], "b": base[1:], "c": base[:, 1]}
    copies = {name: t.clone() for name, t in views.items()}
    assert canonical_bytes(views) == canonical_bytes(copies)
    assert same_tensors(decode_tensors(canonical_bytes(views)), copies)

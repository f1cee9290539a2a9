"""An update's safetensors header is judged before a tensor is parsed: its length against what
the model's tensors need, its entries against their names, dtypes and shapes; what it implies
(the body's exact length) is what the coordinator reads and no more."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedledger.errors import CommitmentError
from fedledger.incentive import commitment
from fedledger.incentive.commitment import (
    MAX_LISTED,
    TensorSpec,
    buffer_bytes,
    canonical_bytes,
    check_header,
    decode_update,
    header_bound,
    header_end,
    specs_of,
)
from fedledger.incentive.compression import Codec, compress

ST_NAMES = commitment.SAFETENSORS_DTYPES
DTYPES = list(ST_NAMES)


def model() -> dict[str, torch.Tensor]:
    return {
        "layer.weight": torch.randn(4, 3),
        "layer.bias": torch.randn(4),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


def raw_file(header: object, body: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def entry(dtype: str, shape: list[int], start: int = 0, end: int = 0) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.fixture
def never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if safetensors is asked to parse the tensors."""

    def refuse(_: bytes) -> object:
        raise AssertionError("the tensors were parsed before the header was judged")

    monkeypatch.setattr(commitment, "_st_load", refuse)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,40}", fullmatch=True),
        st.tuples(
            st.lists(st.integers(min_value=0, max_value=6), max_size=4), st.sampled_from(DTYPES)
        ),
        max_size=12,
    )
)
def test_a_canonical_file_fits_the_bounds_its_layout_gives(
    layout: dict[str, tuple[list[int], torch.dtype]],
) -> None:
    """Whatever the names, shapes and dtypes: the header passes, is within ``header_bound``, and
    the file is exactly its header plus ``buffer_bytes``."""
    tensors = {n: torch.zeros(shape, dtype=dtype) for n, (shape, dtype) in layout.items()}
    data = canonical_bytes(tensors)
    specs = specs_of(tensors)
    check_header(data, specs)
    end = header_end(data)
    assert end is not None and end - 8 <= header_bound(specs)
    assert len(data) == end + buffer_bytes(specs)


@pytest.mark.parametrize(("scheme", "fraction"), [("int8", None), ("topk", 0.1), ("topk", 1.0)])
def test_a_compressed_update_fits_its_encoding_s_layout(
    scheme: str, fraction: float | None
) -> None:
    delta = {"w": torch.randn(7, 5), "b": torch.randn(7), "empty": torch.zeros(0)}
    codec = Codec(scheme, fraction)  # type: ignore[arg-type]
    data = canonical_bytes(compress(delta, codec.scheme, fraction))
    codec.check_header(data, specs_of(delta))
    assert len(data) == header_end(data) + buffer_bytes(codec.layout(specs_of(delta)))  # type: ignore[operator]


def test_a_header_naming_many_tensors_is_refused_by_its_length(never_parsed: None) -> None:
    """The issue's attack, scaled down: 100,000 zero-size tensors (5 MB of header) are refused
    from the header's 8-byte length, in a message of bounded size."""
    header = {f"t{k}": entry("F32", [0]) for k in range(100_000)}
    data = raw_file(header)
    with pytest.raises(CommitmentError) as info:
        decode_update(data, specs_of(model()))
    assert info.value.code == "tensor_mismatch"
    assert f"the safetensors header is {len(data) - 8} bytes" in info.value.message
    assert len(info.value.message) < 300
    with pytest.raises(CommitmentError) as prefix_only:  # the first bytes decide it
        check_header(data[:8], specs_of(model()))
    assert prefix_only.value.message == info.value.message


def test_other_tensors_within_the_bound_are_listed_eight_at_most(never_parsed: None) -> None:
    specs = specs_of(model())
    header = {name: entry(ST_NAMES[s.dtype], list(s.shape)) for name, s in specs.items()}
    header["layer.weight"] = entry("F16", [4, 3])
    del header["layer.bias"]
    header |= {f"x{k:02d}": entry("F32", [0]) for k in range(20)}
    wide = {**specs, **{f"pad{k}": TensorSpec((1,), torch.float32) for k in range(40)}}
    assert len(json.dumps(header)) <= header_bound(wide)
    with pytest.raises(CommitmentError) as info:
        check_header(raw_file(header), specs)
    message = info.value.message
    assert info.value.code == "tensor_mismatch"
    # 22 problems: missing layer.bias, 20 unexpected, layer.weight's dtype (listed last)
    assert message.startswith("update does not match the model: missing tensor 'layer.bias'")
    assert message.count("unexpected tensor") == MAX_LISTED - 1
    assert message.endswith(f"and {22 - MAX_LISTED} more")


def test_a_wrong_dtype_or_shape_is_named_from_the_header(never_parsed: None) -> None:
    specs = specs_of(model())
    header = {name: entry(ST_NAMES[s.dtype], list(s.shape)) for name, s in specs.items()}
    header["layer.bias"] = entry("F64", [4])
    header["layer.weight"] = entry("F32", [3, 4])
    with pytest.raises(CommitmentError) as info:
        check_header(raw_file(header), specs)
    assert info.value.message == (
        "update does not match the model: tensor 'layer.bias' is float64[4], expected "
        "float32[4]; tensor 'layer.weight' is float32[3, 4], expected float32[4, 3]"
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x01\x02", "fewer than the header's 8-byte length"),
        (struct.pack("<Q", 2**40) + b"{}", "more than the format allows"),
        (struct.pack("<Q", 64) + b"{}", "only 2 follow its length"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "its header is not JSON"),
        (raw_file([1, 2]), "its header is not a JSON object"),
        (raw_file("[" * 500 + "]" * 500), "its header is not a JSON object"),
        (raw_file({"w": [1]}), "header entry 'w' is not a tensor"),
        (raw_file({"w": entry("F32", [-1])}), "header entry 'w' is not a tensor"),
        (raw_file({"w": entry("F32", [True])}), "header entry 'w' is not a tensor"),
        (raw_file({"w": {"shape": [1]}}), "header entry 'w' is not a tensor"),
    ],
)
def test_a_header_that_is_not_safetensors_is_refused_unparsed(
    never_parsed: None, data: bytes, problem: str
) -> None:
    with pytest.raises(CommitmentError) as info:
        check_header(data, specs_of(model()))
    assert info.value.code == "not_safetensors"
    assert problem in info.value.message


def test_a_compressed_update_s_header_is_judged_against_its_encoding(never_parsed: None) -> None:
    """A top-k upload sending one value too many for a tensor is refused from its header."""
    delta = {"w": torch.randn(10, 10)}
    codec = Codec("topk", 0.1)
    header = {"w.idx": entry("I64", [11]), "w.val": entry("F32", [11])}
    with pytest.raises(CommitmentError) as info:
        codec.decode(raw_file(header, bytes(11 * 12)), specs_of(delta))
    assert info.value.code == "bad_encoding"
    assert info.value.message == (
        "the top-k encoding does not match the model: tensor 'w.idx' is int64[11], expected "
        "int64[10]; tensor 'w.val' is float32[11], expected float32[10]"
    )

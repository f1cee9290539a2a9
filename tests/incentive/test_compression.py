"""The update codec: int8 and top-k round trips, deterministic bytes the commitment binds, error
feedback that loses nothing, and the refusal of every malformed encoding."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedledger.errors import CommitmentError, ErrorCode
from fedledger.incentive.commitment import (
    TensorSpec,
    canonical_bytes,
    decode_tensors,
    encode_tensors,
    keccak,
    specs_of,
)
from fedledger.incentive.compression import (
    ErrorFeedback,
    Scheme,
    compress,
    decompress,
    topk_count,
)

Tensors = dict[str, torch.Tensor]
SPECS = {
    "fc.weight": TensorSpec((10, 65), torch.float32),
    "fc.bias": TensorSpec((10,), torch.float32),
}


def delta(seed: int = 0, scale: float = 1.0) -> Tensors:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(spec.shape, generator=generator) * scale for name, spec in SPECS.items()
    }


def norm(tensor: torch.Tensor) -> float:
    return float(tensor.double().norm())


shapes = st.lists(st.integers(min_value=1, max_value=9), min_size=0, max_size=3)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
magnitudes = st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30])


def random_tensor(shape: list[int], seed: int, magnitude: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude


# ------------------------------------------------------------------ round trips


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, magnitude=magnitudes)
def test_int8_reconstructs_every_coordinate_within_half_a_scale(
    shape: list[int], seed: int, magnitude: float
) -> None:
    x = random_tensor(shape, seed, magnitude)
    encoded = compress({"w": x}, "int8")
    scale = float(encoded["w.scale"])
    assert scale == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    assert int(encoded["w.q"].abs().max()) == 127  # the largest |x| uses the whole range
    back = decompress(encoded, specs_of({"w": x}), "int8")["w"]
    assert back.shape == x.shape and back.dtype == torch.float32
    assert float((back - x).abs().max()) <= scale / 2 * (1 + 1e-5)


def test_int8_of_an_all_zero_tensor_has_scale_zero() -> None:
    zeros = {"w": torch.zeros(3, 4)}
    encoded = compress(zeros, "int8")
    assert float(encoded["w.scale"]) == 0 and not bool(encoded["w.q"].any())
    assert torch.equal(decompress(encoded, specs_of(zeros), "int8")["w"], zeros["w"])


def test_int8_names_and_dtypes() -> None:
    encoded = compress(delta(), "int8")
    assert {n: (tuple(t.shape), t.dtype) for n, t in encoded.items()} == {
        "fc.weight.q": ((650,), torch.int8),
        "fc.weight.scale": ((), torch.float32),
        "fc.bias.q": ((10,), torch.int8),
        "fc.bias.scale": ((), torch.float32),
    }


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    seed=seeds,
    fraction=st.sampled_from([0.001, 0.01, 0.07, 0.1, 0.5, 0.99, 1.0]),
)
def test_topk_keeps_exactly_the_k_largest_of_each_tensor(
    shape: list[int], seed: int, fraction: float
) -> None:
    x = random_tensor(shape, seed, 1.0)  # continuous: no ties
    encoded = compress({"w": x}, "topk", fraction)
    k = topk_count(x.numel(), fraction)
    idx, val = encoded["w.idx"], encoded["w.val"]
    assert idx.dtype == torch.int64 and val.dtype == torch.float32
    assert idx.numel() == val.numel() == k
    assert bool((idx[1:] > idx[:-1]).all())
    flat = x.reshape(-1)
    largest = set(torch.topk(flat.abs(), k).indices.tolist())
    assert set(idx.tolist()) == largest
    back = decompress(encoded, specs_of({"w": x}), "topk", fraction)["w"].reshape(-1)
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[idx] = True
    assert torch.equal(back[kept], flat[kept])
    assert not bool(back[~kept].any())


def test_topk_ties_go_to_the_lower_index() -> None:
    x = {"w": torch.tensor([1.0, -3.0, 3.0, 0.5, -3.0])}
    encoded = compress(x, "topk", 0.4)  # 2 of 5: three coordinates tie at |3|
    assert encoded["w.idx"].tolist() == [1, 2]
    assert encoded["w.val"].tolist() == [-3.0, 3.0]


def test_topk_count_takes_the_fraction_as_written() -> None:
    assert topk_count(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert topk_count(650, 0.1) == 65
    assert topk_count(651, 0.1) == 66  # rounds up
    assert topk_count(3, 0.01) == 1  # a non-empty tensor sends at least one coordinate
    assert topk_count(5, 1.0) == 5
    assert topk_count(0, 0.5) == 0
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="fraction must be in"):
            topk_count(10, bad)


@pytest.mark.parametrize(("scheme", "fraction"), [("int8", None), ("topk", 0.5)])
def test_an_empty_tensor_round_trips(scheme: Scheme, fraction: float | None) -> None:
    empty = {"w": torch.zeros(0, 3)}
    encoded = compress(empty, scheme, fraction)
    assert all(t.numel() == 0 for n, t in encoded.items() if not n.endswith(".scale"))
    back = decompress(decode_tensors(canonical_bytes(encoded)), specs_of(empty), scheme, fraction)
    assert back["w"].shape == (0, 3)


def test_none_is_the_dense_update_checked_as_today() -> None:
    d = delta()
    assert canonical_bytes(compress(d, "none")) == canonical_bytes(d)
    assert decompress(compress(d, "none"), SPECS, "none").keys() == d.keys()
    with pytest.raises(CommitmentError) as info:
        decompress({"fc.weight": d["fc.weight"]}, SPECS, "none")
    assert info.value.code == ErrorCode.TENSOR_MISMATCH
    assert "missing tensor 'fc.bias'" in info.value.message
    d["fc.bias"][0] = math.nan
    with pytest.raises(CommitmentError) as info:
        decompress(d, SPECS, "none")
    assert info.value.code == ErrorCode.NON_FINITE


@pytest.mark.parametrize(
    ("scheme", "fraction"), [("int8", None), ("topk", 0.1), ("topk", 0.01), ("none", None)]
)
def test_the_bytes_round_trip_and_are_deterministic(scheme: Scheme, fraction: float | None) -> None:
    d = delta(seed=3)
    data = canonical_bytes(compress(d, scheme, fraction))
    reordered = {n: d[n].clone() for n in reversed(list(d))}
    assert canonical_bytes(compress(reordered, scheme, fraction)) == data
    assert canonical_bytes(compress(delta(seed=3), scheme, fraction)) == data
    from_bytes = decompress(decode_tensors(data), SPECS, scheme, fraction)
    direct = decompress(compress(d, scheme, fraction), SPECS, scheme, fraction)
    assert all(torch.equal(from_bytes[n], direct[n]) for n in SPECS)


@pytest.mark.parametrize(("scheme", "fraction"), [("int8", None), ("topk", 0.1)])
def test_the_commitment_binds_the_compressed_bytes(scheme: Scheme, fraction: float | None) -> None:
    encoded = compress(delta(), scheme, fraction)
    data, commitment = encode_tensors(encoded)
    assert commitment == keccak(canonical_bytes(encoded))
    assert commitment != encode_tensors(delta())[1]  # not the dense update's hash
    assert len(data) < len(canonical_bytes(delta()))
    part = "fc.weight.q" if scheme == "int8" else "fc.weight.val"
    tampered = dict(encoded)
    tampered[part] = encoded[part].clone()
    tampered[part][0] += 1
    assert encode_tensors(tampered)[1] != commitment


def test_int8_is_about_a_quarter_of_the_dense_bytes() -> None:
    big = {"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(0))}
    ratio = len(canonical_bytes(compress(big, "int8"))) / len(canonical_bytes(big))
    assert 0.25 <= ratio < 0.26


def test_bad_arguments_are_value_errors() -> None:
    d = delta()
    with pytest.raises(ValueError, match="unknown compression scheme 'zstd'"):
        compress(d, "zstd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a fraction"):
        compress(d, "topk")
    with pytest.raises(ValueError, match="only for the topk scheme"):
        decompress(compress(d, "int8"), SPECS, "int8", 0.1)
    with pytest.raises(ValueError, match="float32"):
        compress({"w": torch.zeros(3, dtype=torch.float64)}, "int8")
    with pytest.raises(ValueError, match="float32"):
        decompress({}, {"w": TensorSpec((3,), torch.int64)}, "int8")


def test_a_non_finite_delta_is_not_compressed() -> None:
    d = delta()
    d["fc.weight"][2, 3] = math.inf
    with pytest.raises(CommitmentError) as info:
        compress(d, "topk", 0.1)
    assert info.value.code == ErrorCode.NON_FINITE and "fc.weight" in info.value.message


# ------------------------------------------------------------------ error feedback


@pytest.mark.parametrize(("scheme", "fraction"), [("int8", None), ("topk", 0.1), ("topk", 0.01)])
def test_error_feedback_delays_but_never_loses_what_it_holds_back(
    scheme: Scheme, fraction: float | None
) -> None:
    """sum(sent) = sum(deltas) - residual, every round: the telescoping identity of error feedback."""
    memory = ErrorFeedback(scheme, fraction)
    total = {n: torch.zeros(s.shape, dtype=torch.float64) for n, s in SPECS.items()}
    sent_total = {n: torch.zeros(s.shape, dtype=torch.float64) for n, s in SPECS.items()}
    for round_id in range(40):
        d = delta(seed=round_id)
        encoded, sent = memory.step(d)
        assert all(
            torch.equal(sent[n], v) for n, v in decompress(encoded, SPECS, scheme, fraction).items()
        )
        residual = memory.state()
        for n in SPECS:
            total[n] += d[n].double()
            sent_total[n] += sent[n].double()
            gap = total[n] - sent_total[n] - residual[n].double()
            assert float(gap.abs().max()) < 1e-4, (round_id, n)


def test_the_topk_residual_stays_within_the_contraction_bound() -> None:
    """Top-k keeps at least k/d of each tensor's squared norm, so ||e_t|| <= sqrt(1 - k/d) *
    (||e_{t-1}|| + ||delta_t||), hence ||e_t|| <= q / (1 - q) * max ||delta|| with q = sqrt(1 - k/d)
    (Karimireddy et al. 2019, Lemma 3; Stich et al. 2018, Lemma 3.2)."""
    fraction = 0.1
    memory = ErrorFeedback("topk", fraction)
    biggest = {n: 0.0 for n in SPECS}
    for round_id in range(200):
        d = delta(seed=round_id)
        memory.step(d)
        for n, spec in SPECS.items():
            biggest[n] = max(biggest[n], norm(d[n]))
            numel = math.prod(spec.shape)
            q = math.sqrt(1 - topk_count(numel, fraction) / numel)
            assert norm(memory.state()[n]) <= q / (1 - q) * biggest[n] * (1 + 1e-5), (round_id, n)


def test_the_int8_residual_is_the_quantisation_error() -> None:
    memory = ErrorFeedback("int8")
    for round_id in range(20):
        encoded, _ = memory.step(delta(seed=round_id))
        for n in SPECS:
            scale = float(encoded[f"{n}.scale"])
            assert float(memory.state()[n].abs().max()) <= scale / 2 * (1 + 1e-5)


def test_error_feedback_resumes_from_its_saved_state() -> None:
    first = ErrorFeedback("topk", 0.05)
    for round_id in range(3):
        first.step(delta(seed=round_id))
    saved = canonical_bytes(first.state())
    resumed = ErrorFeedback("topk", 0.05, residual=decode_tensors(saved))
    fresh = ErrorFeedback("topk", 0.05)
    ours = canonical_bytes(first.step(delta(seed=9))[0])
    assert canonical_bytes(resumed.step(delta(seed=9))[0]) == ours
    assert canonical_bytes(fresh.step(delta(seed=9))[0]) != ours  # the residual mattered


def test_the_first_round_sends_the_plain_compression() -> None:
    d = delta()
    encoded, _ = ErrorFeedback("int8").step(d)
    assert canonical_bytes(encoded) == canonical_bytes(compress(d, "int8"))


def test_none_holds_nothing_back() -> None:
    memory = ErrorFeedback("none")
    d = delta()
    encoded, sent = memory.step(d)
    assert canonical_bytes(encoded) == canonical_bytes(d) == canonical_bytes(sent)
    assert memory.state() == {}


def test_a_residual_of_another_model_is_refused() -> None:
    memory = ErrorFeedback("int8", residual={"other": torch.zeros(3)})
    with pytest.raises(ValueError, match="residual does not match the update: missing tensor"):
        memory.step(delta())


# ------------------------------------------------------------------ malformed encodings

Edit = Callable[[Tensors], None]


def _set(name: str, value: torch.Tensor) -> Edit:
    def edit(encoded: Tensors) -> None:
        encoded[name] = value

    return edit


def _drop(name: str) -> Edit:
    def edit(encoded: Tensors) -> None:
        del encoded[name]

    return edit


def _change(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    def edit(encoded: Tensors) -> None:
        encoded[name] = change(encoded[name].clone())

    return edit


def _put(index: int, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor[index] = value
        return tensor

    return change


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


INT8_CASES: dict[str, tuple[Edit, str]] = {
    "missing-scale": (_drop("fc.bias.scale"), "missing tensor 'fc.bias.scale'"),
    "extra-tensor": (_set("fc.bias", torch.zeros(10)), "unexpected tensor 'fc.bias'"),
    "q-float": (
        _change("fc.weight.q", lambda q: q.float()),
        "tensor 'fc.weight' has .q of dtype float32, expected int8",
    ),
    "scale-float64": (
        _change("fc.weight.scale", lambda s: s.double()),
        ".scale of dtype float64, expected float32",
    ),
    "q-too-short": (
        _change("fc.weight.q", lambda q: q[:649].clone()),
        "has 649 .q values, expected 650",
    ),
    "q-not-flat": (
        _change("fc.weight.q", lambda q: q.reshape(10, 65).clone()),
        ".q of shape [10, 65]; it must be 1-dimensional",
    ),
    "scale-one-element": (
        _change("fc.weight.scale", lambda s: s.reshape(1).clone()),
        ".scale of shape [1]; it must be a scalar",
    ),
    "scale-nan": (_set("fc.weight.scale", _scalar(math.nan)), "scale nan; a scale must be finite"),
    "scale-inf": (_set("fc.weight.scale", _scalar(math.inf)), "scale inf"),
    "scale-negative": (_set("fc.weight.scale", _scalar(-0.5)), "scale -0.5; a scale must be"),
    "scale-zero-nonzero-q": (_set("fc.weight.scale", _scalar(0.0)), "scale 0 but nonzero q"),
    "q-minus-128": (_change("fc.bias.q", _put(4, -128)), "q value -128 outside [-127, 127]"),
    "scale-overflows": (
        _set("fc.weight.scale", _scalar(3e38)),
        "q * scale overflows float32",
    ),
}


def _too_many_values(encoded: Tensors) -> None:
    encoded["fc.weight.idx"] = torch.arange(66)
    encoded["fc.weight.val"] = torch.ones(66)


def _empty_bias(encoded: Tensors) -> None:
    encoded["fc.bias.idx"] = torch.zeros(0, dtype=torch.int64)
    encoded["fc.bias.val"] = torch.zeros(0)


TOPK_CASES: dict[str, tuple[Edit, str]] = {
    "missing-idx": (_drop("fc.weight.idx"), "missing tensor 'fc.weight.idx'"),
    "extra-tensor": (_set("fc.weight.q", torch.zeros(650, dtype=torch.int8)), "unexpected tensor"),
    "idx-int32": (
        _change("fc.weight.idx", lambda i: i.int()),
        ".idx of dtype int32, expected int64",
    ),
    "val-float64": (
        _change("fc.weight.val", lambda v: v.double()),
        ".val of dtype float64, expected float32",
    ),
    "idx-not-flat": (
        _change("fc.weight.idx", lambda i: i.reshape(5, 13).clone()),
        ".idx of shape [5, 13]; it must be 1-dimensional",
    ),
    "index-out-of-range": (
        _change("fc.weight.idx", _put(-1, 700)),
        "the top-k encoding of tensor 'fc.weight' has index 700 >= its 650 coordinates",
    ),
    "index-negative": (_change("fc.weight.idx", _put(0, -1)), "has index -1 < 0"),
    "index-repeated": (
        _change("fc.weight.idx", lambda i: torch.cat([i[:1], i[:-1]])),
        "not strictly increasing",
    ),
    "index-decreasing": (
        _change("fc.weight.idx", lambda i: i.flip(0).clone()),
        "not strictly increasing",
    ),
    "idx-val-lengths-differ": (
        _change("fc.weight.val", lambda v: v[:-1].clone()),
        "has 65 indices but 64 values",
    ),
    "too-many-values": (
        _too_many_values,
        "has 66 values; top-k 0.1 of its 650 coordinates is exactly 65",
    ),
    "too-few-values": (
        _empty_bias,
        "has 0 values; top-k 0.1 of its 10 coordinates is exactly 1",
    ),
    "value-nan": (_change("fc.weight.val", _put(3, math.nan)), "has NaN or infinite values"),
    "value-inf": (_change("fc.bias.val", _put(0, -math.inf)), "tensor 'fc.bias' has NaN or"),
}


def refusal(scheme: Scheme, fraction: float | None, edit: Edit) -> CommitmentError:
    """The error decoding ``edit`` of a valid encoding raises, through the canonical bytes."""
    encoded = compress(delta(), scheme, fraction)
    edit(encoded)
    data = canonical_bytes(encoded)
    with pytest.raises(CommitmentError) as info:
        decompress(decode_tensors(data), SPECS, scheme, fraction)
    return info.value


@pytest.mark.parametrize("case", INT8_CASES, ids=list(INT8_CASES))
def test_a_malformed_int8_encoding_is_refused(case: str) -> None:
    edit, fragment = INT8_CASES[case]
    error = refusal("int8", None, edit)
    assert error.code == ErrorCode.BAD_ENCODING
    assert error.status == 422
    assert fragment in error.message


@pytest.mark.parametrize("case", TOPK_CASES, ids=list(TOPK_CASES))
def test_a_malformed_topk_encoding_is_refused(case: str) -> None:
    edit, fragment = TOPK_CASES[case]
    error = refusal("topk", 0.1, edit)
    assert error.code == ErrorCode.BAD_ENCODING
    assert fragment in error.message


def test_a_refusal_names_the_tensor_in_its_details() -> None:
    error = refusal("topk", 0.1, _change("fc.weight.idx", _put(-1, 700)))
    assert error.details == {"tensor": "fc.weight"}


def test_an_encoding_of_another_scheme_is_refused() -> None:
    with pytest.raises(CommitmentError) as info:
        decompress(compress(delta(), "int8"), SPECS, "topk", 0.1)
    assert info.value.code == ErrorCode.BAD_ENCODING
    assert "missing tensor 'fc.bias.idx'" in info.value.message
    assert "unexpected tensor 'fc.bias.q'" in info.value.message
    with pytest.raises(CommitmentError) as info:
        decompress(compress(delta(), "topk", 0.1), SPECS, "topk", 0.2)  # another fraction
    assert info.value.code == ErrorCode.BAD_ENCODING


# ------------------------------------------------------------------ the simulated federation


def test_the_simulated_coordinator_gets_the_codec_s_bytes() -> None:
    """Round 1 has no residual yet: organisation 0's committed hash is keccak of the plain
    compression of its honest delta; organisation 1 copies it, and the copy's bytes are the same."""
    from fedledger.simulation import _local_delta, copy_of, run_federation
    from fedledger.tasks import DigitsTask
    from fedledger.tasks.spec import CompressionSection

    compression = CompressionSection(scheme="topk", fraction=0.1)
    fed = run_federation(num_orgs=3, rounds=2, attacks={1: copy_of(0)}, compression=compression)
    task = DigitsTask()
    model = task.build_model(seed=0)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    honest = _local_delta(model, params, task.partition(0, 3, alpha=0.5, seed=0), 0, 1)
    data = canonical_bytes(compress(honest, "topk", 0.1))
    first = fed.rounds[0]
    assert first.update_hashes[0] == "0x" + keccak(data).hex()
    assert first.update_hashes[1] == first.update_hashes[0]
    # top-k and int8 encodings have a size fixed by the shapes: every upload is len(data)
    assert fed.upload_bytes == [3 * len(data), 3 * len(data)]


def test_compression_none_leaves_the_simulation_as_it_was() -> None:
    from fedledger.simulation import run_federation
    from fedledger.tasks.spec import CompressionSection

    plain = run_federation(num_orgs=3, rounds=2)
    none = run_federation(num_orgs=3, rounds=2, compression=CompressionSection())
    for a, b in zip(plain.rounds, none.rounds, strict=True):
        assert (a.update_hashes, a.rewards, a.flags, a.new_hash) == (
            b.update_hashes,
            b.rewards,
            b.flags,
            b.new_hash,
        )
    assert plain.upload_bytes == none.upload_bytes
    assert plain.upload_bytes[0] > 3 * 4 * (
        32 * 64 + 32 + 10 * 32 + 10
    )  # float32 payload + headers

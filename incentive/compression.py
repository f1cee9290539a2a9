"""The update codec nodes and the coordinator share: int8 quantisation and top-k sparsification of
a delta, its strict decoding, and the node's error-feedback memory.

A compressed update is itself a tensor mapping, so what a node uploads and commits is
``canonical_bytes(compress(...))`` and the keccak commitment binds the compressed bytes. The
encoded names are the update's names with a suffix, one set per tensor:

- ``"none"``: ``<name>`` float32, the delta itself (exactly today's upload);
- ``"int8"``: ``<name>.q`` int8, flattened, and ``<name>.scale`` float32, 0-dimensional;
- ``"topk"``: ``<name>.idx`` int64, strictly increasing indices into the flattened tensor,
  and ``<name>.val`` float32, the values there.

No two update names give the same encoded name (each suffix ends in its own letter), so the
mapping decodes unambiguously.

Top-k is taken per tensor, not over the whole update: ``topk_count(numel, fraction)`` of every
tensor's coordinates are kept. Layers differ in scale by orders of magnitude, and a global
threshold would spend the whole budget on the largest layer while biases and the output layer
send nothing for rounds (Deep Gradient Compression, Lin et al. 2018, selects per layer for the
same reason). Per tensor, each tensor's count depends on its shape alone, so the decoder checks
every tensor on its own and can name the one that is wrong.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol, get_args

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from fedledger.errors import CommitmentError, ErrorCode
from fedledger.incentive.commitment import (
    TensorSpec,
    check_header,
    check_update,
    decode_tensors,
    decode_update,
    listing,
    non_finite_tensors,
    spec_differences,
    specs_of,
)
from fedledger.incentive.onchain import CompressionScheme

Scheme = CompressionScheme
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)

INT8_MAX = 127
"""Symmetric int8 range [-127, 127]: -128 is left out so that q and -q both exist."""

_SUFFIXES: dict[Scheme, tuple[str, ...]] = {
    "none": ("",),
    "int8": (".q", ".scale"),
    "topk": (".idx", ".val"),
}


def _check_scheme(scheme: str, fraction: float | None) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown compression scheme {scheme!r}; use one of {list(SCHEMES)}")
    if scheme == "topk":
        if fraction is None:
            raise ValueError("the topk scheme needs a fraction (0 < fraction <= 1)")
        topk_count(1, fraction)  # checks the range
    elif fraction is not None:
        raise ValueError(f"a fraction is only for the topk scheme, not {scheme!r}")


def topk_count(numel: int, fraction: float) -> int:
    """How many of a tensor's ``numel`` coordinates top-k sends: ``ceil(fraction * numel)``.

    The fraction is taken as the decimal it is written as (its shortest repr), so 0.07 of 100
    coordinates is 7, not the 8 that the float product 7.000000000000001 would round up to.
    At least one coordinate of a non-empty tensor is sent, never more than it has.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"a top-k fraction must be in (0, 1], got {fraction}")
    return math.ceil(Fraction(repr(float(fraction))) * numel)


def encoded_names(names: Iterable[str], scheme: Scheme) -> set[str]:
    """The tensor names of an update's encoding under ``scheme``."""
    return {name + suffix for name in names for suffix in _SUFFIXES[scheme]}


def encoded_layout(
    expected: Mapping[str, TensorSpec], scheme: Scheme, fraction: float | None = None
) -> dict[str, TensorSpec]:
    """The names, dtypes and shapes of an update's encoding under ``scheme``: each fixed by the
    model's tensor specs (a top-k tensor sends ``topk_count`` values, whatever the delta)."""
    _check_scheme(scheme, fraction)
    if scheme == "none":
        return dict(expected)
    layout: dict[str, TensorSpec] = {}
    for name, spec in expected.items():
        numel = math.prod(spec.shape)
        if scheme == "int8":
            layout[name + ".q"] = TensorSpec((numel,), torch.int8)
            layout[name + ".scale"] = TensorSpec((), torch.float32)
        else:
            assert fraction is not None  # _check_scheme
            k = topk_count(numel, fraction)
            layout[name + ".idx"] = TensorSpec((k,), torch.int64)
            layout[name + ".val"] = TensorSpec((k,), torch.float32)
    return layout


def compress(
    delta: Mapping[str, Tensor], scheme: Scheme, fraction: float | None = None
) -> dict[str, Tensor]:
    """The encoding of a float32 ``delta`` under ``scheme`` (``fraction`` for ``"topk"`` only).

    Deterministic: the same delta gives the same tensors, hence the same canonical bytes. Ties
    in |x| for the last top-k place go to the lower index. A delta with NaN or an infinity is
    refused (``non_finite``), as the coordinator would refuse it.
    """
    _check_scheme(scheme, fraction)
    for name, tensor in delta.items():
        if tensor.dtype != torch.float32:
            raise ValueError(f"compression encodes float32 tensors; {name!r} is {tensor.dtype}")
    bad = non_finite_tensors(delta)
    if bad:
        raise CommitmentError(
            ErrorCode.NON_FINITE, f"update has NaN or infinite values in {', '.join(bad)}"
        )
    if scheme == "none":
        return dict(delta)
    encoded: dict[str, Tensor] = {}
    for name, tensor in delta.items():
        flat = tensor.detach().to("cpu").reshape(-1)
        if scheme == "int8":
            amax = flat.abs().max() if flat.numel() else torch.tensor(0.0)
            scale = (amax / INT8_MAX).to(torch.float32).reshape(())
            if float(scale) == 0:
                q = torch.zeros(flat.numel(), dtype=torch.int8)
            else:
                q = torch.round(flat / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            encoded[name + ".q"] = q
            encoded[name + ".scale"] = scale
        else:
            assert fraction is not None  # _check_scheme
            k = topk_count(flat.numel(), fraction)
            largest = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
            idx = torch.sort(largest).values.to(torch.int64)
            encoded[name + ".idx"] = idx
            encoded[name + ".val"] = flat[idx]
    return encoded


def _refuse(scheme: str, name: str, problem: str) -> CommitmentError:
    label = "top-k" if scheme == "topk" else scheme
    return CommitmentError(
        ErrorCode.BAD_ENCODING,
        f"the {label} encoding of tensor {name!r} {problem}",
        tensor=name,
    )


def _need(
    encoded: Mapping[str, Tensor], key: str, dtype: torch.dtype, name: str, scheme: str
) -> Tensor:
    tensor = encoded[key]
    if tensor.dtype != dtype:
        part = key.removeprefix(name)
        raise _refuse(
            scheme,
            name,
            f"has {part} of dtype {str(tensor.dtype).removeprefix('torch.')}, "
            f"expected {str(dtype).removeprefix('torch.')}",
        )
    return tensor


def _one_d(tensor: Tensor, part: str, length: int | None, name: str, scheme: str) -> None:
    if tensor.dim() != 1:
        raise _refuse(
            scheme, name, f"has {part} of shape {list(tensor.shape)}; it must be 1-dimensional"
        )
    if length is not None and tensor.numel() != length:
        raise _refuse(
            scheme,
            name,
            f"has {tensor.numel()} {part} values, expected {length} (one per coordinate)",
        )


def _int8_tensor(encoded: Mapping[str, Tensor], name: str, spec: TensorSpec) -> Tensor:
    numel = math.prod(spec.shape)
    q = _need(encoded, name + ".q", torch.int8, name, "int8")
    scale = _need(encoded, name + ".scale", torch.float32, name, "int8")
    _one_d(q, ".q", numel, name, "int8")
    if scale.dim() != 0:
        raise _refuse("int8", name, f"has .scale of shape {list(scale.shape)}; it must be a scalar")
    s = float(scale)
    if not math.isfinite(s) or s < 0:
        raise _refuse("int8", name, f"has scale {s}; a scale must be finite and >= 0")
    if numel and int(q.min()) < -INT8_MAX:  # int8 holds -128, outside the symmetric range
        raise _refuse("int8", name, f"has q value {int(q.min())} outside [-127, 127]")
    if s == 0 and numel and bool(q.any()):
        raise _refuse("int8", name, "has scale 0 but nonzero q values (scale 0 encodes all zeros)")
    dense = (q.to(torch.float32) * scale).reshape(spec.shape)
    if not bool(torch.isfinite(dense).all()):
        raise _refuse("int8", name, f"has scale {s}, too large: q * scale overflows float32")
    return dense


def _topk_tensor(
    encoded: Mapping[str, Tensor], name: str, spec: TensorSpec, fraction: float
) -> Tensor:
    numel = math.prod(spec.shape)
    idx = _need(encoded, name + ".idx", torch.int64, name, "topk")
    val = _need(encoded, name + ".val", torch.float32, name, "topk")
    _one_d(idx, ".idx", None, name, "topk")
    _one_d(val, ".val", None, name, "topk")
    if idx.numel() != val.numel():
        raise _refuse("topk", name, f"has {idx.numel()} indices but {val.numel()} values")
    k = topk_count(numel, fraction)
    if idx.numel() != k:
        raise _refuse(
            "topk",
            name,
            f"has {idx.numel()} values; top-k {fraction} of its {numel} coordinates is exactly {k}",
        )
    if k:
        low, high = int(idx.min()), int(idx.max())
        if low < 0:
            raise _refuse("topk", name, f"has index {low} < 0")
        if high >= numel:
            raise _refuse("topk", name, f"has index {high} >= its {numel} coordinates")
        steps = (idx[1:] <= idx[:-1]).nonzero()
        if steps.numel():
            at = int(steps[0, 0]) + 1
            raise _refuse(
                "topk",
                name,
                f"has indices that are not strictly increasing: {int(idx[at])} follows "
                f"{int(idx[at - 1])} at position {at}",
            )
        if not bool(torch.isfinite(val).all()):
            raise _refuse("topk", name, "has NaN or infinite values")
    dense = torch.zeros(numel, dtype=torch.float32)
    dense[idx] = val
    return dense.reshape(spec.shape)


def decompress(
    encoded: Mapping[str, Tensor],
    expected: Mapping[str, TensorSpec],
    scheme: Scheme,
    fraction: float | None = None,
) -> dict[str, Tensor]:
    """The dense float32 update an encoding stands for, checked against the model's ``expected``
    tensor specs and the encoding's bounds.

    Anything malformed is refused with ``CommitmentError`` code ``bad_encoding``, naming the
    tensor and the bound it breaks. ``"none"`` is today's upload, checked as ``decode_update``
    checks it (codes ``tensor_mismatch`` and ``non_finite``). Reads tensors only: call it on
    ``decode_tensors(data)``, which never unpickles.
    """
    _check_scheme(scheme, fraction)
    for name, spec in expected.items():
        if spec.dtype != torch.float32:
            raise ValueError(f"compression encodes float32 tensors; {name!r} is {spec.describe()}")
    if scheme == "none":
        return check_update(encoded, expected)
    wanted = encoded_names(set(expected), scheme)
    problems = [f"missing tensor {n!r}" for n in sorted(wanted - set(encoded))]
    problems += [f"unexpected tensor {n!r}" for n in sorted(set(encoded) - wanted)]
    if problems:
        label = "top-k" if scheme == "topk" else scheme
        raise CommitmentError(
            ErrorCode.BAD_ENCODING,
            f"the {label} encoding does not match the model: " + listing(problems),
        )
    if scheme == "int8":
        return {name: _int8_tensor(encoded, name, expected[name]) for name in sorted(expected)}
    assert fraction is not None  # _check_scheme
    return {
        name: _topk_tensor(encoded, name, expected[name], fraction) for name in sorted(expected)
    }


class ErrorFeedback:
    """An organisation's memory of what compression held back, added to its next delta.

    With e_0 = 0, round t sends C(delta_t + e_{t-1}) and keeps e_t = delta_t + e_{t-1} - sent_t,
    so the sum of what was sent over t rounds is the sum of the deltas minus e_t: nothing is
    lost, only delayed (Stich et al. 2018, "Sparsified SGD with Memory", Alg. 1; Karimireddy et
    al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", Alg. 2).
    For top-k, ||x - C(x)||^2 <= (1 - k/d) ||x||^2 bounds ||e_t|| by a constant times the
    largest delta. For int8 the residual is the quantisation error, at most scale/2 a coordinate.

    The state is the residual, a float32 tensor mapping with the update's names (empty before
    the first round and always with ``"none"``): persist ``state()`` with safetensors and pass
    it back as ``residual`` to carry on.
    """

    def __init__(
        self,
        scheme: Scheme,
        fraction: float | None = None,
        *,
        residual: Mapping[str, Tensor] | None = None,
    ) -> None:
        _check_scheme(scheme, fraction)
        self.scheme: Scheme = scheme
        self.fraction = fraction
        self._residual = {n: t.detach().clone() for n, t in (residual or {}).items()}

    def state(self) -> dict[str, Tensor]:
        """The residual carried into the next round (a copy)."""
        return {n: t.clone() for n, t in self._residual.items()}

    def step(self, delta: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(encoding to upload, the dense update it stands for)`` for this round's ``delta``;
        the part of ``delta`` plus the residual that was not sent becomes the new residual."""
        delta = {n: t.detach().to("cpu") for n, t in delta.items()}  # the codec works on CPU
        if self._residual:
            problems = spec_differences(self._residual, specs_of(delta))
            if problems:
                raise ValueError(
                    "the error-feedback residual does not match the update: " + "; ".join(problems)
                )
            corrected = {n: t + self._residual[n] for n, t in delta.items()}
        else:
            corrected = dict(delta)
        encoded = compress(corrected, self.scheme, self.fraction)
        sent = decompress(encoded, specs_of(corrected), self.scheme, self.fraction)
        if self.scheme != "none":  # "none" sends everything: nothing to carry
            self._residual = {n: corrected[n] - sent[n] for n in corrected}
        return encoded, sent


class _Section(Protocol):
    @property
    def scheme(self) -> Scheme: ...
    @property
    def fraction(self) -> float | None: ...


@dataclass(frozen=True)
class Codec:
    """The task's update encoding, as the coordinator decodes an upload and a stored update."""

    scheme: Scheme = "none"
    fraction: float | None = None

    @classmethod
    def of(cls, section: _Section) -> Codec:
        """The codec of a spec's ``[compression]`` section."""
        return cls(section.scheme, section.fraction)

    def decode(self, data: bytes, expected: Mapping[str, TensorSpec]) -> dict[str, Tensor]:
        """The dense update the bytes encode, checked against the model's tensor specs
        (``not_safetensors``, ``tensor_mismatch``, ``non_finite``, ``bad_encoding``). The
        header is checked against the encoding's layout before a tensor is parsed."""
        if self.scheme == "none":
            return decode_update(data, expected)
        self.check_header(data, expected)
        return decompress(decode_tensors(data), expected, self.scheme, self.fraction)

    def layout(self, expected: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The tensors an upload of the model's update holds under this encoding."""
        return encoded_layout(expected, self.scheme, self.fraction)

    def check_header(self, data: bytes, expected: Mapping[str, TensorSpec]) -> None:
        """``check_header`` against this encoding's layout: ``tensor_mismatch`` for an
        uncompressed update, ``bad_encoding`` for a compressed one."""
        if self.scheme == "none":
            check_header(data, expected)
            return
        label = "top-k" if self.scheme == "topk" else self.scheme
        check_header(
            data,
            self.layout(expected),
            code=ErrorCode.BAD_ENCODING,
            what=f"the {label} encoding does not match the model",
        )


class FeedbackFile:
    """A node's error feedback across rounds, kept in a file (mode 0600: the residual is part
    of what the node knows of its data) so that a restarted node encodes a round it already
    committed to exactly the committed bytes.

    The file holds the residual the last encoded round started from and the one it left, with
    that round's number: encoding round r again (a restart) starts from the same residual,
    encoding round r + 1 from the one r left.
    """

    def __init__(self, codec: Codec, path: Path | None = None) -> None:
        self.codec = codec
        self.path = path
        self.round_id = 0
        self.before: dict[str, Tensor] = {}
        self.after: dict[str, Tensor] = {}
        if path is not None and path.exists():
            try:
                stored = load_file(str(path))
                metadata = _metadata(path)
                self.round_id = int(metadata["round"])
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(
                    f"the error-feedback file {path} is unreadable ({exc}); it holds what "
                    "compression held back from earlier rounds: restore it, or remove it to "
                    "start afresh (its delayed updates are then lost)"
                ) from None
            self.before = {k[7:]: t for k, t in stored.items() if k.startswith("before/")}
            self.after = {k[6:]: t for k, t in stored.items() if k.startswith("after/")}

    def encode(self, round_id: int, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The encoding to commit and upload for round ``round_id``'s ``delta``."""
        start = self.before if round_id == self.round_id else self.after
        feedback = ErrorFeedback(self.codec.scheme, self.codec.fraction, residual=start)
        encoded, _ = feedback.step(delta)
        self.round_id, self.before, self.after = round_id, dict(start), feedback.state()
        self._save()
        return encoded

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"before/{n}": t.contiguous() for n, t in self.before.items()}
        tensors |= {f"after/{n}": t.contiguous() for n, t in self.after.items()}
        data = save(tensors, metadata={"round": str(self.round_id)})
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        tmp.replace(self.path)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})

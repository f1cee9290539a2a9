"""Canonical bytes of a tensor mapping (safetensors), their keccak commitment, and safe decoding.

Both sides call the same functions, so a node's commitment and the coordinator's check agree
byte for byte. Decoding never unpickles: safetensors is a JSON header plus raw buffers, and the
header is read first (``check_header``), so a file naming other tensors than the model's, or
thousands of them, is refused before one tensor is parsed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from eth_hash.auto import keccak as _keccak
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fedledger.errors import CommitmentError, ErrorCode


@dataclass(frozen=True)
class TensorSpec:
    """The name-independent signature of one tensor: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""The safetensors header's name of each dtype a model holds (the format's ``dtype`` field)."""

SAFETENSORS_MAX_HEADER = 100_000_000
"""The longest header the safetensors format reads (its ``MAX_HEADER_SIZE``)."""

MAX_LISTED = 8
"""How many problems a refusal lists by name; the rest are counted."""


def listing(problems: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``problems`` joined for a message: the first ``limit`` by name, then how many more."""
    shown = "; ".join(problems[:limit])
    more = len(problems) - limit
    return f"{shown}; and {more} more" if more > 0 else shown


def keccak(data: bytes) -> bytes:
    """keccak256 of ``data`` (the hash the EVM computes)."""
    digest: bytes = _keccak(data)
    return digest


def canonical_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The deterministic safetensors encoding of ``tensors`` (CPU, contiguous, no metadata)."""
    plain: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:  # tied weights: safetensors stores each buffer once, so copy
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    data: bytes = _st_save(plain, metadata=None)
    return data


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, bytes]:
    """``(canonical bytes, keccak256 of them)`` for a tensor mapping: what a node uploads and
    what it commits on-chain (the ledger's ``commitmentOf`` is what it committed)."""
    data = canonical_bytes(tensors)
    return data, keccak(data)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Shape and dtype of every tensor, by name."""
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}


def header_bound(layout: Mapping[str, TensorSpec]) -> int:
    """The most bytes a safetensors header listing ``layout`` takes, whichever writer made it:
    per tensor its name (escaped), dtype, shape and 20-digit offsets, plus spacing, padding and
    a small ``__metadata__`` map."""
    per_tensor = sum(6 * len(name.encode()) + 128 + 24 * len(s.shape) for name, s in layout.items())
    return 1024 + per_tensor


def buffer_bytes(layout: Mapping[str, TensorSpec]) -> int:
    """The bytes after the header of a safetensors file of ``layout``: every tensor's buffer,
    which the format requires to fill the rest of the file exactly."""
    return sum(
        math.prod(s.shape) * torch.empty((), dtype=s.dtype).element_size() for s in layout.values()
    )


def header_end(prefix: bytes) -> int | None:
    """Where the safetensors header of a file starting with ``prefix`` ends (its length field
    plus the header), or None while fewer than the length field's 8 bytes are in."""
    if len(prefix) < 8:
        return None
    return 8 + int.from_bytes(prefix[:8], "little")


def _not_safetensors(problem: str) -> CommitmentError:
    return CommitmentError(
        ErrorCode.NOT_SAFETENSORS, f"the body is not a safetensors tensor file: {problem}"
    )


def _entry_spec(name: str, entry: object) -> tuple[str, tuple[int, ...]]:
    """``(dtype name, shape)`` of one header entry, or ``not_safetensors`` if it is not one."""
    if isinstance(entry, dict):
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
        ):
            return dtype, tuple(shape)
    raise _not_safetensors(f"header entry {name[:64]!r} is not a tensor (dtype, shape, offsets)")


def check_header(
    data: bytes,
    layout: Mapping[str, TensorSpec],
    *,
    code: ErrorCode = ErrorCode.TENSOR_MISMATCH,
    what: str = "update does not match the model",
) -> None:
    """Refuse ``data`` unless its safetensors header lists exactly ``layout``'s tensors, with
    their dtypes and shapes, before any tensor is parsed.

    The header's length is bounded by what ``layout`` needs (``header_bound``), so a header
    naming thousands of tensors is refused at its first eight bytes, and the JSON parsed is a
    few hundred bytes a tensor. Differences are refused with ``code`` (at most ``MAX_LISTED``
    named); a header that is not safetensors at all with ``not_safetensors``.
    """
    end = header_end(data)
    if end is None:
        raise _not_safetensors(f"{len(data)} bytes, fewer than the header's 8-byte length")
    size = end - 8
    if size > SAFETENSORS_MAX_HEADER:
        raise _not_safetensors(f"it declares a header of {size} bytes, more than the format allows")
    bound = header_bound(layout)
    if size > bound:  # refused on its length alone: ``data`` may be the body's first bytes
        raise CommitmentError(
            code,
            f"{what}: the safetensors header is {size} bytes; the model's {len(layout)} tensors "
            f"need at most {bound}",
        )
    if size > len(data) - 8:
        raise _not_safetensors(
            f"it declares a header of {size} bytes and only {len(data) - 8} follow its length"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError):
        raise _not_safetensors("its header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors("its header is not a JSON object")
    header.pop("__metadata__", None)
    found = {name: _entry_spec(name, entry) for name, entry in header.items()}
    problems = [f"missing tensor {n!r}" for n in sorted(set(layout) - set(found))]
    problems += [f"unexpected tensor {n[:64]!r}" for n in sorted(set(found) - set(layout))]
    for name in sorted(set(layout) & set(found)):
        dtype, shape = found[name]
        want = layout[name]
        want_dtype = SAFETENSORS_DTYPES.get(want.dtype, dtype)  # another dtype: checked parsed
        if (dtype, shape) != (want_dtype, want.shape):
            problems.append(
                f"tensor {name!r} is {_describe(dtype, shape)}, expected {want.describe()}"
            )
    if problems:
        raise CommitmentError(code, f"{what}: " + listing(problems))


_TORCH_NAMES = {v: str(k).removeprefix("torch.") for k, v in SAFETENSORS_DTYPES.items()}


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    """A header entry as ``TensorSpec.describe`` writes a tensor: ``float32[3, 4]``."""
    return f"{_TORCH_NAMES.get(dtype, dtype[:16])}{list(shape)}"


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse canonical bytes back into tensors; anything that is not safetensors is refused."""
    try:
        return dict(_st_load(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError, KeyError, TypeError) as exc:
        # KeyError: a safetensors dtype torch cannot represent (F4, F6_*, F8_E8M0, ...)
        raise CommitmentError(
            ErrorCode.NOT_SAFETENSORS,
            "the body is not a safetensors tensor file (pickled or other formats are refused)",
        ) from exc


def spec_differences(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]
) -> list[str]:
    """Human-readable differences between ``tensors`` and the ``expected`` names, shapes and dtypes."""
    problems = [f"missing tensor {n!r}" for n in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected tensor {n!r}" for n in sorted(set(tensors) - set(expected))]
    for name in sorted(set(expected) & set(tensors)):
        got = TensorSpec(tuple(tensors[name].shape), tensors[name].dtype)
        if got != expected[name]:
            problems.append(
                f"tensor {name!r} is {got.describe()}, expected {expected[name].describe()}"
            )
    return problems


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of tensors holding NaN or an infinity."""
    return [
        name
        for name in sorted(tensors)
        if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all())
    ]


def decode_update(data: bytes, expected: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Decode an uploaded update and check it against the model's tensor specs.

    Raises CommitmentError with code ``not_safetensors``, ``tensor_mismatch`` or ``non_finite``.
    The header is checked before the tensors are parsed (``check_header``).
    """
    check_header(data, expected)
    return check_update(decode_tensors(data), expected)


def check_update(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]
) -> dict[str, torch.Tensor]:
    """``tensors`` if they are the model's (names, shapes, dtypes) and finite; CommitmentError
    ``tensor_mismatch`` or ``non_finite`` otherwise."""
    problems = spec_differences(tensors, expected)
    if problems:
        raise CommitmentError(
            ErrorCode.TENSOR_MISMATCH, "update does not match the model: " + listing(problems)
        )
    bad = non_finite_tensors(tensors)
    if bad:
        raise CommitmentError(
            ErrorCode.NON_FINITE, f"update has NaN or infinite values in {', '.join(bad)}"
        )
    return dict(tensors)

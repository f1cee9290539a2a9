"""Canonical bytes of a tensor mapping (safetensors), their keccak commitment, and safe decoding.

Both sides call the same functions, so a node's commitment and the coordinator's check agree
byte for byte. Decoding never unpickles: safetensors is a JSON header plus raw buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """
    return check_update(decode_tensors(data), expected)


def check_update(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]
) -> dict[str, torch.Tensor]:
    """``tensors`` if they are the model's (names, shapes, dtypes) and finite; CommitmentError
    ``tensor_mismatch`` or ``non_finite`` otherwise."""
    problems = spec_differences(tensors, expected)
    if problems:
        raise CommitmentError(
            ErrorCode.TENSOR_MISMATCH, "update does not match the model: " + "; ".join(problems)
        )
    bad = non_finite_tensors(tensors)
    if bad:
        raise CommitmentError(
            ErrorCode.NON_FINITE, f"update has NaN or infinite values in {', '.join(bad)}"
        )
    return dict(tensors)

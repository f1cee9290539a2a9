"""Tensor-mapping helpers shared by the books, the utilities and the upload gate: flatten, unflatten
and the one global L2 norm every bound is measured with."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

_NORM_CHUNK = 1 << 16


def flatten(params: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """All tensors of ``params`` as one 1-D ``dtype`` vector, concatenated in sorted-name order."""
    if not params:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([params[name].detach().reshape(-1).to(dtype) for name in sorted(params)])


def flatten_rows(
    rows: Sequence[Mapping[str, Tensor]], *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``torch.stack([flatten(r, dtype=dtype) for r in rows])`` (shape (K, P)), each tensor
    converted straight into its place: no list of K flat copies beside the result, which for
    K updates of a large model is as much memory again (and fresh memory costs page faults)."""
    if not rows:
        return torch.zeros(0, 0, dtype=dtype)
    names = sorted(rows[0])
    size = sum(rows[0][name].numel() for name in names)
    out = torch.empty(len(rows), size, dtype=dtype)
    for k, row in enumerate(rows):
        if sorted(row) != names:
            raise ValueError(f"row {k} has tensors {sorted(row)}, row 0 has {names}")
        offset = 0
        for name in names:
            tensor = row[name].detach().reshape(-1)
            if offset + tensor.numel() > size:
                raise ValueError(f"row {k} has more than the {size} numbers of row 0")
            out[k, offset : offset + tensor.numel()].copy_(tensor)
            offset += tensor.numel()
        if offset != size:
            raise ValueError(f"row {k} has {offset} numbers, row 0 has {size}")
    return out


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``flatten``: tensors shaped and typed like ``like``, on ``flat``'s device."""
    return unflatten_batched(flat, like, batch_shape=())


def unflatten_batched(
    flat: Tensor, like: Mapping[str, Tensor], *, batch_shape: tuple[int, ...]
) -> dict[str, Tensor]:
    """``unflatten`` of a batch of flat vectors (shape ``(*batch_shape, P)``)."""
    total = sum(like[name].numel() for name in like)
    if tuple(flat.shape) != (*batch_shape, total):
        raise ValueError(
            f"flat vector has shape {tuple(flat.shape)}; expected {(*batch_shape, total)} "
            f"for {len(like)} tensors"
        )
    out: dict[str, Tensor] = {}
    offset = 0
    for name in sorted(like):
        ref = like[name]
        piece = flat[..., offset : offset + ref.numel()].reshape((*batch_shape, *ref.shape))
        if not ref.dtype.is_floating_point and piece.dtype.is_floating_point:
            piece = piece.round()
        out[name] = piece.to(ref.dtype)
        offset += ref.numel()
    return out


def l2_norm(tensors: Mapping[str, Tensor]) -> float:
    """sqrt(sum over every tensor of its squared L2 norm), accumulated in float64.

    The one norm fedledger measures updates with: the upload gate (``max_update_norm``), the
    round's clipping bound and the flags all agree on which side of a bound an update lies.
    Chunk by chunk, in sorted-name order: a float64 copy of a whole large tensor costs more
    than the sum.
    """
    total = 0.0
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        for start in range(0, flat.numel(), _NORM_CHUNK):
            total += float(flat[start : start + _NORM_CHUNK].to(torch.float64).square().sum())
    return math.sqrt(total)

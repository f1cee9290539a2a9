"""Pure FedAvg server aggregation: the sample-weighted average of client updates applied to the model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..incentive.valuation import flatten, unflatten

__all__ = ["fedavg", "flatten", "unflatten"]


def fedavg(
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    num_samples: Sequence[int],
    *,
    eta: float = 1.0,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """w + eta * sum_k (n_k / n) delta_k with n = sum_k n_k: the new global model.

    FedAvg, McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", eq. (1) written on updates delta_k = w_k - w, with the server learning
    rate eta of Reddi et al. (2021), "Adaptive Federated Optimization" (eta = 1 is plain FedAvg).
    FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks") aggregates on
    the server with this same weighted average; its proximal term lives in the client objective.

    Computed on ``device`` (cuda when available, else cpu) in float32, or in the tensor's own
    dtype where that is wider (float64); integer tensors are rounded back. Returns contiguous
    CPU tensors with ``base``'s names, shapes and dtypes. The sum is mathematically independent
    of the order of (delta, num_samples) pairs, but float addition is not associative: callers
    that need bit-identical models across runs pass the pairs in a fixed order (the
    coordinator sorts them by organisation address).
    """
    _validate(base, deltas, num_samples, eta)
    dev = (
        device
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    total = sum(int(n) for n in num_samples)
    weights = [int(n) / total for n in num_samples]
    out: dict[str, Tensor] = {}
    for name in sorted(base):
        ref = base[name]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        acc = torch.zeros(ref.shape, dtype=dtype, device=dev)
        for delta, weight in zip(deltas, weights, strict=True):
            acc.add_(delta[name].detach().to(dev, dtype), alpha=weight)
        acc.mul_(eta).add_(ref.detach().to(dev, dtype))
        if not ref.dtype.is_floating_point and not ref.dtype.is_complex:
            acc.round_()
        out[name] = acc.to("cpu", ref.dtype).contiguous()
    return out


def _validate(
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    num_samples: Sequence[int],
    eta: float,
) -> None:
    if not deltas:
        raise ValueError("fedavg needs at least one update; got none")
    if len(deltas) != len(num_samples):
        raise ValueError(f"{len(deltas)} updates but {len(num_samples)} sample counts")
    if not math.isfinite(eta):
        raise ValueError(f"eta must be finite, got {eta}")
    for k, n in enumerate(num_samples):
        if isinstance(n, bool) or int(n) != n or n <= 0:
            raise ValueError(
                f"update {k} has num_samples={n!r}; sample counts must be integers > 0"
            )
    names = set(base)
    for k, delta in enumerate(deltas):
        if set(delta) != names:
            missing = sorted(names - set(delta))
            extra = sorted(set(delta) - names)
            raise ValueError(
                f"update {k} has different tensors from the model: missing {missing}, "
                f"unexpected {extra}"
            )
        for name in sorted(names):
            if tuple(delta[name].shape) != tuple(base[name].shape):
                raise ValueError(
                    f"update {k}: tensor {name!r} has shape {tuple(delta[name].shape)}, "
                    f"the model's is {tuple(base[name].shape)}"
                )

"""Pure server aggregation: FedAvg, its Byzantine-robust alternatives and norm clipping of an update."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fedledger.coordinator.policy import AggregationMethod
from fedledger.devices import resolve_device
from fedledger.incentive.tensors import l2_norm
from fedledger.incentive.utility import capped_weights

__all__ = [
    "aggregate",
    "clip_by_norm",
    "coordinate_median",
    "fedavg",
    "trimmed_mean",
]


def fedavg(
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    num_samples: Sequence[int],
    *,
    eta: float = 1.0,
    device: torch.device | None = None,
    max_share: float | None = None,
) -> dict[str, Tensor]:
    """w + eta * sum_k (n_k / n) delta_k with n = sum_k n_k: the new global model.

    With ``max_share``, the weights are ``capped_weights(num_samples, max_share)`` instead of
    n_k / n: no declared sample count, however large, makes one update more than that share.

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
    coordinator passes them in on-chain commit order).
    """
    _validate(base, deltas, num_samples, eta)
    dev = resolve_device(device)
    weights = capped_weights(num_samples, 1.0 if max_share is None else max_share)
    out: dict[str, Tensor] = {}
    for name in sorted(base):
        ref = base[name]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        # One delta at a time: the sum runs at memory bandwidth, with no K-fold stack.
        acc = torch.zeros(ref.shape, dtype=dtype, device=dev)
        for delta, weight in zip(deltas, weights, strict=True):
            acc.add_(delta[name].detach().to(dev, dtype), alpha=weight)
        out[name] = _step_from(ref, acc, eta)
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


def clip_by_norm(
    delta: Mapping[str, Tensor], max_norm: float, *, norm: float | None = None
) -> dict[str, Tensor]:
    """``delta`` scaled by min(1, max_norm / ||delta||), ||delta|| the global L2 norm.

    Norm clipping of client updates: Sun et al. (2019), "Can You Really Backdoor Federated
    Learning?", Sec. 4 (norm thresholding, delta / max(1, ||delta|| / M)), the defence against
    the model-replacement attack of Bagdasaryan et al. (2020), "How To Backdoor Federated
    Learning", which boosts a malicious update so that it survives averaging. ``norm`` is
    ||delta|| when the caller has it already (``fedledger.incentive.tensors.l2_norm``, which is
    what is taken otherwise). A delta within the bound comes back with its tensors as they are
    (not copied); a clipped one has norm ``max_norm`` up to the rounding of its dtype (float32:
    a relative 1e-6).
    """
    _check_bound(max_norm, "max_norm")
    norm = l2_norm(delta) if norm is None else norm
    if not math.isfinite(norm):
        raise ValueError(f"the delta's L2 norm is {norm}; updates must be finite to be clipped")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return {name: _scale_tensor(delta[name], scale) for name in sorted(delta)}


def coordinate_median(
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    *,
    eta: float = 1.0,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """w + eta * med_k delta_k, the median taken coordinate by coordinate and unweighted.

    Coordinate-wise median, Yin et al. (2018), "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", Definition 1, written on updates: each coordinate of the step
    is the usual one-dimensional median of that coordinate over the K deltas (the mean of the
    two middle values when K is even), so fewer than K/2 arbitrary deltas cannot move a
    coordinate outside the range of the honest ones. Sample counts play no part. Computed,
    returned and typed like ``fedavg``; the result does not depend on the order of the deltas.
    """
    _check_updates(base, deltas, eta, "median aggregation")

    def median(stacked: Tensor) -> Tensor:
        ordered = torch.sort(stacked, dim=0).values
        count = ordered.shape[0]
        middle = ordered[count // 2]
        if count % 2 == 1:
            return middle
        return (ordered[count // 2 - 1] + middle) / 2

    return _coordinatewise(base, deltas, median, eta=eta, device=device)


def trimmed_mean(
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    *,
    trim_fraction: float,
    eta: float = 1.0,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """w + eta * trmean_beta(delta_1..K): per coordinate, the mean after dropping the b largest
    and the b smallest values, b = floor(beta * K), beta = ``trim_fraction`` in [0, 1/2).

    Coordinate-wise trimmed mean, Yin et al. (2018), "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", Definition 2 (there beta * K is an integer; here it is
    rounded down, so beta = 0 is the plain unweighted mean). Up to b arbitrary deltas cannot move
    a coordinate outside the range of the honest ones. Sample counts play no part. Computed,
    returned and typed like ``fedavg``; the result does not depend on the order of the deltas.
    """
    _check_trim_fraction(trim_fraction)
    _check_updates(base, deltas, eta, "trimmed-mean aggregation")
    # Rounded to 9 decimals first, so that 0.29 * 100 = 28.999999999999996 in float64 trims 29,
    # as the decimal fraction says, not 28.
    trim = math.floor(round(trim_fraction * len(deltas), 9))

    def trimmed(stacked: Tensor) -> Tensor:
        ordered = torch.sort(stacked, dim=0).values
        return ordered[trim : ordered.shape[0] - trim].mean(dim=0)

    return _coordinatewise(base, deltas, trimmed, eta=eta, device=device)


def aggregate(
    method: AggregationMethod,
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    num_samples: Sequence[int],
    *,
    eta: float = 1.0,
    device: torch.device | None = None,
    trim_fraction: float = 0.2,
    max_share: float | None = None,
) -> dict[str, Tensor]:
    """The new global model by ``method`` (``max_share`` caps FedAvg's weights).

    ``"fedavg"`` is the sample-weighted ``fedavg``; ``"median"`` and ``"trimmed_mean"`` are the
    unweighted ``coordinate_median`` and ``trimmed_mean`` (with ``trim_fraction``). Clipping is
    the books' step before this one (``fedledger.coordinator.books.clip``).
    """
    if method not in ("fedavg", "median", "trimmed_mean"):
        raise ValueError(
            f"unknown aggregation method {method!r}; expected 'fedavg', 'median' or 'trimmed_mean'"
        )
    if not deltas:
        raise ValueError(f"{method} aggregation needs at least one update; got none")
    _validate(base, deltas, num_samples, eta)  # fedavg's refusals, sample counts included
    if method == "fedavg":
        return fedavg(base, deltas, num_samples, eta=eta, device=device, max_share=max_share)
    if method == "median":
        return coordinate_median(base, deltas, eta=eta, device=device)
    return trimmed_mean(base, deltas, trim_fraction=trim_fraction, eta=eta, device=device)


def _coordinatewise(
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    reduce: Callable[[Tensor], Tensor],
    *,
    eta: float,
    device: torch.device | None,
) -> dict[str, Tensor]:
    """w + eta * reduce(stack_k delta_k[name]) for each tensor, one tensor's K copies at a time."""
    dev = resolve_device(device)
    out: dict[str, Tensor] = {}
    for name in sorted(base):
        ref = base[name]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        stacked = torch.stack([delta[name].detach().to(dev, dtype) for delta in deltas])
        acc = reduce(stacked)
        del stacked
        out[name] = _step_from(ref, acc, eta)
    return out


def _step_from(ref: Tensor, acc: Tensor, eta: float) -> Tensor:
    """ref + eta * acc, the step of every rule: computed in ``acc``'s dtype and device (float32
    or wider), rounded back for integer tensors, returned contiguous on the CPU as ref's dtype."""
    acc.mul_(eta).add_(ref.detach().to(acc.device, acc.dtype))
    if not ref.dtype.is_floating_point and not ref.dtype.is_complex:
        acc.round_()
    return acc.to("cpu", ref.dtype).contiguous()


def _scale_tensor(tensor: Tensor, scale: float) -> Tensor:
    if scale == 1.0:
        return tensor
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return tensor.detach() * scale
    return (tensor.detach().to(torch.float64) * scale).round_().to(tensor.dtype)


def _check_bound(value: float, what: str) -> None:
    if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def _check_trim_fraction(trim_fraction: float) -> None:
    if isinstance(trim_fraction, bool) or not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")


def _check_updates(
    base: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], eta: float, what: str
) -> None:
    """The refusals ``fedavg`` makes that do not involve sample counts, named for ``what``."""
    if not deltas:
        raise ValueError(f"{what} needs at least one update; got none")
    _validate(base, deltas, [1] * len(deltas), eta)

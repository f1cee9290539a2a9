"""Pure server aggregation: FedAvg, its Byzantine-robust alternatives and norm clipping of updates."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedledger.incentive.valuation import flatten, unflatten

__all__ = [
    "AggregationMethod",
    "AggregationResult",
    "aggregate",
    "clip_by_norm",
    "coordinate_median",
    "fedavg",
    "flatten",
    "median_norm_bound",
    "trimmed_mean",
    "unflatten",
]

AggregationMethod = Literal["fedavg", "median", "trimmed_mean"]


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


# ------------------------------------------------------------------ robust aggregation


@dataclass(frozen=True)
class AggregationResult:
    """A new global model, which updates were norm-clipped to make it, and every update's norm."""

    params: dict[str, Tensor]  # the new global model: base's names, shapes and dtypes, on CPU
    clipped: list[int]  # indices (into the deltas given) whose norm exceeded the bound
    norms: list[float]  # each delta's global L2 norm before clipping


def clip_by_norm(delta: Mapping[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], float]:
    """``delta`` scaled by min(1, max_norm / ||delta||), and ||delta||, the global L2 norm.

    Norm clipping of client updates: Sun et al. (2019), "Can You Really Backdoor Federated
    Learning?", Sec. 4 (norm thresholding, delta / max(1, ||delta|| / M)), the defence against
    the model-replacement attack of Bagdasaryan et al. (2020), "How To Backdoor Federated
    Learning", which boosts a malicious update so that it survives averaging. The norm is taken
    over all tensors together and accumulated in float64. A delta within the bound comes back
    with its tensors as they are (not copied); a clipped one has norm ``max_norm`` up to the
    rounding of its dtype (float32: a relative 1e-6).
    """
    _check_bound(max_norm, "max_norm")
    norm = _global_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(f"the delta's L2 norm is {norm}; updates must be finite to be clipped")
    scale = _clip_scale(norm, max_norm)
    return {name: _scale_tensor(delta[name], scale) for name in sorted(delta)}, norm


def median_norm_bound(deltas: Sequence[Mapping[str, Tensor]], multiplier: float) -> float:
    """multiplier * median_k ||delta_k||: a clipping bound set by the round's own updates.

    The median has breakdown point 1/2 (Hampel 1971, "A General Qualitative Definition of
    Robustness"): while fewer than half of the deltas are corrupted, the median norm lies between
    the smallest and the largest honest norm however large the others are, so a few boosted
    updates cannot raise the bound. It is the one-shot analogue of the quantile-tracking clipping
    bound of Andrew et al. (2021), "Differentially Private Learning with Adaptive Clipping".
    For an even count the median is the mean of the two middle norms.
    """
    if not deltas:
        raise ValueError("a norm bound needs at least one update; got none")
    _check_bound(multiplier, "multiplier")
    norms = [_global_norm(d) for d in deltas]
    _check_finite_norms(norms)
    return multiplier * statistics.median(norms)


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
    clip_norm: float | None = None,
) -> AggregationResult:
    """The new global model by ``method``, after clipping every delta to ``clip_norm`` if given.

    ``"fedavg"`` is the sample-weighted ``fedavg``; ``"median"`` and ``"trimmed_mean"`` are the
    unweighted ``coordinate_median`` and ``trimmed_mean`` (with ``trim_fraction``). With
    ``clip_norm``, a delta whose global L2 norm exceeds it is scaled down to it first
    (``clip_by_norm``) and its index reported in ``clipped``; then no clipped delta moves the
    model by more than eta * (its FedAvg weight) * clip_norm, and the model moves by at most
    eta * clip_norm in all under FedAvg (the triangle inequality). Deltas are scaled one tensor
    at a time as they are read, not copied whole. Non-finite deltas raise ``ValueError``.
    """
    if method not in ("fedavg", "median", "trimmed_mean"):
        raise ValueError(
            f"unknown aggregation method {method!r}; expected 'fedavg', 'median' or 'trimmed_mean'"
        )
    if not deltas:
        raise ValueError(f"{method} aggregation needs at least one update; got none")
    _validate(base, deltas, num_samples, eta)  # fedavg's refusals, sample counts included
    if method == "trimmed_mean":
        _check_trim_fraction(trim_fraction)
    if clip_norm is not None:
        _check_bound(clip_norm, "clip_norm")
    norms = [_global_norm(d) for d in deltas]
    _check_finite_norms(norms)
    clipped = [k for k, n in enumerate(norms) if clip_norm is not None and n > clip_norm]
    inputs: list[Mapping[str, Tensor]] = list(deltas)
    for k in clipped:
        assert clip_norm is not None
        inputs[k] = _ScaledDelta(deltas[k], _clip_scale(norms[k], clip_norm))
    if method == "fedavg":
        params = fedavg(base, inputs, num_samples, eta=eta, device=device)
    elif method == "median":
        params = coordinate_median(base, inputs, eta=eta, device=device)
    else:
        params = trimmed_mean(base, inputs, trim_fraction=trim_fraction, eta=eta, device=device)
    return AggregationResult(params=params, clipped=clipped, norms=norms)


def _resolve_device(device: torch.device | None) -> torch.device:
    if device is not None:
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _coordinatewise(
    base: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    reduce: Callable[[Tensor], Tensor],
    *,
    eta: float,
    device: torch.device | None,
) -> dict[str, Tensor]:
    """w + eta * reduce(stack_k delta_k[name]) for each tensor, one tensor's K copies at a time."""
    dev = _resolve_device(device)
    out: dict[str, Tensor] = {}
    for name in sorted(base):
        ref = base[name]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        stacked = torch.stack([delta[name].detach().to(dev, dtype) for delta in deltas])
        acc = reduce(stacked)
        del stacked
        acc.mul_(eta).add_(ref.detach().to(dev, dtype))
        if not ref.dtype.is_floating_point and not ref.dtype.is_complex:
            acc.round_()
        out[name] = acc.to("cpu", ref.dtype).contiguous()
    return out


_NORM_CHUNK = 1 << 16


def _global_norm(delta: Mapping[str, Tensor]) -> float:
    """sqrt(sum over every tensor of its squared L2 norm), accumulated in float64."""
    total = 0.0
    for name in sorted(delta):
        # Chunk by chunk: a float64 copy of a whole large tensor costs more than the sum.
        flat = delta[name].detach().reshape(-1)
        for start in range(0, flat.numel(), _NORM_CHUNK):
            total += float(flat[start : start + _NORM_CHUNK].to(torch.float64).square().sum())
    return math.sqrt(total)


def _clip_scale(norm: float, max_norm: float) -> float:
    return 1.0 if norm <= max_norm else max_norm / norm


def _scale_tensor(tensor: Tensor, scale: float) -> Tensor:
    if scale == 1.0:
        return tensor
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return tensor.detach() * scale
    return (tensor.detach().to(torch.float64) * scale).round_().to(tensor.dtype)


class _ScaledDelta(Mapping[str, Tensor]):
    """A read-only view of a delta times ``scale``, each tensor scaled only when it is read."""

    def __init__(self, delta: Mapping[str, Tensor], scale: float) -> None:
        self._delta = delta
        self._scale = scale

    def __getitem__(self, name: str) -> Tensor:
        return _scale_tensor(self._delta[name], self._scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self._delta)

    def __len__(self) -> int:
        return len(self._delta)


def _check_bound(value: float, what: str) -> None:
    if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def _check_trim_fraction(trim_fraction: float) -> None:
    if isinstance(trim_fraction, bool) or not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")


def _check_finite_norms(norms: Sequence[float]) -> None:
    bad = [k for k, n in enumerate(norms) if not math.isfinite(n)]
    if bad:
        raise ValueError(f"update(s) {bad} have NaN or infinite values; updates must be finite")


def _check_updates(
    base: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], eta: float, what: str
) -> None:
    """The refusals ``fedavg`` makes that do not involve sample counts, named for ``what``."""
    if not deltas:
        raise ValueError(f"{what} needs at least one update; got none")
    _validate(base, deltas, [1] * len(deltas), eta)

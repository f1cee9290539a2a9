"""The noisy-replay screen: an update that is another organisation's update of the round before
plus noise is flagged, unless that earlier update was itself flagged as not its sender's data."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedledger.coordinator.books import RoundInputs, UpdateInput, screen
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.onchain import Flag
from fedledger.incentive.tensors import flatten

K = 6
SUSPECT, SOURCE = 0, 1


def _round(source_flags: int) -> RoundInputs:
    """Organisation 0 uploads v + 0.2 noise, where v is organisation 1's update of the round
    before; its own update of the round before is 0.6 v + 0.8 w (so that, unprojected, it lines
    up with its own history). Organisation 1 uploads noise (flagged as such: beside the point
    here). The others upload random directions that line up with their own earlier ones."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    shapes = {n: t.shape for n, t in base.items()}
    size = sum(t.numel() for t in base.values())

    def tensors(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape in shapes.items():
            count = math.prod(shape)
            out[name] = flat[start : start + count].reshape(shape).to(torch.float32)
            start += count
        return out

    def direction() -> torch.Tensor:
        d = torch.randn(size, dtype=torch.float64)
        return d / torch.linalg.vector_norm(d)

    v, w = direction(), direction()
    current, previous = [], []
    for k in range(K):
        if k == SUSPECT:
            current.append(v + 0.2 * direction())
            previous.append(0.6 * v + 0.8 * w)
        elif k == SOURCE:
            current.append(direction())
            previous.append(v)
        else:
            r = direction()
            current.append(r)
            previous.append(0.8 * r + 0.6 * direction())
    updates = [
        UpdateInput(
            organisation=f"0x{k + 1:040x}",
            update_hash=f"0x{k + 1:064x}",
            num_samples=50,
            delta=tensors(current[k]),
            previous=tensors(previous[k]),
            previous_flags=source_flags if k == SOURCE else 0,
        )
        for k in range(K)
    ]
    x_val = torch.randn(50, 64)
    y_val = torch.randint(0, 64, (50,))
    return RoundInputs(5, model, base, updates, x_val, y_val)


def _screened(source_flags: int) -> tuple[list[int], dict[int, str]]:
    inputs = _round(source_flags)
    norms = [float(torch.linalg.vector_norm(flatten(u.delta))) for u in inputs.updates]
    result = screen(inputs, norms, PricingPolicy())
    return result.flags, result.notes


def test_another_organisations_earlier_update_plus_noise_is_flagged() -> None:
    flags, notes = _screened(source_flags=0)
    assert flags[SUSPECT] & Flag.UNALIGNED_UPDATE
    assert "a noisy replay of the update of 0x" + f"{SOURCE + 1:040x}" in notes[SUSPECT]
    assert all(flags[k] == 0 for k in range(2, K)), flags  # the honest ones are kept


def test_an_earlier_update_that_was_itself_a_copy_is_no_source() -> None:
    """Had organisation 1's update of the round before been a replay (of organisation 0's
    older update, say), organisation 0 being close to it says nothing."""
    for flag in (Flag.COPIED_UPDATE, Flag.DUPLICATE_UPDATE, Flag.UNALIGNED_UPDATE):
        flags, _ = _screened(source_flags=int(flag))
        assert flags[SUSPECT] == 0 and all(flags[k] == 0 for k in range(2, K)), (flag, flags)

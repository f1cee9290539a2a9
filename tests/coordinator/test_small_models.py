"""The screen on models too small for a direction test: a linear regression on four features
(five parameters) has honest updates no more aligned with each other than noise could be."""

from __future__ import annotations

import torch
from torch import nn

from fedledger.coordinator.books import NOISE_TEST_MAX_COSINE, RoundInputs, UpdateInput, close_books
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.onchain import Flag


def _update(k: int, delta: dict[str, torch.Tensor]) -> UpdateInput:
    return UpdateInput(
        organisation=f"0x{k + 1:040x}",
        update_hash="0x" + encode_tensors(delta)[1].hex(),
        num_samples=50,
        delta=delta,
    )


def test_the_noise_test_abstains_where_any_direction_looks_like_noise() -> None:
    """With 5 parameters |z| = |cos| * sqrt(5) < 3 for every direction, so the noise test
    would flag every update, honest or not; it abstains instead, and pricing goes by value."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    weights = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    x_val = torch.randn(200, 4)
    y_val = (x_val @ weights.T).squeeze(-1) + 0.1 * torch.randn(200)
    updates = []
    for k in range(3):  # each organisation steps towards the true weights from its own sample
        x = torch.randn(50, 4)
        y = (x @ weights.T).squeeze(-1) + 0.5 * torch.randn(50)
        solution = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.T
        updates.append(
            _update(k, {"weight": 0.3 * (solution - base["weight"]), "bias": -0.3 * base["bias"]})
        )
    policy = PricingPolicy(metric="neg_mse")
    assert policy.noise_sigmas / 5**0.5 > NOISE_TEST_MAX_COSINE
    books = close_books(
        RoundInputs(1, model, base, updates, x_val, y_val), policy, device=torch.device("cpu")
    )
    assert not any(flags & Flag.UNALIGNED_UPDATE for flags in books.flags)
    assert books.aggregated == [0, 1, 2]
    assert books.gain > 0 and all(value > 0 for value in books.values)
    assert sum(books.rewards) > 0

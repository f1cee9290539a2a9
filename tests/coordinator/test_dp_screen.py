"""The screens on DP-SGD updates: honest updates noised by Opacus are priced by the game, not
flagged as noise; noise beyond what the task's DP explains still is."""

from __future__ import annotations

import math

import pytest
import torch

from fedledger.coordinator.books import RoundInputs, UpdateInput, close_books
from fedledger.coordinator.policy import PricingPolicy, PrivacyNoise
from fedledger.coordinator.service import bind_policy
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.onchain import Flag
from fedledger.incentive.tensors import l2_norm
from fedledger.tasks import BUILTIN_DIGITS, DigitsTask, parse_spec
from fedledger.tasks.privacy import train_private
from fedledger.tasks.spec import PrivacySection
from fedledger.tasks.training import TrainConfig

CPU = torch.device("cpu")
TASK = DigitsTask()
MODEL = TASK.build_model(seed=0)
BASE = {n: t.detach().clone() for n, t in MODEL.state_dict().items()}
NUM_PARAMS = sum(t.numel() for t in BASE.values())


def _private_delta(
    k: int, privacy: PrivacySection, config: TrainConfig
) -> tuple[dict[str, torch.Tensor], int]:
    x, y = TASK.partition(k, 4, alpha=0.5, seed=0)
    result = train_private(MODEL, BASE, x, y, config, privacy, device=CPU)
    return result.delta, result.num_samples


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_noise_norm_is_what_opacus_adds(momentum: float) -> None:
    """With the noise far above the clipped gradients, an Opacus update's norm is its noise's:
    the coordinator's prediction from the spec alone is within 3% of it."""
    privacy = PrivacySection(noise_multiplier=50.0, max_grad_norm=1.0, epsilon=1e9, delta=1e-5)
    config = TrainConfig(epochs=2, lr=0.05, batch_size=32, momentum=momentum, seed=3)
    delta, num_samples = _private_delta(0, privacy, config)
    predicted = PrivacyNoise.of(privacy, config).norm(num_samples, NUM_PARAMS)
    assert l2_norm(delta) == pytest.approx(predicted, rel=0.03)
    # Momentum carries each step's noise into later steps: several times the norm without it.
    plain = PrivacyNoise.of(privacy, TrainConfig(epochs=2, lr=0.05, batch_size=32))
    if momentum:
        assert predicted > 3 * plain.norm(num_samples, NUM_PARAMS)


def _round(deltas: list[tuple[dict[str, torch.Tensor], int]]) -> RoundInputs:
    x_val, y_val = TASK.validation_data()
    updates = [
        UpdateInput(
            organisation=f"0x{k + 1:040x}",
            update_hash="0x" + encode_tensors(delta)[1].hex(),
            num_samples=n,
            delta=delta,
        )
        for k, (delta, n) in enumerate(deltas)
    ]
    return RoundInputs(1, MODEL, BASE, updates, x_val, y_val)


def test_honest_dp_updates_are_priced_and_noise_beyond_dp_is_flagged() -> None:
    """At sigma 10 (epsilon about 1 over ten rounds) an honest update's signal is small against
    its noise: the plain noise test takes every one for noise. Told the task's DP noise, the
    screen keeps them for the game, and still flags noise five times larger than DP's."""
    privacy = PrivacySection(noise_multiplier=10.0, max_grad_norm=1.0, epsilon=1e9, delta=1e-5)
    config = TrainConfig(epochs=1, lr=0.05, batch_size=32, seed=1)
    honest = [_private_delta(k, privacy, replace_seed(config, k)) for k in range(4)]
    noise = PrivacyNoise.of(privacy, config)
    x_size = honest[3][1]
    generator = torch.Generator().manual_seed(9)
    loud = {n: torch.randn(t.shape, generator=generator) for n, t in BASE.items()}
    scale = 5 * noise.norm(x_size, NUM_PARAMS) / l2_norm(loud)
    loud = {n: t * scale for n, t in loud.items()}

    blind = close_books(_round(honest), PricingPolicy(), device=CPU)
    assert sum(bool(f & Flag.UNALIGNED_UPDATE) for f in blind.flags) >= 3

    told = PricingPolicy(privacy_noise=noise)
    books = close_books(_round(honest), told, device=CPU)
    assert not any(f & Flag.UNALIGNED_UPDATE for f in books.flags)
    # The game prices them: at this noise one may still be a clear negative_contribution.
    assert len(books.aggregated) >= 3 and sum(books.rewards) > 0

    attacked = close_books(_round([*honest[:3], (loud, x_size)]), told, device=CPU)
    assert attacked.flags[3] & Flag.UNALIGNED_UPDATE
    assert "DP does not explain it" in attacked.notes[3]
    assert attacked.rewards[3] == 0
    assert not any(f & Flag.UNALIGNED_UPDATE for f in attacked.flags[:3])


def replace_seed(config: TrainConfig, k: int) -> TrainConfig:
    return TrainConfig(**{**config.__dict__, "seed": config.seed + k})


def test_the_coordinator_takes_the_dp_noise_from_the_spec() -> None:
    digits = BUILTIN_DIGITS.read_text()
    training = digits[digits.index("[training]") : digits.index("[validation]")]
    text = digits.replace(
        training, "[training]\nlr = 0.1\nmomentum = 0.5\nepochs = 2\nbatch_size = 16\n\n"
    )
    text += """
[privacy]
noise_multiplier = 1.5
max_grad_norm = 0.8
epsilon = 5.0
delta = 1e-5
"""
    spec = parse_spec(text.encode(), source=None)
    policy = bind_policy(PricingPolicy(), spec)
    assert policy.privacy_noise == PrivacyNoise(
        noise_multiplier=1.5,
        max_grad_norm=0.8,
        lr=0.1,
        momentum=0.5,
        epochs=2,
        batch_size=16,
    )
    assert policy.record()["privacy_noise"]["noise_multiplier"] == 1.5  # audited as recorded
    plain = parse_spec(text.split("[privacy]")[0].encode(), source=None)
    assert bind_policy(PricingPolicy(), plain).privacy_noise is None
    adam = PrivacyNoise.of(spec.privacy, spec.training).model_copy(update={"optimiser": "adam"})
    assert math.isinf(adam.norm(100, NUM_PARAMS))  # adam rescales the noise: the test abstains

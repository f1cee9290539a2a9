"""The pricing policy: one definition of every knob, recorded whole, refusing what cannot work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fedledger.coordinator.books import RoundInputs, UpdateInput, close_books, round_pool
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.service import RoundService
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.incentive.commitment import encode_tensors
from fedledger.simulation import address_of
from fedledger.tasks import DigitsTask
from harness import Harness, modules_loaded_by


def test_the_record_is_the_whole_policy_and_reads_back() -> None:
    policy = PricingPolicy(metric="accuracy", noise_sigmas=5.0, copy_cosine=0.99, eta=0.5)
    record = policy.record()
    assert set(record) == set(PricingPolicy.model_fields)  # every knob, the screens' included
    assert PricingPolicy.model_validate(record) == policy
    with pytest.raises(ValidationError):
        PricingPolicy.model_validate({**record, "no_such_knob": 1})


def test_a_budget_below_the_sampled_valuators_minimum_is_refused() -> None:
    # The smallest sampled round has max_exact_players + 1 = 5 organisations: 2 * 5 + 2 = 12.
    with pytest.raises(ValidationError, match="at least 12 evaluations"):
        PricingPolicy(max_exact_players=4, valuation_budget=11)
    assert PricingPolicy(max_exact_players=4, valuation_budget=12).valuation_budget == 12


def test_more_organisations_than_the_budget_can_value_still_get_a_priced_round() -> None:
    """Registered after start-up, they raise the round's budget to the valuator's minimum
    (the driver never retries a round that cannot be priced); the evaluations are recorded."""
    policy = PricingPolicy(max_exact_players=2, valuation_budget=8, claims_above=100)
    assert policy.valuation_budget_for(3) == 8 and policy.valuation_budget_for(6) == 14
    task = DigitsTask()
    model = task.build_model(seed=0)
    base = model.state_dict()
    x_val, y_val = task.validation_data()
    gen = torch.Generator().manual_seed(0)
    common = {n: 0.01 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
    updates = []
    for k in range(6):
        delta = {n: t + 0.005 * torch.randn(t.shape, generator=gen) for n, t in common.items()}
        updates.append(UpdateInput(address_of(k), "0x" + encode_tensors(delta)[1].hex(), 10, delta))
    books = close_books(RoundInputs(1, model, base, updates, x_val, y_val), policy)
    assert books.method == "stratified-kernel" and books.evaluations <= 14
    assert sum(books.rewards) == round_pool(policy, books.values, books.flags, books.gain)


def test_start_up_refuses_a_budget_too_small_for_the_registered_consortium(
    make_harness: Callable[..., Harness], tmp_path: Path
) -> None:
    harness = make_harness()  # three registered organisations
    ledger = harness.service.ledger
    settings = CoordinatorSettings(
        data_dir=tmp_path / "other",
        pricing=PricingPolicy(max_exact_players=1, valuation_budget=4),
    )
    service = RoundService(settings, ledger)
    with pytest.raises(CoordinatorError) as refused:
        service.start(background=False)
    assert refused.value.code is ErrorCode.INVALID_POLICY
    assert "needs at least 8 evaluations" in refused.value.message
    assert not (tmp_path / "other").exists()  # refused before touching the data directory


def test_the_books_import_no_chain_client() -> None:
    """The books are maths: they build the on-chain records without web3 or a signing key."""
    imports = "fedledger.coordinator.books, fedledger.coordinator.policy"
    assert modules_loaded_by(imports, ("web3", "eth_account")) == []

"""The demo runs a whole federation in one process and reports what the contract says."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedledger.demo import run_demo
from fedledger.node.training import TrainConfig

pytestmark = pytest.mark.slow


def test_demo_runs_rounds_and_pays_from_the_contract() -> None:
    out = io.StringIO()
    result = run_demo(
        organisations=3,
        rounds=2,
        train_config=TrainConfig(epochs=1),
        console=Console(file=out, width=200),
    )
    assert len(result.accuracies) == 2
    assert all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert len(result.organisations) == 3
    for org in result.organisations:
        assert org.balance == org.reward  # tokens come only from round rewards
        assert org.num_samples > 0
    paid = sum(org.reward for org in result.organisations)
    assert paid % (1000 * 10**18) == 0 and paid > 0  # whole budgets: exact split, per round
    printed = out.getvalue()
    assert "round  2: validation accuracy" in printed
    assert result.ledger in printed

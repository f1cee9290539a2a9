"""A small fairness federation against its ground truth, retrained coalition by coalition.

Four organisations with IID digits shares of 40, 80, 160 and 160 samples (the last with 80% of
its labels replaced at random), and a fifth with no data uploading the last public global
step. The truth is the exact Shapley value of the final validation accuracy of plain FedAvg
retrained by every coalition of the four data holders from scratch (16 federations); the
replayer's is 0 (a coalition with it trains exactly as without it). The coordinator's books
pay every round as they would in production. ``bench/fairness.py`` runs the full comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedledger.incentive.onchain import Flag
from fedledger.incentive.shapley import all_coalitions, shapley_from_utilities
from fedledger.incentive.utility import evaluate_params
from fedledger.simulation import replay_global_step, run_federation, train_fedavg
from fedledger.tasks import DigitsTask

pytestmark = pytest.mark.slow

ROUNDS = 30
SIZES = [40, 80, 160, 160]
MISLABELLED = 3
REPLAYER = 4


def _federation() -> list[tuple[torch.Tensor, torch.Tensor]]:
    task = DigitsTask()
    x, y = task.training_data()
    rng = np.random.default_rng(7)
    order = rng.permutation(len(y))
    parts, start = [], 0
    for size in SIZES:
        idx = torch.from_numpy(order[start : start + size])
        parts.append((x[idx].clone(), y[idx].clone()))
        start += size
    x_bad, y_bad = parts[MISLABELLED]
    wrong = torch.from_numpy(rng.random(len(y_bad)) < 0.8)
    noise = torch.from_numpy(rng.integers(0, 10, len(y_bad)))
    parts[MISLABELLED] = (x_bad, torch.where(wrong, noise, y_bad))
    parts.append(parts[0])  # the replayer's placeholder: its uploads are replays, not training
    return parts


def _truth(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    task = DigitsTask()
    model = task.build_model(seed=0)
    x_val, y_val = task.validation_data()
    holders = len(SIZES)
    utilities = np.array(
        [
            evaluate_params(
                model,
                train_fedavg({k: parts[k] for k in range(holders) if mask[k]}, ROUNDS),
                x_val,
                y_val,
                "accuracy",
            )
            for mask in all_coalitions(holders)
        ]
    )
    return shapley_from_utilities(utilities, holders)


def test_rewards_follow_the_retrained_truth_and_pay_the_replayer_nothing() -> None:
    parts = _federation()
    truth = _truth(parts)
    shares = np.maximum(truth, 0) / np.maximum(truth, 0).sum()
    fed = run_federation(parts=parts, rounds=ROUNDS, attacks={REPLAYER: replay_global_step()})
    totals = np.array(fed.totals(), dtype=np.float64)
    paid = totals / totals.sum()

    # The truth itself: more clean data is worth more, mostly wrong labels next to nothing.
    assert shares[2] > shares[1] > shares[0] > shares[MISLABELLED]
    # Paid in the truth's order, each within 10 points of its true share.
    assert paid[2] > paid[1] > paid[0] > paid[MISLABELLED]
    assert np.max(np.abs(paid[:REPLAYER] - shares)) <= 0.10
    assert paid[MISLABELLED] <= max(2 * shares[MISLABELLED], 0.01)
    # The replayer: flagged in every round it had something to replay, paid nothing.
    assert paid[REPLAYER] <= 0.01
    assert fed.flagged(REPLAYER, Flag.COPIED_UPDATE) == ROUNDS - 1
    # Honest organisations are not flagged.
    assert not any(r.flags[k] for r in fed.rounds for k in range(3))

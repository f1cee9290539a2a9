"""Twins: two updates of the same records count once in the game and the aggregate.

Two organisations training on the same records (or one on a copy of the other's) send
updates more than 0.99 alike. Counted twice they pull the model twice as hard; the books count
their mean once, with their mean sample count, and split its value equally between them.
"""

from __future__ import annotations

import pytest
import torch

from fedledger.coordinator.books import close_books, twin_groups
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.tensors import flatten
from fedledger.simulation import first_round
from fedledger.tasks import DigitsTask
from fedledger.tasks.training import TrainConfig, train_local

CPU = torch.device("cpu")


def _trained(part: int, seed: int) -> dict[str, torch.Tensor]:
    """One local epoch on label-skewed share ``part`` of five, shuffled by ``seed``."""
    task = DigitsTask()
    model = task.build_model(seed=0)
    x, y = task.partition(part, 5, alpha=0.5, seed=0)
    config = TrainConfig(epochs=1, lr=0.05, batch_size=32, seed=seed)
    return train_local(model, model.state_dict(), x, y, config).delta


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    fa, fb = flatten(a, dtype=torch.float64), flatten(b, dtype=torch.float64)
    return float(fa @ fb / (fa.norm() * fb.norm()))


@pytest.fixture(scope="module")
def federation() -> list[dict[str, torch.Tensor]]:
    """Five label-skewed shares, and a sixth organisation holding a copy of share 1."""
    return [_trained(k, seed=k) for k in range(5)] + [_trained(1, seed=99)]


def test_twin_groups_join_the_earliest_alike_update() -> None:
    cosine = torch.tensor(
        [
            [1.0, 0.2, 0.995, 0.3],
            [0.2, 1.0, 0.1, 0.991],
            [0.995, 0.1, 1.0, 0.2],
            [0.3, 0.991, 0.2, 1.0],
        ],
        dtype=torch.float64,
    )
    assert twin_groups(cosine, [0, 1, 2, 3], PricingPolicy()) == [[0, 2], [1, 3]]
    assert twin_groups(cosine, [0, 1, 2, 3], PricingPolicy(twin_cosine=0.993)) == [[0, 2], [1], [3]]
    assert twin_groups(cosine, [1, 2, 3], PricingPolicy()) == [[1, 3], [2]]  # 0 screened out
    off = PricingPolicy(twin_cosine=None)
    assert twin_groups(cosine, [0, 1, 2, 3], off) == [[0], [1], [2], [3]]
    # Opposite directions are not twins.
    assert twin_groups(-cosine + 2 * torch.eye(4), [0, 2], PricingPolicy()) == [[0], [2]]


def test_twins_count_once_and_share_the_value(federation: list[dict[str, torch.Tensor]]) -> None:
    assert _cosine(federation[1], federation[5]) >= 0.99  # the same records, shuffled apart
    assert max(_cosine(federation[i], federation[j]) for i in range(5) for j in range(i)) < 0.9
    counts = [100, 120, 90, 110, 80, 120]
    books = close_books(first_round(federation, counts), PricingPolicy(), device=CPU)
    assert books.flags == [0] * 6  # sharing is not a fault
    assert "counted as one with update" in books.notes[5]
    assert books.values[1] == books.values[5] and books.errors[1] == books.errors[5]
    assert abs(books.rewards[1] - books.rewards[5]) <= 1

    # The same round with the pair sent as one update, their mean: the same model, and the
    # one update's value is the pair's.
    mean = {n: torch.stack([federation[1][n], federation[5][n]]).mean(dim=0) for n in federation[1]}
    merged = [*federation[:1], mean, *federation[2:5]]
    once = close_books(first_round(merged, counts[:5]), PricingPolicy(), device=CPU)
    for name, tensor in once.params.items():
        torch.testing.assert_close(books.params[name], tensor, rtol=0, atol=1e-6)
    assert books.values[1] + books.values[5] == pytest.approx(once.values[1], rel=1e-6)
    for k in (0, 2, 3, 4):
        assert books.values[k] == pytest.approx(once.values[k], rel=1e-6, abs=1e-9)

    # Counted twice (the rule off), the pair pulls the model twice as hard: another model.
    twice = close_books(
        first_round(federation, counts), PricingPolicy(twin_cosine=None), device=CPU
    )
    assert 5 not in twice.notes
    moved = max(float((twice.params[n] - books.params[n]).abs().max()) for n in books.params)
    assert moved > 1e-4


def test_distinct_shares_are_never_twins(federation: list[dict[str, torch.Tensor]]) -> None:
    books = close_books(first_round(federation[:5], [100] * 5), PricingPolicy(), device=CPU)
    assert not any("counted as one" in note for note in books.notes.values())


def test_an_older_round_is_audited_without_the_rule() -> None:
    """A round recorded before ``twin_cosine`` existed was priced with every update alone:
    its audit must close the books so, not under today's default."""
    recorded = PricingPolicy().record()
    assert PricingPolicy.from_record(recorded) == PricingPolicy()
    older = {k: v for k, v in recorded.items() if k != "twin_cosine"}
    assert PricingPolicy.from_record(older).twin_cosine is None
    assert PricingPolicy.model_validate(older).twin_cosine == 0.99  # the default would not do


def test_twins_are_one_player_when_the_valuator_is_chosen(
    federation: list[dict[str, torch.Tensor]],
) -> None:
    """Six updates, two of them twins: five players, valued exactly under a cut-off of five."""
    policy = PricingPolicy(max_exact_players=5)
    books = close_books(first_round(federation, [100] * 6), policy, device=CPU)
    assert books.method == "exact" and books.evaluations == 2**5
    apart = close_books(
        first_round(federation, [100] * 6), policy.model_copy(update={"twin_cosine": None})
    )
    assert apart.method != "exact"  # six players: sampled

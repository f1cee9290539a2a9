"""An in-process federation simulator on the digits task, its books closed round by round with
``close_books``.

Organisations train for real (``train_local``, one epoch a round, seeds as the node derives
them); some of them misbehave as told. No chain and no HTTP: this drives exactly the code the
coordinator closes a round with, fast enough to run tens of rounds in a test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedledger.coordinator.books import Books, RoundInputs, UpdateInput, close_books
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.utility import evaluate_params
from fedledger.node.training import TrainConfig, train_local
from fedledger.tasks import get_task

Delta = dict[str, Tensor]
Attack = Callable[[Delta, list[Delta], torch.Generator], Delta]
"""(own honest delta, the deltas of the organisations before it this round, rng) -> upload."""

BUDGET = 10**6


def sign_flip(own: Delta, earlier: list[Delta], rng: torch.Generator) -> Delta:
    return {n: -t for n, t in own.items()}


def scaled(factor: float) -> Attack:
    def attack(own: Delta, earlier: list[Delta], rng: torch.Generator) -> Delta:
        return {n: factor * t for n, t in own.items()}

    return attack


def zero(own: Delta, earlier: list[Delta], rng: torch.Generator) -> Delta:
    return {n: torch.zeros_like(t) for n, t in own.items()}


def noise(own: Delta, earlier: list[Delta], rng: torch.Generator) -> Delta:
    """Gaussian noise with the honest delta's per-tensor scale: no signal, a plausible norm."""
    return {n: torch.randn(t.shape, generator=rng) * t.std() for n, t in own.items()}


def copy_of(victim: int, factor: float = 1.0) -> Attack:
    """Upload organisation ``victim``'s delta (committed earlier), times ``factor``."""

    def attack(own: Delta, earlier: list[Delta], rng: torch.Generator) -> Delta:
        return {n: factor * t for n, t in earlier[victim].items()}

    return attack


@dataclass
class Federation:
    rounds: list[Books] = field(default_factory=list)
    accuracy: float = 0.0
    num_samples: list[int] = field(default_factory=list)

    def paid_share(self, orgs: list[int]) -> float:
        """The organisations' summed rewards over every round, as a share of the budgets."""
        paid = sum(r.rewards[k] for r in self.rounds for k in orgs)
        return paid / (BUDGET * len(self.rounds))

    def flagged(self, org: int, flag: int) -> int:
        """In how many rounds ``org`` carried ``flag``."""
        return sum(bool(r.flags[org] & flag) for r in self.rounds)


def address_of(k: int) -> str:
    """Organisation k's stand-in address (the books settle by address)."""
    return "0x" + f"{k + 1:040x}"


def run_federation(
    *,
    num_orgs: int = 10,
    rounds: int = 10,
    attacks: Mapping[int, Attack] | None = None,
    declared: Mapping[int, int] | None = None,
    policy: PricingPolicy | None = None,
    alpha: float = 0.5,
) -> Federation:
    """Run ``rounds`` rounds; organisation k uploads ``attacks[k](...)`` instead of its delta and
    declares ``declared[k]`` samples instead of its true count, where given."""
    attacks = attacks or {}
    declared = declared or {}
    policy = (policy or PricingPolicy()).model_copy(update={"reward_per_round": BUDGET})
    # Subnormals make CPU training several times slower; the flag is process-wide, so it is
    # put back afterwards (other tests, hypothesis among them, need IEEE subnormals).
    torch.set_flush_denormal(True)
    try:
        return _run(num_orgs, rounds, attacks, declared, policy, alpha)
    finally:
        torch.set_flush_denormal(False)


def _run(
    num_orgs: int,
    rounds: int,
    attacks: Mapping[int, Attack],
    declared: Mapping[int, int],
    policy: PricingPolicy,
    alpha: float,
) -> Federation:
    task = get_task("digits")
    model = task.build_model(seed=0)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    parts = [task.partition(k, num_orgs, alpha=alpha, seed=0) for k in range(num_orgs)]
    x_val, y_val = task.validation_data()
    counts = [declared.get(k, int(y.shape[0])) for k, (_, y) in enumerate(parts)]
    config = TrainConfig(epochs=1, lr=0.05, batch_size=32)
    federation = Federation(num_samples=counts)
    cpu = torch.device("cpu")
    previous: list[Delta | None] = [None] * num_orgs
    for round_id in range(1, rounds + 1):
        rng = torch.Generator().manual_seed(round_id)
        deltas: list[Delta] = []
        for k, (x, y) in enumerate(parts):
            seeded = replace(config, seed=k * 1_000_003 + round_id)
            delta = train_local(model, params, x, y, seeded, device=cpu).delta
            if k in attacks:
                delta = attacks[k](delta, deltas, rng)
            deltas.append(delta)
        inputs = RoundInputs(
            round_id=round_id,
            model=model,
            base=params,
            updates=[
                UpdateInput(
                    organisation=address_of(k),
                    update_hash="0x" + encode_tensors(delta)[1].hex(),
                    num_samples=counts[k],
                    delta=delta,
                    previous=previous[k],
                )
                for k, delta in enumerate(deltas)
            ],
            x_val=x_val,
            y_val=y_val,
        )
        books = close_books(inputs, policy, device=cpu)
        previous = list(deltas)
        federation.rounds.append(books)
        params = books.params
    federation.accuracy = evaluate_params(model, params, x_val, y_val, "accuracy")
    return federation

"""An in-process federation simulator on the digits task, its books closed round by round with
``close_books``.

Organisations train for real (``train_local``, one epoch a round, seeds as the node derives
them); some of them misbehave as told. No chain and no HTTP: this drives exactly the code the
coordinator closes a round with, fast enough to run tens of rounds in a test.
``train_fedavg`` trains the same organisations by plain FedAvg with no books at all: the
federation a coalition would have run on its own, the ground truth of a fairness benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedledger.coordinator.books import PUBLIC_STEPS, Books, RoundInputs, UpdateInput, close_books
from fedledger.coordinator.policy import PricingPolicy, PrivacyNoise
from fedledger.incentive.commitment import encode_tensors
from fedledger.incentive.utility import evaluate_params
from fedledger.tasks import DigitsTask
from fedledger.tasks.privacy import train_private
from fedledger.tasks.spec import PrivacySection
from fedledger.tasks.training import TrainConfig, train_local

Delta = dict[str, Tensor]
Data = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Seen:
    """What a misbehaving organisation has to hand when it uploads."""

    own: Delta  # its honest delta of this round
    earlier: list[Delta]  # the uploads of the organisations before it this round
    rng: torch.Generator
    global_steps: list[Delta]  # public: w_r - w_{r-1}, w_{r-1} - w_{r-2}, ... (newest first)
    previous_round: list[Delta] | None  # every organisation's upload of the round before


Attack = Callable[[Seen], Delta]
"""What an organisation sees -> what it uploads instead of its honest delta."""

BUDGET = 10**6


def sign_flip(seen: Seen) -> Delta:
    return {n: -t for n, t in seen.own.items()}


def scaled(factor: float) -> Attack:
    def attack(seen: Seen) -> Delta:
        return {n: factor * t for n, t in seen.own.items()}

    return attack


def zero(seen: Seen) -> Delta:
    return {n: torch.zeros_like(t) for n, t in seen.own.items()}


def noise(seen: Seen) -> Delta:
    """Gaussian noise with the honest delta's per-tensor scale: no signal, a plausible norm."""
    return {n: torch.randn(t.shape, generator=seen.rng) * t.std() for n, t in seen.own.items()}


def copy_of(victim: int, factor: float = 1.0) -> Attack:
    """Upload organisation ``victim``'s delta (committed earlier), times ``factor``."""

    def attack(seen: Seen) -> Delta:
        return {n: factor * t for n, t in seen.earlier[victim].items()}

    return attack


def with_noise(source: Delta, ratio: float, rng: torch.Generator) -> Delta:
    """``source`` plus isotropic Gaussian noise of ``ratio`` x its norm (cosine ~ 1/sqrt(1+r^2))."""
    if ratio == 0:
        return {n: t.clone() for n, t in source.items()}
    noise = {n: torch.randn(t.shape, generator=rng) for n, t in source.items()}
    scale = ratio * _norm(source) / max(_norm(noise), 1e-30)
    return {n: t + scale * noise[n] for n, t in source.items()}


def _norm(delta: Mapping[str, Tensor]) -> float:
    return float(sum(float((t.double() ** 2).sum()) for t in delta.values()) ** 0.5)


def replay_global_step(noise_ratio: float = 0.0) -> Attack:
    """A data-less organisation uploading the last public global step (w_r - w_{r-1}), plus
    noise of ``noise_ratio`` x its norm; in round 1, with nothing public yet, noise."""

    def attack(seen: Seen) -> Delta:
        if not seen.global_steps:
            return noise(seen)
        return with_noise(seen.global_steps[0], noise_ratio, seen.rng)

    return attack


def replay_update(victim: int, noise_ratio: float = 0.0) -> Attack:
    """A data-less organisation uploading organisation ``victim``'s update of the round before
    (its own, when ``victim`` is itself), plus noise; in round 1, noise."""

    def attack(seen: Seen) -> Delta:
        if seen.previous_round is None:
            return noise(seen)
        return with_noise(seen.previous_round[victim], noise_ratio, seen.rng)

    return attack


@dataclass
class Federation:
    rounds: list[Books] = field(default_factory=list)
    accuracy: float = 0.0
    num_samples: list[int] = field(default_factory=list)

    def paid_share(self, orgs: list[int]) -> float:
        """The organisations' summed rewards over every round, as a share of all the run paid."""
        paid = sum(r.rewards[k] for r in self.rounds for k in orgs)
        return paid / max(sum(sum(r.rewards) for r in self.rounds), 1)

    def totals(self) -> list[int]:
        """Each organisation's rewards summed over the run."""
        return [sum(r.rewards[k] for r in self.rounds) for k in range(len(self.num_samples))]

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
    parts: Sequence[Data] | None = None,
    privacy: PrivacySection | None = None,
) -> Federation:
    """Run ``rounds`` rounds; organisation k uploads ``attacks[k](...)`` instead of its delta and
    declares ``declared[k]`` samples instead of its true count, where given.

    The organisations hold ``parts`` (features, labels) when given, else the digits task's
    Dirichlet(``alpha``) partition into ``num_orgs``. With ``privacy`` every honest update is
    trained by DP-SGD (Opacus) instead of plain SGD."""
    attacks = attacks or {}
    declared = declared or {}
    # BUDGET units per 1.0 of gain too, so the budget caps no round (gains are below 1).
    # With privacy, the screen knows the DP noise of the updates, as a coordinator does.
    update: dict[str, object] = {"reward_per_round": BUDGET, "reward_per_gain": BUDGET}
    if privacy is not None:
        update["privacy_noise"] = PrivacyNoise.of(privacy, TRAIN_CONFIG)
    policy = (policy or PricingPolicy()).model_copy(update=update)
    if parts is None:
        task = DigitsTask()
        parts = [task.partition(k, num_orgs, alpha=alpha, seed=0) for k in range(num_orgs)]
    with _flushed_denormals():
        return _run(rounds, attacks, declared, policy, parts, privacy)


class _flushed_denormals:
    """Subnormals make CPU training several times slower; the flag is process-wide, so it is
    put back afterwards (other tests, hypothesis among them, need IEEE subnormals)."""

    def __enter__(self) -> None:
        torch.set_flush_denormal(True)

    def __exit__(self, *exc: object) -> None:
        torch.set_flush_denormal(False)


TRAIN_CONFIG = TrainConfig(epochs=1, lr=0.05, batch_size=32)


def _local_delta(
    model: torch.nn.Module,
    params: Mapping[str, Tensor],
    data: Data,
    k: int,
    round_id: int,
    privacy: PrivacySection | None = None,
) -> Delta:
    """Organisation k's honest delta of ``round_id``, shuffled with the seed the node uses
    (DP-SGD with ``privacy``)."""
    x, y = data
    seeded = replace(TRAIN_CONFIG, seed=k * 1_000_003 + round_id)
    cpu = torch.device("cpu")
    if privacy is not None:
        return train_private(model, params, x, y, seeded, privacy, device=cpu).delta
    return train_local(model, params, x, y, seeded, device=cpu).delta


def train_fedavg(
    parts: Mapping[int, Data], rounds: int, *, model_seed: int = 0
) -> dict[str, Tensor]:
    """The final model of plain FedAvg (by sample counts, no screens, no clipping) run by the
    organisations ``parts`` alone (index -> data; the index seeds its shuffling as in
    ``run_federation``). No organisations: the initial model."""
    model = DigitsTask().build_model(seed=model_seed)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with _flushed_denormals():
        for round_id in range(1, rounds + 1):
            if not parts:
                break
            total = sum(int(y.shape[0]) for _, y in parts.values())
            step = {n: torch.zeros_like(t) for n, t in params.items()}
            for k, data in parts.items():
                delta = _local_delta(model, params, data, k, round_id)
                weight = int(data[1].shape[0]) / total
                for n in step:
                    step[n] += weight * delta[n]
            params = {n: params[n] + step[n] for n in params}
    return params


def _run(
    rounds: int,
    attacks: Mapping[int, Attack],
    declared: Mapping[int, int],
    policy: PricingPolicy,
    parts: Sequence[Data],
    privacy: PrivacySection | None = None,
) -> Federation:
    task = DigitsTask()
    model = task.build_model(seed=0)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x_val, y_val = task.validation_data()
    counts = [declared.get(k, int(y.shape[0])) for k, (_, y) in enumerate(parts)]
    federation = Federation(num_samples=counts)
    cpu = torch.device("cpu")
    previous: list[Delta | None] = [None] * len(parts)
    global_steps: list[Delta] = []
    for round_id in range(1, rounds + 1):
        rng = torch.Generator().manual_seed(round_id)
        deltas: list[Delta] = []
        for k, data in enumerate(parts):
            delta = _local_delta(model, params, data, k, round_id, privacy)
            if k in attacks:
                seen = Seen(
                    own=delta,
                    earlier=deltas,
                    rng=rng,
                    global_steps=list(global_steps),
                    previous_round=None if round_id == 1 else list(previous),  # type: ignore[arg-type]
                )
                delta = attacks[k](seen)
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
            public_steps=global_steps[:PUBLIC_STEPS],
        )
        books = close_books(inputs, policy, device=cpu)
        previous = list(deltas)
        federation.rounds.append(books)
        global_steps.insert(0, {n: books.params[n] - params[n] for n in params})
        params = books.params
    federation.accuracy = evaluate_params(model, params, x_val, y_val, "accuracy")
    return federation

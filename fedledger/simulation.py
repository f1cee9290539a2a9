"""An in-process federation simulator, on the digits task or any loaded task, its books closed
round by round with ``close_books``.

Organisations train for real (``train_local``; on digits one epoch a round, on a loaded task its
spec's [training]; seeds as the node derives them); some of them misbehave as told. No chain and no HTTP: this drives exactly the code the
coordinator closes a round with, fast enough to run tens of rounds in a test.
``train_fedavg`` trains the same organisations by plain FedAvg with no books at all: the
federation a coalition would have run on its own, the ground truth of a fairness benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from fedledger.coordinator.books import PUBLIC_STEPS, Books, RoundInputs, UpdateInput, close_books
from fedledger.coordinator.policy import PricingPolicy, PrivacyNoise
from fedledger.incentive.commitment import (
    canonical_bytes,
    decode_tensors,
    encode_tensors,
    keccak,
    specs_of,
)
from fedledger.incentive.compression import ErrorFeedback, compress, decompress
from fedledger.incentive.utility import evaluate_params
from fedledger.tasks import DigitsTask, ValidatorTask
from fedledger.tasks.base import BaseTask
from fedledger.tasks.privacy import train_private
from fedledger.tasks.spec import CompressionSection, PrivacySection
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
    upload_bytes: list[int] = field(default_factory=list)
    """Per round, the bytes every organisation uploaded, summed (canonical safetensors)."""

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

    def shares(self) -> list[float]:
        """Each organisation's share of everything the run paid (all 0 if it paid nothing)."""
        totals = self.totals()
        paid = sum(totals)
        return [t / paid if paid else 0.0 for t in totals]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties by position)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def address_of(k: int) -> str:
    """Organisation k's stand-in address (the books settle by address)."""
    return "0x" + f"{k + 1:040x}"


def first_round(deltas: Sequence[Delta], counts: Sequence[int]) -> RoundInputs:
    """Round 1 of the digits task (its initial model from seed 0, its validation set) with
    organisation k uploading ``deltas[k]`` for ``counts[k]`` samples: books to close by hand."""
    task = DigitsTask()
    model = task.build_model(seed=0)
    x_val, y_val = task.validation_data()
    return RoundInputs(
        round_id=1,
        model=model,
        base={n: t.detach().clone() for n, t in model.state_dict().items()},
        updates=[
            UpdateInput(address_of(k), "0x" + encode_tensors(d)[1].hex(), n, d)
            for k, (d, n) in enumerate(zip(deltas, counts, strict=True))
        ],
        x_val=x_val,
        y_val=y_val,
    )


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
    compression: CompressionSection | None = None,
    task: ValidatorTask | None = None,
    validation: Data | None = None,
    train_config: TrainConfig | None = None,
) -> Federation:
    """Run ``rounds`` rounds; organisation k uploads ``attacks[k](...)`` instead of its delta and
    declares ``declared[k]`` samples instead of its true count, where given.

    The organisations hold ``parts`` (features, labels) when given, else (digits only) the
    digits task's Dirichlet(``alpha``) partition into ``num_orgs``. With ``privacy`` every honest update is
    trained by DP-SGD (Opacus) instead of plain SGD. With ``compression`` every upload is
    encoded as a node would encode it (an honest organisation through its own error feedback,
    an attacker's upload without memory) and the books get what the coordinator decodes from
    the canonical bytes; the update hashes are those bytes' keccak.

    With ``task`` (a loaded task: its model is priced, and its spec sets the policy's metric as
    a coordinator's does) the organisations hold ``parts``, the coordinator scores on
    ``validation`` (default: the task's own validation set) and every organisation trains
    with ``train_config`` (default: the spec's [training]). Without: the digits task, trained
    with ``TRAIN_CONFIG``. ``accuracy`` is the final model's on the validation set
    (classification tasks; NaN for regression)."""
    attacks = attacks or {}
    declared = declared or {}
    policy = policy or PricingPolicy()
    model, config = _training(task, train_config)
    if task is None:
        digits = DigitsTask()
        x_val, y_val = validation or digits.validation_data()
        if parts is None:
            parts = [digits.partition(k, num_orgs, alpha=alpha, seed=0) for k in range(num_orgs)]
    else:
        # the service module brings the chain client with it: only a loaded task needs it
        from fedledger.coordinator.service import bind_policy

        x_val, y_val = validation or task.load_validation(None)
        if parts is None:
            raise ValueError(
                f"run_federation on task {task.spec.task.name!r}: give the organisations' "
                "data as parts=[(features, labels), ...]"
            )
        policy = bind_policy(policy, task.spec)
    # BUDGET units per 1.0 of gain too, so the budget caps no round (gains are below 1).
    # With privacy, the screen knows the DP noise of the updates, as a coordinator does.
    update: dict[str, object] = {"reward_per_round": BUDGET, "reward_per_gain": BUDGET}
    # On a loaded task, the updates carry ``privacy``'s noise, whatever the spec's [privacy] says.
    if privacy is not None or task is not None:
        update["privacy_noise"] = None if privacy is None else PrivacyNoise.of(privacy, config)
    policy = policy.model_copy(update=update)
    classify = task is None or task.spec.task.kind == "classification"
    with _flushed_denormals():
        return _run(
            rounds,
            attacks,
            declared,
            policy,
            parts,
            privacy,
            compression,
            model=model,
            validation=(x_val, y_val),
            config=config,
            classify=classify,
        )


def _training(
    task: ValidatorTask | None, train_config: TrainConfig | None, model_seed: int = 0
) -> tuple[torch.nn.Module, TrainConfig]:
    """The model organisations train and how: ``task``'s (default: its spec's [training]), or
    without one the digits task's with ``TRAIN_CONFIG``; ``train_config`` overrides either."""
    if task is None:
        return DigitsTask().build_model(seed=model_seed), train_config or TRAIN_CONFIG
    config = train_config or BaseTask(task.spec).train_config(seed=0)
    return task.build_model(seed=model_seed), config


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
    config: TrainConfig = TRAIN_CONFIG,
) -> Delta:
    """Organisation k's honest delta of ``round_id`` by ``config``, shuffled with the seed the
    node uses (DP-SGD with ``privacy``)."""
    x, y = data
    seeded = replace(config, seed=k * 1_000_003 + round_id)
    cpu = torch.device("cpu")
    if privacy is not None:
        return train_private(model, params, x, y, seeded, privacy, device=cpu).delta
    return train_local(model, params, x, y, seeded, device=cpu).delta


def train_fedavg(
    parts: Mapping[int, Data],
    rounds: int,
    *,
    model_seed: int = 0,
    task: ValidatorTask | None = None,
    train_config: TrainConfig | None = None,
) -> dict[str, Tensor]:
    """The final model of plain FedAvg (by sample counts, no screens, no clipping) run by the
    organisations ``parts`` alone (index -> data; the index seeds its shuffling as in
    ``run_federation``). No organisations: the initial model. The digits task trained with
    ``TRAIN_CONFIG`` by default; a loaded ``task``'s model with ``train_config`` (default: its
    spec's [training]), as ``run_federation(task=...)`` trains it."""
    model, config = _training(task, train_config, model_seed)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with _flushed_denormals():
        for round_id in range(1, rounds + 1):
            if not parts:
                break
            total = sum(int(y.shape[0]) for _, y in parts.values())
            step = {n: torch.zeros_like(t) for n, t in params.items()}
            for k, data in parts.items():
                delta = _local_delta(model, params, data, k, round_id, config=config)
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
    compression: CompressionSection | None = None,
    *,
    model: torch.nn.Module,
    validation: Data,
    config: TrainConfig,
    classify: bool,
) -> Federation:
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x_val, y_val = validation
    counts = [declared.get(k, int(y.shape[0])) for k, (_, y) in enumerate(parts)]
    federation = Federation(num_samples=counts)
    cpu = torch.device("cpu")
    previous: list[Delta | None] = [None] * len(parts)
    previous_flags: list[int] = [0] * len(parts)
    global_steps: list[Delta] = []
    feedback = (
        [ErrorFeedback(compression.scheme, compression.fraction) for _ in parts]
        if compression is not None
        else []
    )
    for round_id in range(1, rounds + 1):
        rng = torch.Generator().manual_seed(round_id)
        deltas: list[Delta] = []
        hashes: list[bytes] = []
        uploaded = 0
        for k, data in enumerate(parts):
            delta = _local_delta(model, params, data, k, round_id, privacy, config)
            if k in attacks:
                seen = Seen(
                    own=delta,
                    earlier=deltas,
                    rng=rng,
                    global_steps=list(global_steps),
                    previous_round=None if round_id == 1 else list(previous),  # type: ignore[arg-type]
                )
                delta = attacks[k](seen)
            if compression is None:
                body, update_hash = encode_tensors(delta)
            else:
                if k in attacks:  # an attacker keeps no memory: it sends what it made up
                    encoded = compress(delta, compression.scheme, compression.fraction)
                else:
                    encoded = feedback[k].step(delta)[0]
                body = canonical_bytes(encoded)
                update_hash = keccak(body)
                delta = decompress(
                    decode_tensors(body), specs_of(params), compression.scheme, compression.fraction
                )
            uploaded += len(body)
            deltas.append(delta)
            hashes.append(update_hash)
        inputs = RoundInputs(
            round_id=round_id,
            model=model,
            base=params,
            updates=[
                UpdateInput(
                    organisation=address_of(k),
                    update_hash="0x" + hashes[k].hex(),
                    num_samples=counts[k],
                    delta=delta,
                    previous=previous[k],
                    previous_flags=previous_flags[k],
                )
                for k, delta in enumerate(deltas)
            ],
            x_val=x_val,
            y_val=y_val,
            public_steps=global_steps[:PUBLIC_STEPS],
        )
        books = close_books(inputs, policy, device=cpu)
        previous = list(deltas)
        previous_flags = list(books.flags)
        federation.rounds.append(books)
        federation.upload_bytes.append(uploaded)
        global_steps.insert(0, {n: books.params[n] - params[n] for n in params})
        params = books.params
    federation.accuracy = (
        evaluate_params(model, params, x_val, y_val, "accuracy") if classify else math.nan
    )
    return federation

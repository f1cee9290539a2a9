"""The pricing policy: every setting a round's books depend on, defined once.

A knob is a field here, with its default, its bounds and its description; the coordinator's
settings hold one ``PricingPolicy``, the CLI's options are built from these fields, and each
round's result records ``policy.record()`` so that ``fedledger audit`` closes the books again
under exactly the policy the coordinator used. Torch-free: the CLI reads it to describe its
options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedledger.incentive.onchain import DEFAULT_ROUND_BUDGET, TOKEN_UNIT, Metric

AggregationMethod = Literal["fedavg", "median", "trimmed_mean"]

DEFAULT_REWARD_PER_GAIN = 1000 * TOKEN_UNIT
"""1,000 FLR for each 1.0 the validation metric rises (a nat of log-loss)."""


class _Privacy(Protocol):
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...


class _Training(Protocol):
    @property
    def optimiser(self) -> Literal["sgd", "adam"]: ...
    @property
    def lr(self) -> float: ...
    @property
    def momentum(self) -> float: ...
    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...


class PrivacyNoise(BaseModel):
    """The DP-SGD noise the task spec puts in every honest update, as Opacus adds it.

    Each step, Opacus adds N(0, (noise_multiplier x max_grad_norm)^2) to every coordinate of
    the batch's summed clipped gradients and divides by the expected batch size (the records
    over the batches of an epoch); SGD moves the parameters by lr x that, and heavy-ball
    momentum carries a step's noise into every later step. So an update of ``num_samples``
    records carries Gaussian noise of a known norm, whatever its data: ``norm``. Set from the
    task spec's ``[privacy]`` and ``[training]`` when the coordinator starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: float = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    optimiser: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)

    @classmethod
    def of(cls, privacy: _Privacy, training: _Training) -> PrivacyNoise:
        """The noise of a spec's ``[privacy]`` and ``[training]`` (or a ``TrainConfig``)."""
        return cls(
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            optimiser=training.optimiser,
            lr=training.lr,
            momentum=training.momentum,
            epochs=training.epochs,
            batch_size=training.batch_size,
        )

    def norm(self, num_samples: int, num_params: int) -> float:
        """The expected L2 norm of the DP noise in an update trained on ``num_samples``
        records with ``num_params`` parameters; inf under adam, whose per-coordinate scaling
        of the noisy gradient no update's norm can be checked against."""
        if self.optimiser == "adam":
            return math.inf
        batches = math.ceil(num_samples / self.batch_size)
        expected_batch = max(int(num_samples * (1 / batches)), 1)  # Opacus's expression
        per_step = self.lr * self.noise_multiplier * self.max_grad_norm / expected_batch
        steps = self.epochs * batches
        mu = self.momentum
        # The noise of the j-th step from the end moves the parameters sum_{i<j} mu^i times.
        gain = sum(((1 - mu**j) / (1 - mu)) ** 2 for j in range(1, steps + 1)) if mu else steps
        return per_step * math.sqrt(gain * num_params)


class PricingPolicy(BaseModel):
    """How a coordinator screens, clips, values, aggregates and pays a round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The game: which model, scored how.
    task: str = Field("digits", description="The task spec's name (set from the spec at start).")
    task_spec: str | None = Field(
        None,
        pattern=r"^0x[0-9a-f]{64}$",
        description="keccak-256 of the task spec file, as the ledger's taskSpec() records it "
        "(set from the spec at start).",
    )
    privacy_noise: PrivacyNoise | None = Field(
        None,
        description="The DP-SGD noise every honest update carries (set from the spec's "
        "[privacy] at start; None without DP): the noise screen keeps an unaligned update no "
        "larger than dp_noise_multiple x that noise's norm, for the game to price.",
    )
    model_seed: int = Field(0, description="Seed of the task model's initial parameters.")
    metric: Metric = Field(
        "neg_log_loss",
        description="Validation metric of the coalition game (a proper scoring rule by default).",
    )
    eta: float = Field(1.0, gt=0, description="Server learning rate: w + eta * aggregate.")
    valuation_weights: Literal["samples", "uniform"] = Field(
        "samples",
        description="Coalition models average updates by sample count, capped as the aggregate "
        "is (max_weight_multiple), or uniformly.",
    )
    coalition_steps: Literal["rescaled", "average"] = Field(
        "rescaled",
        description="Each coalition's averaged update is rescaled to the length of the whole "
        "consortium's (the game values directions), or taken as it is.",
    )
    max_exact_players: int = Field(
        14,
        ge=1,
        le=20,
        description="Exact Shapley up to this many organisations (2^14 coalitions: 2-3 s a "
        "digits round on one core), sampled above.",
    )
    valuation_budget: int | None = Field(
        None,
        ge=1,
        description="Utility evaluations of the sampled valuator (default: 40 a player).",
    )
    valuation_samples: int | None = Field(
        None,
        ge=2,
        description="A round valued by sampling (more than max_exact_players organisations) "
        "scores its coalitions on at most this many validation samples, drawn from the round's "
        "seed (None: all). The cost falls in proportion; each value's standard error, taken "
        "over the samples drawn, widens to cover the draw.",
    )
    valuation_stop_ratio: float | None = Field(
        0.25,
        gt=0,
        description="A round valued by sampling stops drawing coalitions once the estimator's "
        "own standard errors, in quadrature over the organisations, are at most this times "
        "the validation errors (the estimator then adds at most its square to the variance; "
        "None: always the whole budget). Each value's standard error includes the estimator's.",
    )
    # Screens and defences.
    copy_cosine: float = Field(
        0.99999,
        gt=0,
        le=1,
        description="|cosine| with an earlier update from which it is a copy (two organisations "
        "training on the same records reach 0.999).",
    )
    twin_cosine: float | None = Field(
        0.99,
        gt=0,
        le=1,
        description="Cosine with an earlier kept update from which two updates count as one in "
        "the game and the aggregate (their mean, their mean sample count) and share its value "
        "equally: the same records trained twice, which counted twice pull the model twice as "
        "hard (None: every update counts alone). Below copy_cosine; nobody is flagged for it.",
    )
    zero_tolerance: float = Field(
        1e-6, ge=0, description="An update with norm <= this x the median norm counts as zero."
    )
    noise_sigmas: float = Field(
        3.0, ge=0, description="|z| below which an update is as unaligned as random noise."
    )
    dp_noise_multiple: float = Field(
        2.0,
        ge=1,
        description="With DP, an update the noise screen finds unaligned is kept when its norm "
        "is at most this x the norm of the DP noise alone (honest but noisy), flagged above.",
    )
    clip_multiplier: float | None = Field(
        3.0, gt=0, description="Clip updates above this x the round's median norm (None: never)."
    )
    negative_sigmas: float = Field(
        3.0,
        ge=0,
        description="A contribution this many standard errors below 0 made the model worse: "
        "flagged negative_contribution, unpaid for the round.",
    )
    exclude_negative: bool = Field(
        True, description="Leave updates flagged negative_contribution out of the new model."
    )
    aggregation: AggregationMethod = Field(
        "fedavg", description="Aggregation rule: fedavg, median or trimmed_mean."
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="Trimmed mean: share of updates cut on each side."
    )
    max_weight_multiple: float | None = Field(
        3.0,
        ge=1,
        description="Most a FedAvg weight may be, as a multiple of the uniform 1/K: a declared "
        "sample count buys no more (None: no cap).",
    )
    min_aggregated: int = Field(
        3,
        ge=1,
        description="Fewest updates a new global model may be made of: from fewer, the round "
        "fails (model unchanged, nothing paid), since with K aggregated any K-1 of them, and "
        "with one anybody, recover the last one's update from the two public models.",
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Most samples an organisation may declare; an upload above is refused "
        "(None: no cap).",
    )
    # Payment.
    reward_per_gain: int = Field(
        DEFAULT_REWARD_PER_GAIN,
        ge=0,
        description="Token units a round pays per 1.0 rise of the validation metric.",
    )
    reward_per_round: int = Field(
        DEFAULT_ROUND_BUDGET,
        ge=0,
        description="Most token units a round pays (at most the ledger's roundBudget).",
    )
    claims_above: int = Field(
        16, ge=0, description="Settle by Merkle root and claims above this many organisations."
    )

    @model_validator(mode="after")
    def _sampled_valuation_is_possible(self) -> PricingPolicy:
        if self.valuation_budget is not None:
            needed = self.valuation_budget_needed(self.max_exact_players + 1)
            if self.valuation_budget < needed:
                raise ValueError(
                    f"valuation_budget={self.valuation_budget} cannot value the smallest round "
                    f"the sampled valuator prices ({self.max_exact_players + 1} organisations, "
                    f"max_exact_players + 1): it needs at least {needed} evaluations"
                )
        return self

    @staticmethod
    def valuation_budget_needed(num_players: int) -> int:
        """The fewest evaluations the sampled valuator values ``num_players`` organisations with."""
        from fedledger.incentive.sampling import min_kernel_evaluations

        return min_kernel_evaluations(num_players)

    def valuation_budget_for(self, num_players: int) -> int | None:
        """The sampled valuator's budget for a round of ``num_players`` screened organisations:
        the policy's, raised to the valuator's minimum when more organisations joined than it
        can value (so that a round is always priced; the result records the evaluations)."""
        if self.valuation_budget is None:
            return None
        return max(self.valuation_budget, self.valuation_budget_needed(num_players))

    def record(self) -> dict[str, Any]:
        """The policy as recorded with each round's result (JSON-safe)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PricingPolicy:
        """The policy a round was priced under, from its ``record()``: a knob added since
        that round was recorded takes the value that prices as before it existed
        (``ADDED_KNOBS``), not today's default."""
        return cls.model_validate({**ADDED_KNOBS, **record})


ADDED_KNOBS: dict[str, Any] = {"twin_cosine": None}
"""Knobs added to the policy after rounds were first recorded, each with the value under
which the books price as they did before it (an audit of an older round must not apply it)."""

"""Coordinator settings: validated once at start-up, failing fast on anything missing or absurd."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedledger.coordinator.pricing import PricingPolicy

TOKEN_UNIT = 10**18

PRICING_FIELDS = (
    "task",
    "model_seed",
    "eta",
    "metric",
    "reward_per_round",
    "max_exact_players",
    "valuation_budget",
    "aggregation",
    "trim_fraction",
    "clip_multiplier",
    "exclude_negative",
    "valuation_weights",
    "claims_above",
)
"""The settings a round's books (new model, scores, rewards, settlement) depend on."""


class CoordinatorSettings(BaseModel):
    """How a consortium runs its federation: task, rounds, deadlines, rewards and limits."""

    model_config = ConfigDict(frozen=True)

    data_dir: Path
    task: str = "digits"
    total_rounds: int = Field(10, ge=1)
    round_timeout_s: float = Field(300.0, gt=0, description="commit deadline after a round opens")
    upload_grace_s: float = Field(5.0, ge=0, description="uploads still taken after the deadline")
    quorum: int = Field(1, ge=1, description="fewest uploads for a round to aggregate")
    quorum_policy: Literal["fail", "extend"] = Field(
        "fail", description="at a deadline without quorum: fail the round, or extend it"
    )
    max_extensions: int = Field(1, ge=0, description="extensions before a round fails anyway")
    eta: float = Field(
        1.0, gt=0, description="server learning rate in w + eta * sum_k n_k/n delta_k"
    )
    reward_per_round: int = Field(1000 * TOKEN_UNIT, ge=0, description="token units paid per round")
    metric: Literal["accuracy", "neg_log_loss"] = "accuracy"
    model_seed: int = 0
    max_upload_bytes: int = Field(64 * 2**20, gt=0)
    max_update_norm: float | None = Field(
        None, gt=0, description="refuse updates with a larger L2 norm"
    )
    max_expiry_s: int = Field(3600, gt=0, description="farthest in the future an upload may expire")
    max_exact_players: int = Field(
        10, ge=1, le=20, description="exact Shapley up to this many organisations, sampled above"
    )
    valuation_budget: int | None = Field(
        None, ge=1, description="utility evaluations of the sampled valuator (None: 40 a player)"
    )
    aggregation: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed mean: cut per side")
    clip_multiplier: float | None = Field(
        3.0, gt=0, description="clip updates above this x the round's median norm (None: never)"
    )
    exclude_negative: bool = Field(
        True, description="leave updates with a negative contribution out of the new model"
    )
    valuation_weights: Literal["uniform", "samples"] = Field(
        "uniform", description="coalition models average updates uniformly or by sample count"
    )
    claims_above: int = Field(
        16, ge=0, description="settle by Merkle claims when more organisations than this are paid"
    )
    device: str | None = None  # "cuda", "cpu"; None picks cuda when available
    poll_interval_s: float = Field(0.2, gt=0)

    def pricing_record(self) -> dict[str, Any]:
        """The settings a round's books depend on, recorded with its result for auditors."""
        return self.model_dump(mode="json", include=set(PRICING_FIELDS))

    def pricing_policy(self) -> PricingPolicy:
        return PricingPolicy(
            aggregation=self.aggregation,
            trim_fraction=self.trim_fraction,
            clip_multiplier=self.clip_multiplier,
            exclude_negative=self.exclude_negative,
            eta=self.eta,
            metric=self.metric,
            valuation_weights=self.valuation_weights,
            max_exact_players=self.max_exact_players,
            valuation_budget=self.valuation_budget,
        )

    @model_validator(mode="after")
    def _check(self) -> CoordinatorSettings:
        if self.upload_grace_s > self.round_timeout_s:
            raise ValueError("upload_grace_s must not exceed round_timeout_s")
        return self

"""Coordinator settings: validated once at start-up, failing fast on anything missing or absurd."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedledger.coordinator.policy import PricingPolicy


class CoordinatorSettings(BaseModel):
    """How a consortium runs its federation: rounds, deadlines, limits, and the pricing policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    task_spec: Path | None = Field(
        None, description="the consortium's task spec file (None: the built-in digits task)"
    )
    validation: str | None = Field(
        None, description="the validation data, as the task loads it (None: the task's own)"
    )
    pricing: PricingPolicy = Field(
        default_factory=PricingPolicy, description="everything a round's books depend on"
    )
    total_rounds: int = Field(10, ge=1)
    round_timeout_s: float = Field(300.0, gt=0, description="commit deadline after a round opens")
    upload_grace_s: float = Field(5.0, ge=0, description="uploads still taken after the deadline")
    quorum: int = Field(1, ge=1, description="fewest uploads for a round to aggregate")
    quorum_policy: Literal["fail", "extend"] = Field(
        "fail", description="at a deadline without quorum: fail the round, or extend it"
    )
    max_extensions: int = Field(1, ge=0, description="extensions before a round fails anyway")
    max_upload_bytes: int = Field(64 * 2**20, gt=0)
    # Nobody stalls the service: what a connection, a body and a long poll may take.
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's line and headers must arrive within this"
    )
    body_idle_timeout_s: float = Field(
        10.0, gt=0, description="an upload's body may pause this long between bytes"
    )
    body_timeout_s: float = Field(120.0, gt=0, description="an upload's whole body arrives within")
    max_connections: int = Field(
        512, ge=1, description="open connections and requests in progress (503 beyond)"
    )
    max_concurrent_uploads: int = Field(
        16, ge=1, description="upload bodies read at once (503 `busy` beyond); one per organisation"
    )
    max_waits_per_client: int = Field(
        8, ge=0, description="long polls held at once for one client address (429 beyond)"
    )
    max_waits: int = Field(1024, ge=0, description="long polls held at once in all (429 beyond)")
    max_update_norm: float | None = Field(
        None, gt=0, description="refuse updates with a larger L2 norm"
    )
    max_expiry_s: int = Field(3600, gt=0, description="farthest in the future an upload may expire")
    device: str | None = None  # "cuda", "cpu"; None picks cuda when available
    books_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="close each round's books in a process of its own (auto: a model of 1e5 "
        "parameters or more on a CPU of more than one thread; see coordinator/books_process.py)",
    )
    poll_interval_s: float = Field(0.2, gt=0)

    @model_validator(mode="after")
    def _check(self) -> CoordinatorSettings:
        if self.upload_grace_s > self.round_timeout_s:
            raise ValueError("upload_grace_s must not exceed round_timeout_s")
        return self

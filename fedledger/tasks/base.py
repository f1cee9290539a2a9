"""What a task plug-in provides, by role, and the defaults a plug-in inherits from ``BaseTask``.

A node needs ``NodeTask``: build the model, load the organisation's own data, train from the
global parameters, evaluate locally. The coordinator and auditors need ``ValidatorTask``: build
the model, load the validation set, score a model. Both are plain Python objects; ``BaseTask``
implements everything but loading data from the spec alone (the built-in model, the spec's
loss and optimiser, its metrics), so a plug-in usually writes only ``load_data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fedledger.errors import ErrorCode, TaskError
from fedledger.incentive.utility import evaluate_params
from fedledger.tasks.plugin import load_object
from fedledger.tasks.spec import TaskSpec
from fedledger.tasks.training import LocalResult, TrainConfig, train_local

Dataset = tuple[Tensor, Tensor]
"""Features (n, ...) float32 and targets (n,): class indices (int64) or values (float32)."""


@runtime_checkable
class NodeTask(Protocol):
    """What an organisation's node calls."""

    spec: TaskSpec

    def build_model(self, seed: int = 0) -> nn.Module:
        """The consortium's architecture, initialised deterministically from ``seed``."""
        ...

    def load_data(self, source: str) -> Dataset:
        """The organisation's own training data from ``source`` (a path, or what the task says)."""
        ...

    def train(
        self,
        model: nn.Module,
        global_params: Mapping[str, Tensor],
        data: Dataset,
        *,
        seed: int,
        device: torch.device | None = None,
    ) -> LocalResult:
        """Train from ``global_params`` on ``data``; the update (trained - global) and sample count."""
        ...

    def evaluate(
        self, model: nn.Module, params: Mapping[str, Tensor], data: Dataset
    ) -> dict[str, float]:
        """The spec's metrics of ``model`` with ``params`` on ``data`` (a node's own data)."""
        ...


@runtime_checkable
class ValidatorTask(Protocol):
    """What the coordinator and an auditor call."""

    spec: TaskSpec

    def build_model(self, seed: int = 0) -> nn.Module: ...

    def load_validation(self, source: str | None) -> Dataset:
        """The validation set from ``source`` (None: the task's own, if it has one)."""
        ...

    def score(
        self, model: nn.Module, params: Mapping[str, Tensor], data: Dataset
    ) -> dict[str, float]:
        """The spec's metrics of ``model`` with ``params`` on ``data``."""
        ...


NODE_METHODS = ("build_model", "load_data", "train", "evaluate")
VALIDATOR_METHODS = ("build_model", "load_validation", "score")


def builtin_model(spec: TaskSpec, inputs: int, outputs: int) -> nn.Module:
    """The spec's built-in model: one affine layer, or an MLP with ReLU between its layers."""
    widths = [inputs, *spec.model.hidden, outputs]
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        if k:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[k], widths[k + 1]))
    return nn.Sequential(*layers)


def metric_values(
    model: nn.Module, params: Mapping[str, Tensor], data: Dataset, metrics: list[str]
) -> dict[str, float]:
    """Each named metric of ``model`` with ``params`` on ``data``; mse and r2 are derived from
    neg_mse (r2 = 1 - mse / variance of the targets)."""
    x, y = data
    values: dict[str, float] = {}
    for metric in metrics:
        if metric in ("mse", "r2"):
            mse = -evaluate_params(model, params, x, y, "neg_mse")
            variance = float(y.to(torch.float64).var(unbiased=False))
            values[metric] = mse if metric == "mse" else 1.0 - mse / max(variance, 1e-12)
        else:
            values[metric] = evaluate_params(model, params, x, y, metric)  # type: ignore[arg-type]
    return values


class BaseTask:
    """Defaults from the spec: its built-in or plug-in model, its training and its metrics."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.task.name

    def model_shape(self) -> tuple[int, int]:
        """Inputs and outputs of a model for the spec's data schema."""
        data = self.spec.data
        if data is None:
            raise TaskError(
                ErrorCode.BAD_PLUGIN,
                f"task {self.name!r} has no [data] schema, so the model's inputs are unknown: "
                "its plug-in must define build_model",
            )
        outputs = len(data.label.classes or ()) if self.spec.task.kind == "classification" else 1
        return len(data.features), outputs

    def build_model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(seed)
            if self.spec.model.plugin is None:
                return builtin_model(self.spec, *self.model_shape())
            factory = load_object(self.spec.model.plugin, self.spec, what="model.plugin")
            inputs, outputs = self.model_shape()
            try:
                model = factory(inputs, outputs, **self.spec.model.params)
            except Exception as exc:  # the consortium's code: report it, with its name
                raise TaskError(
                    ErrorCode.BAD_PLUGIN,
                    f"model.plugin {self.spec.model.plugin!r} raised {type(exc).__name__}: {exc}",
                ) from exc
        if not isinstance(model, nn.Module):
            raise TaskError(
                ErrorCode.BAD_PLUGIN,
                f"model.plugin {self.spec.model.plugin!r} returned a {type(model).__name__}, "
                "not a torch.nn.Module",
            )
        return model

    def train_config(self, seed: int) -> TrainConfig:
        training = self.spec.training
        return TrainConfig(
            epochs=training.epochs,
            lr=training.lr,
            batch_size=training.batch_size,
            prox_mu=training.prox_mu,
            seed=seed,
            loss=self.spec.loss,
            optimiser=training.optimiser,
            momentum=training.momentum,
            weight_decay=training.weight_decay,
        )

    def train(
        self,
        model: nn.Module,
        global_params: Mapping[str, Tensor],
        data: Dataset,
        *,
        seed: int,
        device: torch.device | None = None,
    ) -> LocalResult:
        x, y = data
        config = self.train_config(seed)
        if self.spec.privacy is not None:  # DP-SGD per record (the node charges its ledger)
            from fedledger.tasks.privacy import train_private

            return train_private(
                model, global_params, x, y, config, self.spec.privacy, device=device
            )
        return train_local(model, global_params, x, y, config, device=device)

    def metrics(self) -> list[str]:
        """The game's metric, then the spec's further ones."""
        return list(dict.fromkeys([self.spec.metric, *self.spec.validation.report]))

    def score(
        self, model: nn.Module, params: Mapping[str, Tensor], data: Dataset
    ) -> dict[str, float]:
        return metric_values(model, params, data, self.metrics())

    def evaluate(
        self, model: nn.Module, params: Mapping[str, Tensor], data: Dataset
    ) -> dict[str, float]:
        return self.score(model, params, data)

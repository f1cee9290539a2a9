"""Local training on an organisation's private data: FedAvg's local optimiser, or FedProx with a
proximal term; the loss and optimiser come from the task spec's [training] section."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from fedledger.devices import resolve_device
from fedledger.incentive.utility import loss_function


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings; ``prox_mu`` > 0 turns FedAvg's local SGD into FedProx."""

    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    prox_mu: float = (
        0.0  # Li et al. 2020, "Federated Optimization in Heterogeneous Networks", eq. 2
    )
    seed: int = 0
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    optimiser: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class LocalResult:
    """The update an organisation commits to and uploads."""

    delta: dict[str, torch.Tensor]  # trained - global, float32, CPU, contiguous
    num_samples: int
    loss: float  # mean training loss over the last epoch


def train_local(
    model: nn.Module,
    global_params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
) -> LocalResult:
    """Train from ``global_params`` on (x, y) and return the parameter delta.

    Minimises the loss + mu/2 * ||w - w_global||^2 with minibatch SGD (or Adam); batches are
    shuffled by a generator seeded with ``config.seed``, so the delta is bit-reproducible on CPU.
    """
    num_samples = int(y.shape[0])
    if num_samples == 0:
        raise ValueError("this organisation has no training samples; nothing to train on")
    if (
        config.epochs < 1
        or config.batch_size < 1
        or config.lr <= 0
        or config.prox_mu < 0
        or not 0 <= config.momentum < 1
        or config.weight_decay < 0
    ):
        raise ValueError(f"invalid training configuration {config}")
    device = resolve_device(device)
    names = list(model.state_dict())
    if set(names) != set(global_params):
        raise ValueError("the global model's tensors do not match the task's model")

    anchor = {n: global_params[n].detach().to(device=device, dtype=torch.float32) for n in names}
    params = {n: t.clone().requires_grad_(True) for n, t in anchor.items()}
    optimiser: torch.optim.Optimizer
    if config.optimiser == "adam":
        optimiser = torch.optim.Adam(
            list(params.values()), lr=config.lr, weight_decay=config.weight_decay
        )
    else:
        optimiser = torch.optim.SGD(
            list(params.values()),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    generator = torch.Generator().manual_seed(config.seed)
    x, y = x.to(device), y.to(device)
    loss_fn = loss_function(config.loss)
    was_training = model.training
    model.train()
    last_epoch_loss = 0.0
    try:
        for _ in range(config.epochs):
            order = torch.randperm(num_samples, generator=generator).to(device)
            total, seen = 0.0, 0
            for start in range(0, num_samples, config.batch_size):
                batch = order[start : start + config.batch_size]
                logits = functional_call(model, params, (x[batch],))
                loss = loss_fn(logits, y[batch])
                objective = loss
                if config.prox_mu > 0:
                    proximal = sum((params[n] - anchor[n]).pow(2).sum() for n in names)
                    objective = loss + 0.5 * config.prox_mu * proximal
                optimiser.zero_grad(set_to_none=True)
                objective.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
            last_epoch_loss = total / seen
    finally:
        model.train(was_training)
    delta = {n: (params[n].detach() - anchor[n]).to("cpu").contiguous() for n in names}
    return LocalResult(delta=delta, num_samples=num_samples, loss=last_epoch_loss)

"""The consortium's model, a plug-in: any factory(inputs, outputs, **params) -> torch.nn.Module.

The spec names it (``[model] plugin = "hospital_model:small_mlp"``) and gives its parameters
(``[model.params]``); fedledger seeds torch before calling it, so every node and the
coordinator build the same initial model.
"""

from __future__ import annotations

from torch import nn


def small_mlp(inputs: int, outputs: int, hidden: int = 16) -> nn.Module:
    """One hidden layer with ReLU: ``inputs`` measurements in, one logit per class out."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

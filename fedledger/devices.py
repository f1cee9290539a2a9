"""Where tensors are computed: the GPU when there is one, else the CPU."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """``cuda`` when ``torch.cuda.is_available()``, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | None) -> torch.device:
    """``device`` if given, else ``default_device()``."""
    return device if device is not None else default_device()

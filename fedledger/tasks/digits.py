"""The built-in digits task, a plug-in like any other (``fedledger/tasks/digits.toml`` names it).

It reproduces the digits-10 benchmark split exactly (sklearn's bundled ``load_digits``; a
stratified 20% hold-out, which is the validation set; a Dirichlet(alpha) label partition of the
rest): an organisation's data is ``INDEX/COUNT``, its share of a split into COUNT. The data and
the built-in spec's hold-out are read without importing sklearn (``HOLDOUT_FILE``, checked
against ``train_test_split`` by the tests): the import costs every process a second.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks.base import BaseTask, Dataset
from fedledger.tasks.spec import BUILTIN_DIGITS, TaskSpec, load_spec


def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, seed: int
) -> list[list[int]]:
    """Split sample indices over clients so each label's share per client ~ Dirichlet(alpha).

    Identical, call for call, to the digits-10 benchmark's reference implementation.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(int(i) for i in chunk)
    return [sorted(p) for p in parts]


HOLDOUT_FILE = Path(__file__).with_name("digits_holdout.json")
"""The built-in spec's hold-out (seed 0) as :func:`sklearn_holdout` draws it, precomputed."""


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits, as ``load_digits(return_X_y=True)`` returns them, read from
    the package's CSV the way it reads it, without importing sklearn (a second of CPU)."""
    spec = importlib.util.find_spec("sklearn")  # finds the package, runs none of it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "scikit-learn, whose bundled digits the task reads, is not installed"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as csv:
        data = np.loadtxt(csv, delimiter=",")
    return np.ascontiguousarray(data[:, :-1]), data[:, -1].astype(np.int64)


def sklearn_holdout(seed: int) -> tuple[list[int], list[int]]:
    """The stratified 20% hold-out of the digits, sklearn's ``train_test_split`` with
    ``random_state=seed``: the training and test indices, each in the order it returns them."""
    from sklearn.model_selection import train_test_split

    _, y = _digits()
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    return [int(i) for i in train], [int(i) for i in test]


@cache
def _holdout(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sklearn_holdout`, read from :data:`HOLDOUT_FILE` for the seed it holds (every
    process that loads the built-in task would otherwise import sklearn for it; a test checks
    the file against sklearn)."""
    stored = json.loads(HOLDOUT_FILE.read_text())
    if stored["seed"] == seed:
        train, test = stored["train"], stored["test"]
    else:
        train, test = sklearn_holdout(seed)
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


@cache
def make_split(clients: int = 10, alpha: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """The digits-10 split: indices into ``load_digits`` for the test set and each client."""
    if clients < 1:
        raise ValueError(f"need at least one partition, got {clients}")
    if alpha <= 0:
        raise ValueError(f"the Dirichlet concentration alpha must be > 0, got {alpha}")
    _, y = _digits()
    train_idx, test_idx = _holdout(seed)
    parts = dirichlet_partition(y[train_idx], clients, alpha, seed)
    return {
        "task": "digits-10",
        "clients": clients,
        "alpha": alpha,
        "seed": seed,
        "test": sorted(int(i) for i in test_idx),
        "client_indices": [[int(train_idx[i]) for i in p] for p in parts],
    }


@cache
def _standardised(seed: int) -> np.ndarray:
    """Features standardised with the training part's mean and std (as the benchmark does).

    A pixel that is constant over the training part keeps scale 1, as sklearn's StandardScaler
    does: dividing by a tiny epsilon instead blows a validation sample with ink there up to
    ~1e8, which makes any loss-based metric (``neg_log_loss``) meaningless.
    """
    x, _ = _digits()
    split = make_split(1, 0.5, seed)  # the training part does not depend on the partition
    train = np.concatenate([np.asarray(p, dtype=np.int64) for p in split["client_indices"]])
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    standardised: np.ndarray = ((x - mean) / std).astype(np.float32)
    return standardised


class DigitsTask(BaseTask):
    """sklearn's 8x8 digits, an MLP 64-32-10; no download needed.

    Options (``[task.options]``): ``alpha``, the Dirichlet concentration of the split (0.5),
    and ``seed``, the seed of the hold-out and the split (0).
    """

    OPTIONS = frozenset({"alpha", "seed"})

    def __init__(self, spec: TaskSpec | None = None) -> None:
        super().__init__(spec if spec is not None else load_spec(BUILTIN_DIGITS))
        options = self.spec.task.options
        unknown = sorted(set(options) - self.OPTIONS)
        if unknown:
            raise TaskError(
                ErrorCode.BAD_SPEC,
                f"task.options: unknown key(s) {unknown} for the digits task "
                f"(known: {sorted(self.OPTIONS)})",
            )
        self.alpha = float(options.get("alpha", 0.5))
        self.split_seed = int(options.get("seed", 0))

    def load_data(self, source: str) -> Dataset:
        """``INDEX/COUNT``: share INDEX of the training part split among COUNT organisations."""
        parts = source.split("/")
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise TaskError(
                ErrorCode.DATA_FILE, f"digits data {source!r}: expected INDEX/COUNT, e.g. 0/3"
            )
        index, count = (int(part) for part in parts)
        try:
            return self.partition(index, count, alpha=self.alpha, seed=self.split_seed)
        except ValueError as exc:
            raise TaskError(ErrorCode.DATA_FILE, f"digits data {source!r}: {exc}") from None

    def load_validation(self, source: str | None) -> Dataset:
        if source is not None:
            raise TaskError(
                ErrorCode.DATA_FILE,
                f"the digits task's validation set is its built-in hold-out; got {source!r}",
            )
        return self.validation_data(seed=self.split_seed)

    def build_model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def partition(
        self, index: int, num_partitions: int, *, alpha: float = 0.5, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < num_partitions:
            raise ValueError(
                f"partition index {index} is out of range for {num_partitions} partitions"
            )
        indices = np.asarray(
            make_split(num_partitions, alpha, seed)["client_indices"][index], dtype=np.int64
        )
        x = _standardised(seed)
        _, y = _digits()
        return torch.from_numpy(x[indices].copy()), torch.from_numpy(y[indices].copy())

    def training_data(self, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training part (every partition's samples), in index order: for
        benchmarks that deal organisations their own shares."""
        train = np.asarray(sorted(make_split(1, 0.5, seed)["client_indices"][0]), dtype=np.int64)
        x = _standardised(seed)
        _, y = _digits()
        return torch.from_numpy(x[train].copy()), torch.from_numpy(y[train].copy())

    def validation_data(self, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        test = np.asarray(make_split(1, 0.5, seed)["test"], dtype=np.int64)
        x = _standardised(seed)
        _, y = _digits()
        return torch.from_numpy(x[test].copy()), torch.from_numpy(y[test].copy())

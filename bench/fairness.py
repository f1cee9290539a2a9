"""Does the total reward each organisation earns over a run follow what its data really adds?

Federations of at most six organisations are built from the digits training pool (1437
samples), or for ``tabular`` from the breast-cancer example's records (455), with a numpy
Generator seeded by ``--seed`` and the federation's draw; seed 0 uses the sizes below, other
seeds draw sizes (and partitions) at random, so the figures can be checked on federations
nothing was tuned for. Kinds (organisation 5 is the odd one out):

- ``iid-sizes``: five honest IID shares (seed 0: 60, 60, 120, 120, 240 samples) and a
  ``mislabelled`` one (seed 0: 120 samples, 80% of its labels replaced by uniform random ones);
- ``dirichlet``: six label-skewed shares, a Dirichlet(0.5)-over-labels partition
  (``dirichlet_partition``) of a random subsample of 120 x K samples at seed 0;
- ``duplicate``: five label-skewed shares (120 x 5 samples at seed 0) and a ``copy`` holder
  with an exact copy of a randomly chosen one's data (it shuffles with its own seed);
- ``replay-step`` / ``replay-step-noisy``: five honest IID shares (seed 0: the sizes above)
  and a data-less ``replayer`` uploading the last public global step, plus noise of 0 / 1 x
  its norm (``replay_global_step``);
- ``replay-update`` / ``replay-update-noisy``: the same honest shares and a replayer uploading
  the largest organisation's update of the round before, plus noise of 0 / 1 x its norm
  (``replay_update``);
- ``replay-own`` / ``replay-own-noisy``: the same honest shares and a replayer uploading its
  own upload of the round before (noise in round 1, when nothing is public), plus noise of
  0 / 1 x its norm. The six replay kinds share one draw: the same honest data, the same truth;
- ``tabular``: the built-in tabular task on examples/breast_cancer (its spec: CSV files checked
  and scaled by the agreed ranges, the plug-in MLP, 3 local epochs at lr 0.1 with momentum 0.5,
  metric log-loss; validation: the coordinator's 114 records), five honest IID shares of the
  pooled hospitals' records (seed 0: 30, 40, 60, 80, 120) and a ``mislabelled`` one (seed 0:
  80 records, 80% of its labels replaced by uniform random ones, so about 40% wrong).

A replayer holds placeholder data of the honest median size (the simulator trains it, but its
honest delta only scales the noise it uploads in round 1, and its count is what it declares).

Truth, once per draw: every coalition of the data-holding organisations (2**H of them, a
replayer is not one: a coalition with it trains exactly as without it) is retrained by plain
FedAvg (``train_fedavg``: by sample counts, no screens, no clipping, the shuffling seeds of
``run_federation``) for ``--rounds`` rounds, the empty coalition being the initial model. Its
final validation accuracy (360 samples) is the utility, and exact Shapley values of it are the
organisations' values. Which initial model training starts from moves them by several points
(a label-skewed draw's shares by up to 8), so the whole game is retrained from each of
``--truth-seeds`` initial models (``build_model(seed=s)``, s = 0, 1, ...; the priced runs start
from seed 0's) and each organisation's truth is the mean of its values (a replayer's is exactly
0): the Shapley value of the expected final accuracy, Shapley being linear. True share_i =
truth_i / sum(truth); ``±`` is its standard error over the initial models (the spread of the
per-model shares / sqrt(models)), the precision of the truth itself. The same game scored by
minus the validation log loss is recorded too (``nll%``). The full coalition's accuracy from
seed 0's initial model is the floor: what plain FedAvg of every data holder reaches from the
model the priced runs start from.

Priced runs: ``run_federation`` closes every round's books (``close_books``) under the
default ``PricingPolicy`` (with the ``--set`` overrides) and under each ``--variant``, paying
the simulator's BUDGET per round. Paid share_i = organisation i's summed rewards / their sum.
Per federation x policy:

- rho: Spearman of the total rewards against the truth over all organisations (nan when
  either side is constant); rho2: the same where the truth tells organisations apart, the
  largest Spearman over the rankings that order every pair whose true shares are more than 2
  points apart as the truth does, a pair closer than that in either order (nan when no pair
  is 2 points apart); rho* (the figure before rho2, kept in the JSON): true shares within 2
  points of a neighbour, chained, tied at their mean rank, which counts any spread of the
  rewards inside such a group against the ranking;
- the largest and the mean |paid share - true share|, in points, and (err0) the largest
  against the true shares with every negative truth set to 0 first: rewards are never
  negative, so an organisation whose truth is -12% is 12 points off even when paid nothing;
- honest organisation-rounds flagged (any flag bit), with the flags' names;
- the odd one out's paid share against its true share;
- the final validation accuracy against the floor;
- each round's gain: the new global model's validation metric minus the old one's, in the
  policy's metric and in accuracy, against what the round paid as a share of its budget; a
  round whose gain in the policy's metric is at most 1e-6 counts as a zero-gain round
  (accuracy moves in steps of 1/360), reported with the largest share of its budget one paid.

Targets, worst case over the federations, per policy: rho2 >= 0.9; largest share error <= 10
points; mislabelled paid <= 2 x max(its true share, 0); replayer paid <= 1%; honest
organisation-rounds flagged <= 1%; zero-gain rounds pay <= 1% of their budget; final accuracy
at least the floor - 1 point. One torch thread by default, as in bench/shapley.py.

Usage: python bench/fairness.py [--rounds 30] [--seed 0] [--truth-seeds 3] [--kinds KIND ...]
       [--set KNOB=VALUE ...] [--variant NAME=KNOB=VALUE,KNOB=VALUE ...] [--quick]
       [--verbose] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr
from torch import Tensor, nn

from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.onchain import flag_names
from fedledger.incentive.shapley import shapley_from_utilities
from fedledger.incentive.utility import evaluate_params
from fedledger.simulation import (
    BUDGET,
    Attack,
    Federation,
    replay_global_step,
    replay_update,
    run_federation,
    train_fedavg,
)
from fedledger.tasks import (
    DigitsTask,
    ValidatorTask,
    dirichlet_partition,
    load_data,
    load_spec,
    load_task,
    load_validation,
)

Data = tuple[Tensor, Tensor]
Params = dict[str, Tensor]

KINDS = (
    "iid-sizes",
    "dirichlet",
    "duplicate",
    "replay-step",
    "replay-step-noisy",
    "replay-update",
    "replay-update-noisy",
    "replay-own",
    "replay-own-noisy",
    "tabular",
)
QUICK_KINDS = ("iid-sizes", "replay-update", "tabular")
MAX_ORGS = 6
SEED0_HONEST_SIZES = (60, 60, 120, 120, 240)
SEED0_MISLABELLED_SIZE = 120
SEED0_TABULAR_SIZES = (30, 40, 60, 80, 120)  # of the 455 breast-cancer training records
SEED0_TABULAR_MISLABELLED_SIZE = 80
MISLABELLED_FRACTION = 0.8
BREAST_CANCER = Path(__file__).resolve().parents[1] / "examples" / "breast_cancer"
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")
ALPHA = 0.5
SEED0_PER_ORG = 120  # label-skewed pools hold this many samples per organisation at seed 0
MIN_SHARE = 20  # a Dirichlet share smaller than this is redrawn: a handful of samples is no org
RESOLUTION = 0.02  # true shares this close are not told apart (rho2, rho*)
GAIN_TOLERANCE = 1e-6
MODEL_SEED = 0  # run_federation and train_fedavg both start from build_model(seed=0)
TRUTH_SEEDS = 3  # initial models the truth is retrained from (--truth-seeds)


@dataclass(frozen=True)
class World:
    """The task a federation learns: its training pool and its validation set (``task`` None:
    the digits task as the simulator trains it; else the loaded task, by its spec's [training])."""

    name: str
    pool: Data
    validation: Data
    num_classes: int
    task: ValidatorTask | None = None

    def build_model(self) -> nn.Module:
        source = DigitsTask() if self.task is None else self.task
        return source.build_model(seed=MODEL_SEED)

    def federation(self) -> dict[str, Any]:
        """What ``run_federation`` is told of the task, beyond the parts."""
        if self.task is None:
            return {}
        return {"task": self.task, "validation": self.validation}


@cache
def digits_world() -> World:
    task = DigitsTask()
    return World("digits", task.training_data(), task.validation_data(), num_classes=10)


@cache
def tabular_world() -> World:
    """The built-in tabular task on examples/breast_cancer: its spec (the plug-in model, its
    [training], features scaled by the agreed ranges) and the CSV files its make_data.py
    writes; the three hospitals' records pooled (455) and the coordinator's validation (114)."""
    spec = load_spec(BREAST_CANCER / "spec.toml")
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, str(BREAST_CANCER / "make_data.py"), folder],
            check=True,
            capture_output=True,
        )
        node, validator = load_task(spec, "node"), load_task(spec, "validator")
        parts = [load_data(node, str(Path(folder) / f"{name}.csv")) for name in HOSPITALS]
        validation = load_validation(validator, str(Path(folder) / "validation.csv"))
    pool = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    if spec.data is None or not spec.data.label.classes:
        raise RuntimeError(f"{BREAST_CANCER / 'spec.toml'} names no label classes")
    classes = len(spec.data.label.classes)
    return World("breast-cancer", pool, validation, classes, task=validator)


@dataclass(frozen=True)
class Setup:
    """One federation to price: who holds what, and who misbehaves how."""

    kind: str
    world: World
    draw: str  # federations of the same draw hold the same data and share one truth
    parts: list[Data]
    roles: list[str]  # honest, mislabelled, copy or replayer
    attacks: dict[int, Attack]
    note: str

    @property
    def holders(self) -> list[int]:
        """The organisations with data of their own: the players of the truth's game."""
        return [k for k, role in enumerate(self.roles) if role != "replayer"]

    @property
    def odd_one(self) -> int | None:
        return next((k for k, role in enumerate(self.roles) if role != "honest"), None)


@dataclass(frozen=True)
class Truth:
    values: list[float]  # Shapley value of the final accuracy, per organisation (mean over seeds)
    nll_values: list[float]  # the same game scored by minus the log loss
    floor: float  # the full coalition's accuracy from seed MODEL_SEED's initial model
    coalitions: int
    seconds: float
    seeds: list[int]  # the initial models' seeds
    seed_values: list[list[float]]  # per seed, each organisation's Shapley value of the accuracy

    @property
    def shares(self) -> np.ndarray:
        return shares_of(self.values)

    @property
    def share_errors(self) -> np.ndarray:
        """Standard error of each true share over the initial models (0 with one model)."""
        if len(self.seed_values) < 2:
            return np.zeros(len(self.values))
        per_seed = np.array([shares_of(v) for v in self.seed_values])
        return per_seed.std(axis=0, ddof=1) / math.sqrt(len(self.seed_values))

    @property
    def nll_shares(self) -> np.ndarray:
        return shares_of(self.nll_values)


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    policy: PricingPolicy


@dataclass(frozen=True)
class OrgRow:
    kind: str
    variant: str
    org: int
    role: str
    samples: int
    truth: float
    true_share: float
    true_share_nll: float
    true_share_error: float  # the true share's standard error over the initial models
    paid: int  # token units over the run
    paid_share: float
    error_points: float  # paid share - true share, in points
    flagged_rounds: int
    flags: dict[str, int]  # flag name -> rounds it was raised


@dataclass(frozen=True)
class RoundRow:
    kind: str
    variant: str
    round: int
    gain: float  # in the policy's metric
    gain_accuracy: float
    paid_share: float  # of the round's budget
    accuracy: float
    flagged: dict[int, list[str]]


@dataclass(frozen=True)
class Summary:
    kind: str
    variant: str
    metric: str
    num_orgs: int
    rounds: int
    spearman: float
    spearman_told: float  # rho2
    spearman_resolved: float  # rho*
    max_error_points: float
    mean_error_points: float
    max_error_clipped_points: float  # against the truth with negative values set to 0
    truth_error_points: float  # the largest standard error of a true share, in points
    truth_seeds: int
    honest_flagged: int
    honest_rounds: int
    honest_flags: dict[str, int]
    odd_role: str | None
    odd_paid_share: float | None
    odd_true_share: float | None
    accuracy: float
    floor: float
    zero_gain_rounds: int
    zero_gain_max_paid: float  # largest share of its budget a zero-gain round paid (0 if none)
    truth_s: float
    priced_s: float

    @property
    def honest_flagged_share(self) -> float:
        return self.honest_flagged / self.honest_rounds if self.honest_rounds else 0.0


@dataclass
class Priced:
    variant: Variant
    organisations: list[OrgRow]
    rounds: list[RoundRow]
    summary: Summary


@dataclass(frozen=True)
class Target:
    description: str
    measure: Callable[[Summary], float | None]  # None where the federation does not test it
    limit: float
    at_least: bool  # the measure must be >= limit (else <= limit)
    unit: str  # "", "%", "pts", "+pts" (signed) or "x": how the worst case prints

    def passes(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit


@dataclass(frozen=True)
class Verdict:
    variant: str
    target: str
    worst: float | None  # None when no federation tested it
    where: str | None
    passed: bool | None
    federations: int = 0
    untested: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- federations


class Pool:
    """A world's training pool in a seeded random order, dealt without replacement."""

    def __init__(self, rng: np.random.Generator, world: World) -> None:
        self.x, self.y = world.pool
        self.order = rng.permutation(len(self.y))
        self.dealt = 0

    def take(self, count: int) -> Data:
        if self.dealt + count > len(self.order):
            raise ValueError(f"the pool holds {len(self.order)} samples, {self.dealt} dealt")
        idx = torch.from_numpy(self.order[self.dealt : self.dealt + count])
        self.dealt += count
        return self.x[idx], self.y[idx]


def honest_sizes(rng: np.random.Generator, seed: int, count: int) -> list[int]:
    if seed == 0:
        return list(SEED0_HONEST_SIZES[:count])
    return [int(n) for n in rng.integers(40, 241, size=count)]


def tabular_sizes(rng: np.random.Generator, seed: int, count: int) -> list[int]:
    """Honest shares of the 455 breast-cancer records: at most 5 x 75, and 80 more for the
    mislabelled organisation."""
    if seed == 0:
        return list(SEED0_TABULAR_SIZES[:count])
    return [int(n) for n in rng.integers(20, 76, size=count)]


def mislabel(data: Data, rng: np.random.Generator, num_classes: int) -> Data:
    """``data`` with MISLABELLED_FRACTION of its labels replaced by uniform random ones."""
    x, y = data
    y = y.clone()
    flipped = rng.choice(len(y), size=round(MISLABELLED_FRACTION * len(y)), replace=False)
    y[torch.from_numpy(flipped)] = torch.from_numpy(rng.integers(0, num_classes, len(flipped)))
    return x, y


def label_skewed(pool: Pool, rng: np.random.Generator, seed: int, count: int) -> list[Data]:
    """``count`` Dirichlet(ALPHA)-over-labels shares of a random subsample of the pool."""
    per_org = SEED0_PER_ORG if seed == 0 else int(rng.integers(80, 161))
    x, y = pool.take(per_org * count)
    for _ in range(100):
        shares = dirichlet_partition(y.numpy(), count, ALPHA, int(rng.integers(2**31)))
        if min(len(s) for s in shares) >= MIN_SHARE:
            return [(x[s], y[s]) for s in (torch.tensor(s, dtype=torch.long) for s in shares)]
    raise RuntimeError(f"no Dirichlet({ALPHA}) split gave every organisation {MIN_SHARE} samples")


def build(kind: str, seed: int, num_orgs: int) -> Setup:
    """Federation ``kind`` of ``num_orgs`` organisations, the odd one out last."""
    draw = "replay" if kind.startswith("replay") else kind
    rng = np.random.default_rng([seed, zlib.crc32(draw.encode())])
    world = tabular_world() if kind == "tabular" else digits_world()
    pool = Pool(rng, world)
    honest = num_orgs - 1 if kind != "dirichlet" else num_orgs
    roles = ["honest"] * honest
    attacks: dict[int, Attack] = {}
    if kind in ("iid-sizes", "tabular"):
        if kind == "tabular":
            sizes = tabular_sizes(rng, seed, honest)
            size = SEED0_TABULAR_MISLABELLED_SIZE if seed == 0 else int(rng.integers(30, 81))
        else:
            sizes = honest_sizes(rng, seed, honest)
            size = SEED0_MISLABELLED_SIZE if seed == 0 else int(rng.integers(60, 181))
        parts = [pool.take(n) for n in sizes]
        parts.append(mislabel(pool.take(size), rng, world.num_classes))
        roles.append("mislabelled")
        note = f"org {honest} holds {size} samples, {MISLABELLED_FRACTION:.0%} mislabelled"
        if kind == "tabular":
            note = f"{world.name}: {note} (at random over its {world.num_classes} classes)"
    elif kind == "dirichlet":
        parts = label_skewed(pool, rng, seed, honest)
        note = f"Dirichlet({ALPHA}) label skew, all honest"
    elif kind == "duplicate":
        parts = label_skewed(pool, rng, seed, honest)
        victim = int(rng.integers(honest))
        parts.append((parts[victim][0].clone(), parts[victim][1].clone()))
        roles.append("copy")
        note = f"org {honest} holds an exact copy of org {victim}'s data"
    else:
        sizes = honest_sizes(rng, seed, honest)
        parts = [pool.take(n) for n in sizes]
        parts.append(pool.take(int(np.median(sizes))))  # placeholder: see the docstring
        roles.append("replayer")
        ratio = 1.0 if kind.endswith("-noisy") else 0.0
        if kind.startswith("replay-step"):
            attacks[honest] = replay_global_step(ratio)
            note = f"org {honest} replays the last global step, noise x{ratio:g}"
        elif kind.startswith("replay-own"):
            attacks[honest] = replay_update(honest, ratio)
            note = f"org {honest} replays its own previous upload, noise x{ratio:g}"
        else:
            victim = int(np.argmax(sizes))
            attacks[honest] = replay_update(victim, ratio)
            note = f"org {honest} replays org {victim}'s previous update, noise x{ratio:g}"
    return Setup(
        kind=kind, world=world, draw=draw, parts=parts, roles=roles, attacks=attacks, note=note
    )


# ---------------------------------------------------------------------------- truth


def shares_of(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    total = float(array.sum())
    return array / total if total != 0 else np.zeros_like(array)


def compute_truth(setup: Setup, rounds: int, seeds: Sequence[int] = (MODEL_SEED,)) -> Truth:
    """Exact Shapley values of the retrained final accuracy (and log loss) of every coalition,
    the game played from each initial model of ``seeds`` (the first is the priced runs') and
    averaged."""
    if not seeds:
        raise ValueError("the truth needs at least one initial model")
    started = time.perf_counter()
    world = setup.world
    model = world.build_model()
    x_val, y_val = world.validation
    holders = setup.holders
    size = 1 << len(holders)
    seed_values: list[list[float]] = []
    nll_sum = np.zeros(len(setup.roles))
    floor = math.nan
    for seed in seeds:
        accuracy, nll = np.empty(size), np.empty(size)
        for mask in range(size):
            members = {k: setup.parts[k] for i, k in enumerate(holders) if mask >> i & 1}
            params = train_fedavg(members, rounds, model_seed=seed, task=world.task)
            accuracy[mask] = evaluate_params(model, params, x_val, y_val, "accuracy")
            nll[mask] = evaluate_params(model, params, x_val, y_val, "neg_log_loss")
        values = np.zeros(len(setup.roles))
        values[holders] = shapley_from_utilities(accuracy, len(holders))
        nll_sum[holders] += shapley_from_utilities(nll, len(holders))
        seed_values.append([float(v) for v in values])
        if seed == seeds[0]:
            floor = float(accuracy[size - 1])
    return Truth(
        values=[float(v) for v in np.mean(seed_values, axis=0)],
        nll_values=[float(v) / len(seeds) for v in nll_sum],
        floor=floor,
        coalitions=size,
        seconds=time.perf_counter() - started,
        seeds=list(seeds),
        seed_values=seed_values,
    )


# ---------------------------------------------------------------------------- priced runs


def spearman(truth: np.ndarray, paid: np.ndarray) -> float:
    """Spearman's rho (ties at their mean rank); nan when either side is constant."""
    if np.ptp(truth) == 0 or np.ptp(paid) == 0:
        return math.nan
    return float(spearmanr(truth, paid).statistic)


def spearman_told(shares: np.ndarray, paid: np.ndarray, resolution: float) -> float:
    """Spearman's rho of ``paid`` against the truth where the truth tells organisations apart
    (rho2): the largest rho over the rankings of the organisations that order every pair whose
    true ``shares`` are more than ``resolution`` apart as the truth does, a pair closer than
    that in either order; nan when ``paid`` is constant or no pair is that far apart."""
    count = len(shares)
    below = [[j for j in range(count) if shares[j] < shares[i] - resolution] for i in range(count)]
    if np.ptp(paid) == 0 or not any(below):
        return math.nan
    paid_ranks = rankdata(paid)
    best = -1.0
    for order in itertools.permutations(range(count)):  # the lowest ranked first
        position = np.empty(count, dtype=np.int64)
        position[list(order)] = np.arange(count)
        if any(position[j] > position[i] for i in range(count) for j in below[i]):
            continue  # puts a pair the truth tells apart the wrong way round
        best = max(best, float(np.corrcoef(position, paid_ranks)[0, 1]))
    return best


def tied_within(shares: np.ndarray, resolution: float) -> np.ndarray:
    """``shares`` with each chain of sorted neighbours at most ``resolution`` apart replaced
    by the chain's mean: the truth cannot order organisations that close."""
    order = np.argsort(shares, kind="stable")
    tied = shares.copy()
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or shares[order[i]] - shares[order[i - 1]] > resolution:
            tied[order[start:i]] = shares[order[start:i]].mean()
            start = i
    return tied


def round_rows(setup: Setup, variant: Variant, federation: Federation) -> list[RoundRow]:
    model = setup.world.build_model()
    x_val, y_val = setup.world.validation
    metric = variant.policy.metric
    before: Params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    old = evaluate_params(model, before, x_val, y_val, metric)
    old_accuracy = evaluate_params(model, before, x_val, y_val, "accuracy")
    rows: list[RoundRow] = []
    for books in federation.rounds:
        new = evaluate_params(model, books.params, x_val, y_val, metric)
        if books.accuracy is None:  # every kind here is a classification task
            raise RuntimeError(f"{setup.kind}: round {books.round_id} reports no accuracy")
        rows.append(
            RoundRow(
                kind=setup.kind,
                variant=variant.name,
                round=books.round_id,
                gain=new - old,
                gain_accuracy=books.accuracy - old_accuracy,
                paid_share=sum(books.rewards) / BUDGET,
                accuracy=books.accuracy,
                flagged={k: flag_names(f) for k, f in enumerate(books.flags) if f},
            )
        )
        old, old_accuracy = new, books.accuracy
    return rows


def org_rows(setup: Setup, variant: Variant, truth: Truth, federation: Federation) -> list[OrgRow]:
    totals = federation.totals()
    paid = shares_of(totals)
    rows: list[OrgRow] = []
    for k, role in enumerate(setup.roles):
        flags: Counter[str] = Counter()
        for books in federation.rounds:
            flags.update(flag_names(books.flags[k]))
        rows.append(
            OrgRow(
                kind=setup.kind,
                variant=variant.name,
                org=k,
                role=role,
                samples=int(setup.parts[k][1].shape[0]),
                truth=truth.values[k],
                true_share=float(truth.shares[k]),
                true_share_nll=float(truth.nll_shares[k]),
                true_share_error=float(truth.share_errors[k]),
                paid=totals[k],
                paid_share=float(paid[k]),
                error_points=100 * float(paid[k] - truth.shares[k]),
                flagged_rounds=sum(bool(b.flags[k]) for b in federation.rounds),
                flags=dict(sorted(flags.items())),
            )
        )
    return rows


def price(setup: Setup, truth: Truth, variant: Variant, rounds: int) -> Priced:
    started = time.perf_counter()
    federation = run_federation(
        parts=setup.parts,
        attacks=setup.attacks,
        rounds=rounds,
        policy=variant.policy,
        **setup.world.federation(),
    )
    priced_s = time.perf_counter() - started
    orgs = org_rows(setup, variant, truth, federation)
    series = round_rows(setup, variant, federation)
    honest = [r for r in orgs if r.role == "honest"]
    honest_flags: Counter[str] = Counter()
    for r in honest:
        honest_flags.update(r.flags)
    zero_gain = [r for r in series if r.gain <= GAIN_TOLERANCE]
    odd = setup.odd_one
    true_shares = truth.shares
    paid_shares = np.array([r.paid_share for r in orgs])
    errors = np.abs(np.array([r.error_points for r in orgs]))
    summary = Summary(
        kind=setup.kind,
        variant=variant.name,
        metric=variant.policy.metric,
        num_orgs=len(orgs),
        rounds=rounds,
        spearman=spearman(true_shares, paid_shares),
        spearman_told=spearman_told(true_shares, paid_shares, RESOLUTION),
        spearman_resolved=spearman(tied_within(true_shares, RESOLUTION), paid_shares),
        max_error_points=float(errors.max()),
        mean_error_points=float(errors.mean()),
        max_error_clipped_points=100
        * float(np.abs(paid_shares - shares_of(np.maximum(truth.values, 0.0))).max()),
        truth_error_points=100 * float(truth.share_errors.max()),
        truth_seeds=len(truth.seeds),
        honest_flagged=sum(r.flagged_rounds for r in honest),
        honest_rounds=len(honest) * rounds,
        honest_flags=dict(sorted(honest_flags.items())),
        odd_role=None if odd is None else setup.roles[odd],
        odd_paid_share=None if odd is None else orgs[odd].paid_share,
        odd_true_share=None if odd is None else orgs[odd].true_share,
        accuracy=federation.accuracy,
        floor=truth.floor,
        zero_gain_rounds=len(zero_gain),
        zero_gain_max_paid=max((r.paid_share for r in zero_gain), default=0.0),
        truth_s=truth.seconds,
        priced_s=priced_s,
    )
    return Priced(variant, orgs, series, summary)


# ---------------------------------------------------------------------------- targets


def mislabelled_ratio(s: Summary) -> float | None:
    """Paid share over max(true share, 0): infinite when an organisation worth nothing is paid."""
    if s.odd_role != "mislabelled" or s.odd_paid_share is None or s.odd_true_share is None:
        return None
    if s.odd_true_share > 0:
        return s.odd_paid_share / s.odd_true_share
    return math.inf if s.odd_paid_share > 0 else 0.0


def told_rho(s: Summary) -> float | None:
    return None if math.isnan(s.spearman_told) else s.spearman_told


TARGETS = (
    Target("rho2 >= 0.9", told_rho, 0.9, True, ""),
    Target("max err <= 10 pts", lambda s: s.max_error_points, 10.0, False, "pts"),
    Target("mislabelled paid <= 2x true", mislabelled_ratio, 2.0, False, "x"),
    Target(
        "replayer paid <= 1%",
        lambda s: s.odd_paid_share if s.odd_role == "replayer" else None,
        0.01,
        False,
        "%",
    ),
    Target("honest flagged <= 1%", lambda s: s.honest_flagged_share, 0.01, False, "%"),
    Target("zero-gain rounds pay <= 1%", lambda s: s.zero_gain_max_paid, 0.01, False, "%"),
    Target(
        "accuracy >= floor - 1 pt",
        lambda s: 100 * (s.accuracy - s.floor),
        -1.0,
        True,
        "+pts",
    ),
)


def verdict(variant: str, target: Target, summaries: Sequence[Summary]) -> Verdict:
    measured = [(m, s.kind) for s in summaries if (m := target.measure(s)) is not None]
    untested = [s.kind for s in summaries if target.measure(s) is None]
    if not measured:
        return Verdict(variant, target.description, None, None, None, 0, untested)
    pick = min if target.at_least else max
    worst, where = pick(measured, key=lambda pair: pair[0])
    return Verdict(
        variant,
        target.description,
        worst,
        where,
        target.passes(worst),
        len(measured),
        untested,
    )


def formatted(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.2f}%"
    if unit == "pts":
        return f"{value:.1f} pts"
    if unit == "+pts":
        return f"{value:+.1f} pts"
    if unit == "x":
        return "inf" if math.isinf(value) else f"{value:.2f}x"
    return f"{value:.3f}"


# ---------------------------------------------------------------------------- printing


def print_federation(setup: Setup, truth: Truth, priced: Sequence[Priced], shared: bool) -> None:
    source = "shared with an earlier kind of the same draw" if shared else "retrained"
    print(
        f"\n== {setup.kind}: {len(setup.roles)} organisations; {setup.note}\n"
        f"   truth: {truth.coalitions} coalitions x {len(truth.seeds)} initial models "
        f"{source} in {truth.seconds:.1f} s; floor (plain FedAvg of every data holder) "
        f"{truth.floor:.2%}"
    )
    head = f"{'org':>3} {'role':<12}{'samples':>8}{'true%':>8}{'±':>5}{'nll%':>7}"
    for p in priced:
        head += f" | {p.variant.name[:12]:>12} paid%{'err':>7}{'fl':>4}"
    print(head)
    for k in range(len(setup.roles)):
        first = priced[0].organisations[k]
        line = (
            f"{k:>3} {first.role:<12}{first.samples:>8}{100 * first.true_share:>8.1f}"
            f"{100 * first.true_share_error:>5.1f}{100 * first.true_share_nll:>7.1f}"
        )
        for p in priced:
            r = p.organisations[k]
            line += f" | {100 * r.paid_share:>17.1f}{r.error_points:>+7.1f}{r.flagged_rounds:>4}"
        print(line)


def print_rounds(priced: Priced) -> None:
    print(f"   per round, {priced.variant.name} ({priced.variant.policy.metric}):")
    print(f"   {'round':>5}{'gain':>11}{'gain acc':>10}{'paid':>8}{'acc':>8}  flagged")
    for r in priced.rounds:
        flagged = ", ".join(f"{k}:{'+'.join(n)}" for k, n in r.flagged.items())
        print(
            f"   {r.round:>5}{r.gain:>+11.5f}{r.gain_accuracy:>+10.4f}{r.paid_share:>8.1%}"
            f"{r.accuracy:>8.2%}  {flagged}"
        )


SUMMARY_HEAD = (
    f"{'kind':<20}{'variant':<12}{'rho':>6}{'rho2':>6}{'rho*':>6}{'max err':>8}{'mean':>6}{'err0':>6}{'±':>5}"
    f"{'honest flagged':>16}  {'odd one: paid / true':<27}{'acc / floor':>16}"
    f"{'zero-gain: n, max paid':>24}  honest flags"
)


def print_summary(s: Summary) -> None:
    odd = "-"
    if s.odd_role is not None and s.odd_paid_share is not None and s.odd_true_share is not None:
        odd = f"{s.odd_role} {s.odd_paid_share:.1%} / {s.odd_true_share:.1%}"
    flags = ", ".join(f"{n} x{c}" for n, c in s.honest_flags.items()) or "-"
    print(
        f"{s.kind:<20}{s.variant[:11]:<12}{s.spearman:>6.2f}{s.spearman_told:>6.2f}"
        f"{s.spearman_resolved:>6.2f}"
        f"{s.max_error_points:>8.1f}{s.mean_error_points:>6.1f}{s.max_error_clipped_points:>6.1f}"
        f"{s.truth_error_points:>5.1f}{s.honest_flagged:>7}/{s.honest_rounds:<4}{s.honest_flagged_share:>5.1%}  {odd:<27}"
        f"{s.accuracy:>8.1%} /{s.floor:>6.1%}{s.zero_gain_rounds:>11}, {s.zero_gain_max_paid:>8.1%}"
        f"    {flags}"
    )


def print_verdicts(variant: str, verdicts: Sequence[Verdict]) -> None:
    """One line: each target's worst case, PASS or FAIL (and where it failed)."""
    parts = []
    for target, v in zip(TARGETS, verdicts, strict=True):
        if v.worst is None:
            parts.append(f"{v.target}: n/a")
        elif v.passed:
            parts.append(f"{v.target}: {formatted(v.worst, target.unit)} PASS")
        else:
            parts.append(f"{v.target}: {formatted(v.worst, target.unit)} FAIL ({v.where})")
    print(f"{variant}: " + " | ".join(parts))


# ---------------------------------------------------------------------------- options


def parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_assignment(text: str) -> tuple[str, Any]:
    knob, sep, raw = text.partition("=")
    if not sep or not knob:
        raise ValueError(f"expected KNOB=VALUE, got {text!r}")
    return knob, parse_value(raw)


def make_policy(overrides: dict[str, Any]) -> PricingPolicy:
    """The default policy with ``overrides``; unknown knobs and bad values raise ValueError."""
    unknown = sorted(set(overrides) - set(PricingPolicy.model_fields))
    if unknown:
        raise ValueError(
            f"unknown pricing knob(s) {', '.join(unknown)}; known: "
            + ", ".join(PricingPolicy.model_fields)
        )
    if "reward_per_round" in overrides:
        # run_federation replaces it with its own BUDGET: an override would be silently lost.
        raise ValueError("reward_per_round is fixed by the simulator (BUDGET); shares ignore it")
    return PricingPolicy(**overrides)  # pydantic's ValidationError is a ValueError


def make_variants(sets: Sequence[str], specs: Sequence[str]) -> list[Variant]:
    base = dict(parse_assignment(s) for s in sets)
    variants = [Variant("default", base, make_policy(base))]
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"expected NAME=KNOB=VALUE[,KNOB=VALUE...], got {spec!r}")
        if any(v.name == name for v in variants):
            raise ValueError(f"variant name {name!r} is used twice (or is the default's)")
        overrides = {**base, **dict(parse_assignment(a) for a in rest.split(","))}
        variants.append(Variant(name, overrides, make_policy(overrides)))
    return variants


def json_safe(value: Any) -> Any:
    """``value`` with nan and infinities as null: strict JSON, readable by any tool."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="which draw of each federation kind")
    parser.add_argument(
        "--truth-seeds",
        type=int,
        default=TRUTH_SEEDS,
        help="initial models the truth is retrained from, its values averaged",
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="default: all of them")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="override a PricingPolicy field for every priced run (VALUE as JSON, else a string)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KNOB=VALUE,...",
        help="also price the federations under the policy with these overrides",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{', '.join(QUICK_KINDS)}; K=4, 4 rounds"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round's gain and pay")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    try:
        variants = make_variants(args.set, args.variant)
    except ValueError as error:
        parser.error(str(error))
    rounds, num_orgs = (4, 4) if args.quick else (args.rounds, MAX_ORGS)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.truth_seeds < 1:
        parser.error("--truth-seeds must be >= 1")
    truth_seeds = [MODEL_SEED + s for s in range(args.truth_seeds)]
    chosen = set(args.kinds or (QUICK_KINDS if args.quick else KINDS))
    kinds = [k for k in KINDS if k in chosen]

    print("command: python bench/fairness.py " + " ".join(shlex.quote(a) for a in argv))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); seed {args.seed}, {rounds} rounds; "
        f"truth from {len(truth_seeds)} initial model(s)"
    )
    for v in variants:
        changed = ", ".join(f"{k}={v2!r}" for k, v2 in v.overrides.items()) or "as shipped"
        print(f"policy {v.name}: PricingPolicy defaults, {changed}")
    started = time.perf_counter()
    truths: dict[str, Truth] = {}
    results: list[Priced] = []
    with torch_threads(args.threads):
        for kind in kinds:
            setup = build(kind, args.seed, num_orgs)
            shared = setup.draw in truths
            if not shared:
                truths[setup.draw] = compute_truth(setup, rounds, truth_seeds)
            truth = truths[setup.draw]
            priced = [price(setup, truth, v, rounds) for v in variants]
            print_federation(setup, truth, priced, shared)
            if args.verbose:
                for p in priced:
                    print_rounds(p)
            sys.stdout.flush()
            results.extend(priced)

    summaries = [p.summary for p in results]
    print(
        "\nrho: Spearman of total reward vs truth; rho2: the same where the truth tells apart "
        f"(pairs within {100 * RESOLUTION:g} pts in either order); rho*: true shares within "
        f"{100 * RESOLUTION:g} pts tied at their mean rank; err: |paid - true| share, pts; err0: the largest against "
        "true shares with negative truths set to 0 (what rewards, never negative, can follow); "
        "±: the largest standard error of a true share over the initial models, pts; "
        f"zero-gain: rounds whose gain in the policy's metric is <= {GAIN_TOLERANCE:g}, and the "
        "most one paid of its budget"
    )
    print(SUMMARY_HEAD)
    for s in summaries:
        print_summary(s)
    print("\nworst case over the federations, per policy:")
    verdicts: list[Verdict] = []
    for v in variants:
        mine = [verdict(v.name, t, [s for s in summaries if s.variant == v.name]) for t in TARGETS]
        print_verdicts(v.name, mine)
        verdicts.extend(mine)
    truth_s = sum(t.seconds for t in truths.values())
    total_s = time.perf_counter() - started
    print(f"\ntruth {truth_s:.1f} s, priced runs {total_s - truth_s:.1f} s, total {total_s:.1f} s")

    if args.json:
        report = {
            "command": ["bench/fairness.py", *argv],
            "seed": args.seed,
            "rounds": rounds,
            "policies": {v.name: v.policy.record() for v in variants},
            "truth": {draw: asdict(t) for draw, t in truths.items()},
            "organisations": [asdict(r) for p in results for r in p.organisations],
            "federations": [asdict(s) for s in summaries],
            "round_series": [asdict(r) for p in results for r in p.rounds],
            "targets": [asdict(v) for v in verdicts],
        }
        with open(args.json, "w") as out:
            json.dump(json_safe(report), out, indent=2, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

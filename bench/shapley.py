"""Sampled Shapley valuators against exact Shapley, round by round, on digits federations.

Part 1, ``--orgs`` (10) organisations, for a Dirichlet(0.5) label split and a label-skewed
Dirichlet(0.1) one: ``--rounds`` (10) rounds of FedAvg from the digits MLP (one local epoch,
SGD lr 0.05, batch 32; organisation k shuffles with seed k * 1,000,003 + r in round r, as
``fedledger/simulation.py`` does). Each round's game is the one the coordinator prices with
``PricingPolicy()``'s defaults (``books.coalition_game``: minus the validation log-loss of w +
the coalition's capped FedAvg step rescaled to the consortium's length). Every round it is
valued exactly (all 2**K coalitions) and by each sampled valuator with ``--seeds`` seeds: the
kernel estimator at its default budget (40 evaluations a player), at 2x and 4x that, and at
its default budget with the coordinator's early stopping (``valuation_stop_ratio``: it scores
the per-sample game, whose spread is the validation error it stops against), and the kernel
estimator, TMC and GTG-Shapley at 10% of exact's evaluations (a valuator that
refuses its budget, because it cannot complete one permutation, is reported as refused). The
new model is FedAvg of all the updates by sample count, so every valuator sees the same
rounds. Per valuator:

- Spearman's rank correlation with the exact values, mean and worst over rounds x seeds (an
  estimate with every value equal carries no ranking and counts as 0);
- the largest absolute error in a round (mean over rounds x seeds, and worst), in the
  game's utility (nats of log-loss), and as a share of the round's gain U(N) - U(empty);
- evaluations: distinct coalition utilities per round, mean and worst, and the mean as a share
  of exact's 2**K;
- seconds of valuation per round, and their share of the round's wall time: training every
  organisation + FedAvg + this valuation (after one untimed warm-up call of the utility).

Part 2, ``--large-orgs`` (50) organisations, Dirichlet(0.5), ``--large-rounds`` (3) rounds:
exact is out of reach (2**50 coalitions), so each sampled valuator's values in the last round
are compared with the mean of two independent untruncated permutation Monte Carlo estimates of
``--reference-permutations`` permutations each; the two references' own Spearman with each
other is printed as the noise floor of that comparison.

Part 3, exact Shapley as the coordinator runs it (the per-sample game, whose spread gives each
value's standard error) for ``--exact-sizes`` (12 14 16) organisations, one round each: seconds
and the process's peak resident memory after it, to choose ``max_exact_players``.

One torch thread by default: on a small machine shared with other work two OpenMP threads
spend most of their time waiting for each other.

Usage: python bench/shapley.py [--quick] [--orgs 10] [--rounds 10] [--seeds 5]
       [--large-orgs 50] [--large-rounds 3] [--reference-permutations 300]
       [--exact-sizes 12 14 16] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor

from fedledger.coordinator.aggregation import fedavg
from fedledger.coordinator.books import coalition_game
from fedledger.coordinator.policy import PricingPolicy
from fedledger.incentive.sampling import (
    GTGShapley,
    StratifiedKernelShapley,
    TMCShapley,
    default_evaluations,
)
from fedledger.incentive.shapley import ExactShapley, Valuator
from fedledger.incentive.utility import CoalitionUtility
from fedledger.tasks import DigitsTask
from fedledger.tasks.training import TrainConfig, train_local

SPLITS = (("dirichlet-0.5", 0.5), ("dirichlet-0.1 (label-skewed)", 0.1))
CPU = torch.device("cpu")
POLICY = PricingPolicy()


@dataclass(frozen=True)
class Row:
    """One valuator on one federation, summarised over its rounds (and seeds)."""

    part: str  # "exact" (compared with exact Shapley) or "large" (with a sampled reference)
    split: str
    num_orgs: int
    valuator: str
    runs: int  # valuations summarised: rounds x seeds, or seeds of the last round
    spearman_mean: float
    spearman_min: float
    max_abs_error_mean: float
    max_abs_error_max: float
    relative_error_max: float  # the worst max abs error as a share of its round's gain
    evaluations_mean: float
    evaluations_max: int
    evaluations_share: float | None  # of 2**K; None where 2**K is out of reach
    valuation_s: float  # per round
    round_s: float  # training + FedAvg + this valuation, per round
    valuation_share: float


@dataclass
class Round:
    """One round's game and what it cost to build, besides its valuation."""

    utility: CoalitionUtility
    gain: float  # U(N) - U(empty) of the round's game
    train_s: float
    aggregate_s: float


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation with ties at their mean rank; 0 if either side is constant."""

    def ranks(x: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
        centred: np.ndarray = mean_rank[inverse] - mean_rank[inverse].mean()
        return centred

    ra, rb = ranks(a), ranks(b)
    norm = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / norm if norm > 0 else 0.0


def federation_rounds(num_orgs: int, rounds: int, alpha: float) -> Iterator[Round]:
    """Each round's coalition game, the model moving on by FedAvg of every update."""
    task = DigitsTask()
    model = task.build_model(seed=0)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    parts = [task.partition(k, num_orgs, alpha=alpha, seed=0) for k in range(num_orgs)]
    empty = [k for k, (_, y) in enumerate(parts) if y.shape[0] == 0]
    if empty:
        raise SystemExit(f"organisations {empty} hold no samples in this split; pick another")
    counts = [int(y.shape[0]) for _, y in parts]
    x_val, y_val = task.validation_data()
    config = TrainConfig(epochs=1, lr=0.05, batch_size=32)
    for round_id in range(1, rounds + 1):
        started = time.perf_counter()
        deltas: list[dict[str, Tensor]] = []
        for k, (x, y) in enumerate(parts):
            seeded = replace(config, seed=k * 1_000_003 + round_id)
            deltas.append(train_local(model, params, x, y, seeded, device=CPU).delta)
        trained = time.perf_counter()
        utility = coalition_game(model, params, deltas, counts, x_val, y_val, POLICY, device=CPU)
        ends = np.zeros((2, num_orgs), dtype=bool)
        ends[1] = True
        v_empty, v_full = utility(ends)  # also a warm-up, not timed
        aggregating = time.perf_counter()
        params = fedavg(params, deltas, counts, device=CPU)
        aggregated = time.perf_counter()
        yield Round(
            utility=utility,
            gain=float(v_full - v_empty),
            train_s=trained - started,
            aggregate_s=aggregated - aggregating,
        )


def timed_value(
    valuator: Valuator, game: Round, num_orgs: int, seed: int
) -> tuple[np.ndarray, int, float]:
    """(values, evaluations, seconds); an early-stopping valuator scores the per-sample game."""
    stopping = isinstance(valuator, StratifiedKernelShapley) and valuator.stop_ratio is not None
    game.utility.per_sample = stopping
    try:
        started = time.perf_counter()
        result = valuator.value(game.utility, num_orgs, seed=seed)
        spent = time.perf_counter() - started
    finally:
        game.utility.per_sample = False
    values = np.asarray(result.values).reshape(num_orgs, -1).mean(axis=1)
    return values, result.evaluations, spent


def early_stopping(budget: int) -> tuple[str, StratifiedKernelShapley]:
    """The kernel estimator at ``budget`` with the default policy's stopping rule, named."""
    ratio = POLICY.valuation_stop_ratio
    valuator = StratifiedKernelShapley(max_evaluations=budget, stop_ratio=ratio)
    return f"kernel @{budget} stop {ratio:g}", valuator


Accuracy = tuple[float, float, int, float]
"""(Spearman, max abs error, evaluations, max abs error / the round's gain) of one valuation."""


def summarise(
    part: str,
    split: str,
    num_orgs: int,
    name: str,
    accuracy: list[Accuracy],
    valuation_s: list[float],
    other_s: list[float],
    *,
    whole_game: int | None,
) -> Row:
    """A row from each valuation's accuracy, and the seconds of valuation and of the rest."""
    rho = np.array([a[0] for a in accuracy])
    error = np.array([a[1] for a in accuracy])
    evals = np.array([a[2] for a in accuracy])
    relative = np.array([a[3] for a in accuracy])
    valuation = float(np.mean(valuation_s))
    round_s = valuation + float(np.mean(other_s))
    return Row(
        part=part,
        split=split,
        num_orgs=num_orgs,
        valuator=name,
        runs=len(accuracy),
        spearman_mean=float(rho.mean()),
        spearman_min=float(rho.min()),
        max_abs_error_mean=float(error.mean()),
        max_abs_error_max=float(error.max()),
        relative_error_max=float(relative.max()),
        evaluations_mean=float(evals.mean()),
        evaluations_max=int(evals.max()),
        evaluations_share=None if whole_game is None else float(evals.mean()) / whole_game,
        valuation_s=valuation,
        round_s=round_s,
        valuation_share=valuation / round_s if round_s > 0 else 0.0,
    )


def sampled_valuators(num_orgs: int) -> dict[str, Valuator]:
    """The kernel estimator at its default budget and 2x and 4x it, and the contenders at 10%
    of exact's evaluations."""
    whole = 1 << num_orgs
    minimum = 2 * num_orgs + 2  # the least StratifiedKernelShapley accepts
    tenth = max(whole // 10, minimum)
    default = default_evaluations(num_orgs)
    budgets = {default: f"kernel @{default} (default)"}
    for budget in (min(2 * default, whole), min(4 * default, whole), tenth):
        budgets.setdefault(budget, f"kernel @{budget}")
    valuators: dict[str, Valuator] = {
        name: StratifiedKernelShapley(max_evaluations=budget) for budget, name in budgets.items()
    }
    if default < whole:
        name, stopping = early_stopping(default)
        valuators[name] = stopping
    valuators[f"tmc @{tenth}"] = TMCShapley(num_permutations=None, max_evaluations=tenth)
    valuators[f"gtg @{tenth}"] = GTGShapley(max_evaluations=tenth)
    valuators["gtg (converged)"] = GTGShapley()
    return valuators


def exact_part(num_orgs: int, rounds: int, seeds: int) -> list[Row]:
    rows: list[Row] = []
    for split, alpha in SPLITS:
        valuators: dict[str, Valuator] = {"exact": ExactShapley(), **sampled_valuators(num_orgs)}
        accuracy: dict[str, list[Accuracy]] = {name: [] for name in valuators}
        seconds: dict[str, list[float]] = {name: [] for name in valuators}
        refused: dict[str, str] = {}
        other_s: list[float] = []
        for round_id, game in enumerate(federation_rounds(num_orgs, rounds, alpha), start=1):
            other_s.append(game.train_s + game.aggregate_s)
            exact, evaluations, exact_s = timed_value(ExactShapley(), game, num_orgs, 0)
            for name, valuator in valuators.items():
                if name in refused:
                    continue
                for seed in range(1 if name == "exact" else seeds):
                    if name == "exact":
                        values, spent = exact, exact_s
                    else:
                        try:
                            values, evaluations, spent = timed_value(
                                valuator, game, num_orgs, round_id * 1000 + seed
                            )
                        except ValueError as exc:  # a budget it cannot value with
                            refused[name] = str(exc)
                            break
                    error = float(np.max(np.abs(values - exact)))
                    relative = error / max(abs(game.gain), 1e-300)
                    accuracy[name].append((spearman(values, exact), error, evaluations, relative))
                    seconds[name].append(spent)
        for name in valuators:
            if name in refused:
                print(f"{split:<29} {num_orgs:>3} {name:<26} refused: {refused[name]}")
                continue
            row = summarise(
                "exact",
                split,
                num_orgs,
                name,
                accuracy[name],
                seconds[name],
                other_s,
                whole_game=1 << num_orgs,
            )
            rows.append(row)
            print_row(row)
        print()
    return rows


@dataclass(frozen=True)
class ExactCost:
    """What exact Shapley of one round costs the coordinator at K organisations."""

    part: str
    num_orgs: int
    coalitions: int
    valuation_s: float
    peak_rss_mib: float  # the process's peak so far (sizes run in increasing order)


def exact_cost_part(sizes: Sequence[int]) -> list[ExactCost]:
    """Exact Shapley of round 1's per-sample game (as ``books.value`` prices it) at each size."""
    import resource

    rows: list[ExactCost] = []
    print(f"{'K':>3} {'coalitions':>10} {'val s':>8} {'peak RSS MiB':>13}")
    for num_orgs in sorted(sizes):
        game = next(federation_rounds(num_orgs, 1, 0.5))
        utility = game.utility
        utility.per_sample = True
        started = time.perf_counter()
        result = ExactShapley().value(utility, num_orgs)
        spent = time.perf_counter() - started
        assert result.values.shape[0] == num_orgs
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        row = ExactCost("exact-cost", num_orgs, 1 << num_orgs, spent, peak)
        rows.append(row)
        print(f"{num_orgs:>3} {row.coalitions:>10} {spent:>8.2f} {peak:>13.0f}", flush=True)
    print()
    return rows


def large_part(num_orgs: int, rounds: int, seeds: int, reference_permutations: int) -> list[Row]:
    budget = default_evaluations(num_orgs)
    stopping_name, stopping = early_stopping(budget)
    valuators: dict[str, Valuator] = {
        f"kernel @{budget} (default)": StratifiedKernelShapley(max_evaluations=budget),
        stopping_name: stopping,
        f"tmc @{budget}": TMCShapley(num_permutations=None, max_evaluations=budget),
        f"gtg @{budget}": GTGShapley(max_evaluations=budget),
    }
    seconds: dict[str, list[float]] = {name: [] for name in valuators}
    other_s: list[float] = []
    last: Round | None = None
    for round_id, game in enumerate(federation_rounds(num_orgs, rounds, 0.5), start=1):
        other_s.append(game.train_s + game.aggregate_s)
        for name, valuator in valuators.items():
            seconds[name].append(timed_value(valuator, game, num_orgs, round_id)[2])
        last = game
    assert last is not None
    reference_valuator = TMCShapley(num_permutations=reference_permutations, tolerance=0.0)
    first, evals_a, ref_s = timed_value(reference_valuator, last, num_orgs, 10_001)
    second, evals_b, _ = timed_value(reference_valuator, last, num_orgs, 10_002)
    reference = (first + second) / 2
    print(
        f"reference: 2 x {reference_permutations} untruncated permutations in the last round "
        f"({evals_a} + {evals_b} evaluations, {ref_s:.1f} s each); the two references' "
        f"Spearman with each other: {spearman(first, second):.3f}, max abs difference "
        f"{float(np.max(np.abs(first - second))):.4f}"
    )
    rows: list[Row] = []
    for name, valuator in valuators.items():
        # Accuracy over seeds on the last round; time per round over every round above.
        accuracy: list[Accuracy] = []
        for seed in range(seeds):
            values, evaluations, _ = timed_value(valuator, last, num_orgs, 20_000 + seed)
            error = float(np.max(np.abs(values - reference)))
            relative = error / max(abs(last.gain), 1e-300)
            accuracy.append((spearman(values, reference), error, evaluations, relative))
        row = summarise(
            "large",
            "dirichlet-0.5",
            num_orgs,
            name,
            accuracy,
            seconds[name],
            other_s,
            whole_game=None,
        )
        rows.append(row)
        print_row(row)
    print()
    return rows


HEADER = (
    f"{'split':<29} {'K':>3} {'valuator':<26} {'rho mean':>8} {'rho min':>8} "
    f"{'err mean':>8} {'err max':>8} {'of gain':>7} {'evals':>7} {'max':>6} {'of 2^K':>7} "
    f"{'val s':>7} {'round s':>8} {'val %':>6}"
)


def print_row(row: Row) -> None:
    share = "-" if row.evaluations_share is None else f"{100 * row.evaluations_share:.1f}%"
    print(
        f"{row.split:<29} {row.num_orgs:>3} {row.valuator:<26} {row.spearman_mean:>8.3f} "
        f"{row.spearman_min:>8.3f} {row.max_abs_error_mean:>8.4f} {row.max_abs_error_max:>8.4f} "
        f"{100 * row.relative_error_max:>6.1f}% "
        f"{row.evaluations_mean:>7.1f} {row.evaluations_max:>6} {share:>7} "
        f"{row.valuation_s:>7.3f} {row.round_s:>8.3f} {100 * row.valuation_share:>5.1f}%",
        flush=True,
    )


@contextmanager
def cpu_settings(threads: int) -> Iterator[None]:
    """``threads`` torch threads and subnormals flushed, both put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    # Subnormals make CPU training several times slower; the flag is process-wide.
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 and 12 organisations: a smoke run")
    parser.add_argument("--orgs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per sampled valuation")
    parser.add_argument("--large-orgs", type=int, default=50)
    parser.add_argument("--large-rounds", type=int, default=3)
    parser.add_argument("--reference-permutations", type=int, default=300)
    parser.add_argument("--exact-sizes", type=int, nargs="*", default=[12, 14, 16])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(list(argv))
    if args.quick:
        args.orgs, args.rounds, args.seeds = 4, 2, 2
        args.large_orgs, args.large_rounds, args.reference_permutations = 12, 1, 40
        args.exact_sizes = [6, 8]
    if min(args.orgs, args.rounds, args.seeds, args.large_orgs, args.large_rounds) < 1:
        parser.error("--orgs, --rounds, --seeds, --large-orgs and --large-rounds must be >= 1")
    if args.orgs > 16:
        parser.error("--orgs is valued exactly too: at most 16 organisations")
    print("command: python bench/shapley.py " + " ".join(shlex.quote(a) for a in argv))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); rho: Spearman with exact (part "
        f"1) or the reference (part 2); err: max |value - exact| in a round, in nats of log-loss; "
        f"val s: valuation seconds per round; round s: training + FedAvg + valuation\n"
    )
    started = time.perf_counter()
    with cpu_settings(args.threads):
        print(f"Part 1: {args.orgs} organisations, {args.rounds} rounds, {args.seeds} seeds")
        print(HEADER)
        print("-" * len(HEADER))
        rows = exact_part(args.orgs, args.rounds, args.seeds)
        print(f"Part 2: {args.large_orgs} organisations, {args.large_rounds} rounds")
        print(HEADER)
        print("-" * len(HEADER))
        rows += large_part(
            args.large_orgs, args.large_rounds, args.seeds, args.reference_permutations
        )
        print("Part 3: exact Shapley as the coordinator runs it, one round")
        costs = exact_cost_part(args.exact_sizes)
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) for r in rows] + [asdict(c) for c in costs], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

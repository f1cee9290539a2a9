"""Robust aggregation under attack: final accuracy and the attackers' share of the reward budget.

Digits task, 10 organisations (Dirichlet alpha 0.5 partition, seed 0), one local epoch of SGD a
round. Two organisations attack by sending their honest delta sign-flipped (x -1) or boosted
(x 10). Each attack runs under FedAvg, FedAvg with norm clipping (bound = multiplier x the
round's median update norm), the coordinate-wise median and the trimmed mean. Every round is
priced with exact Shapley values over the 10 organisations and paid with ``split_rewards``.

Pricing ("rule"): a coalition's utility is the validation score of the model its members'
deltas give under the run's own aggregation rule (FedAvg, clipped FedAvg, coalition median or
coalition trimmed mean). Pricing ("clip"): every run priced with the clipped-FedAvg coalition
utility instead, the cheaper proxy a coordinator using median or trimmed mean may use. Each is
reported under the accuracy and the negative log-loss metric, and as paid ("Shapley") or with
the norm-flagged organisations of a round forfeiting their reward ("+forfeit").

Usage: python bench/robust.py [--rounds 30] [--attackers largest|first] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, vmap

from fedledger.coordinator.aggregation import (
    AggregationMethod,
    aggregate,
    clip_by_norm,
    median_norm_bound,
)
from fedledger.incentive.rewards import split_rewards
from fedledger.incentive.shapley import BatchUtility, ExactShapley
from fedledger.incentive.valuation import CoalitionUtility, Metric, evaluate_params, flatten
from fedledger.node.training import TrainConfig, train_local
from fedledger.tasks import get_task

NUM_ORGS = 10
ALPHA = 0.5
BUDGET = 1000 * 10**18  # token units per round, the coordinator's default
METRICS: tuple[Metric, ...] = ("accuracy", "neg_log_loss")
ATTACKS = {"none": 1.0, "sign_flip": -1.0, "scale_x10": 10.0}  # multiplier on the honest delta
ABSENT = "absent"  # reference: the attackers take no part at all (FedAvg over the others)


@dataclass(frozen=True)
class Defence:
    name: str
    method: AggregationMethod
    clip: bool


DEFENCES = {
    d.name: d
    for d in (
        Defence("fedavg", "fedavg", clip=False),
        Defence("fedavg+clip", "fedavg", clip=True),
        Defence("median", "median", clip=False),
        Defence("trimmed_mean", "trimmed_mean", clip=False),
        Defence("median+clip", "median", clip=True),
        Defence("trimmed_mean+clip", "trimmed_mean", clip=True),
    )
}
DEFAULT_DEFENCES = ("fedavg", "fedavg+clip", "median", "trimmed_mean")


class RuleUtility:
    """U(S) = metric of w + eta * rule({delta_k : k in S}) for rule = coordinate median or
    trimmed mean, every coalition of a chunk aggregated at once (the empty coalition is w)."""

    def __init__(
        self,
        model: torch.nn.Module,
        base: Mapping[str, Tensor],
        deltas: Sequence[Mapping[str, Tensor]],
        x_val: Tensor,
        y_val: Tensor,
        *,
        method: AggregationMethod,
        trim_fraction: float,
        metric: Metric,
        device: torch.device,
        eta: float = 1.0,
        max_batch: int = 128,
    ) -> None:
        self.model = model
        self.method = method
        self.metric = metric
        self.device = device
        self.eta = eta
        self.max_batch = max_batch
        self._names = sorted(base)
        self._shapes = [tuple(base[n].shape) for n in self._names]
        self._base = flatten(base).to(device)
        self._deltas = torch.stack([flatten(d) for d in deltas]).to(device)  # (K, P)
        k = len(deltas)
        # Same rounding of floor(beta * m) as fedledger's trimmed_mean, for m = 0..K.
        self._trim = torch.tensor(
            [math.floor(round(trim_fraction * m, 9)) for m in range(k + 1)], device=device
        )
        self._x = x_val.to(device)
        self._y = y_val.to(device, torch.int64)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        out = np.empty(masks.shape[0], dtype=np.float64)
        for start in range(0, masks.shape[0], self.max_batch):
            chunk = masks[start : start + self.max_batch]
            out[start : start + chunk.shape[0]] = self._chunk(chunk)
        return out

    def _chunk(self, masks: np.ndarray) -> np.ndarray:
        member = torch.from_numpy(masks).to(self.device)  # (c, K)
        count, k = member.shape
        values = self._deltas.unsqueeze(0).expand(count, k, -1)
        # Non-members sort last (+inf); the first |S| sorted values are the coalition's.
        ordered = values.masked_fill(~member.unsqueeze(-1), math.inf).sort(dim=1).values
        size = member.sum(dim=1)  # (c,)
        position = torch.arange(k, device=self.device).unsqueeze(0)  # (1, K)
        if self.method == "median":
            lo, hi = ((size - 1) // 2).unsqueeze(1), (size // 2).unsqueeze(1)
            selected = (position == lo) | (position == hi)
        else:
            trim = self._trim[size].unsqueeze(1)
            selected = (position >= trim) & (position < size.unsqueeze(1) - trim)
        selected &= size.unsqueeze(1) > 0
        summed = torch.where(selected.unsqueeze(-1), ordered, 0.0).sum(dim=1)
        step = summed / selected.sum(dim=1, keepdim=True).clamp(min=1)
        flat = self._base + self.eta * step  # (c, P)
        params = {
            name: piece.reshape(count, *shape)
            for name, shape, piece in zip(
                self._names,
                self._shapes,
                flat.split([math.prod(s) for s in self._shapes], dim=1),
                strict=True,
            )
        }

        def score(p: dict[str, Tensor]) -> Tensor:
            logits: Tensor = functional_call(self.model, p, (self._x,))
            if self.metric == "accuracy":
                return (logits.argmax(dim=-1) == self._y).to(torch.float64).mean()
            return -torch.nn.functional.cross_entropy(logits.to(torch.float64), self._y)

        with torch.no_grad():
            scores: Tensor = vmap(score)(params)
        result: np.ndarray = scores.cpu().numpy()
        return result


@dataclass
class Tally:
    """The attackers' summed rewards over rounds, as paid and with flagged organisations forfeiting."""

    paid: int = 0
    forfeit: int = 0


@dataclass
class RunResult:
    accuracy: float
    attacker_flags: int  # (organisation, round) pairs norm-flagged
    honest_flags: int
    num_attackers: int
    num_honest: int
    rounds: int
    seconds: float
    tallies: dict[str, Tally] = field(default_factory=dict)  # key: "rule/accuracy", ...


def run(
    attack: str,
    defence: Defence,
    attackers: list[int],
    *,
    rounds: int,
    clip_multiplier: float,
    trim_fraction: float,
    device: torch.device,
) -> RunResult:
    task = get_task("digits")
    model = task.build_model(seed=0)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    members = [k for k in range(NUM_ORGS) if attack != ABSENT or k not in attackers]
    parts = [task.partition(k, NUM_ORGS, alpha=ALPHA, seed=0) for k in members]
    attackers = [i for i, k in enumerate(members) if k in attackers]  # indices into members
    x_val, y_val = task.validation_data()
    num_samples = [int(y.shape[0]) for _, y in parts]
    base_config = TrainConfig(epochs=1, lr=0.05, batch_size=32)
    valuator = ExactShapley()
    result = RunResult(
        accuracy=0.0,
        attacker_flags=0,
        honest_flags=0,
        num_attackers=len(attackers),
        num_honest=len(members) - len(attackers),
        rounds=rounds,
        seconds=0.0,
    )
    started = time.perf_counter()
    for round_id in range(1, rounds + 1):
        deltas: list[dict[str, Tensor]] = []
        for i, (k, (x, y)) in enumerate(zip(members, parts, strict=True)):
            config = replace(base_config, seed=k * 1_000_003 + round_id)  # as node/runner.py
            delta = train_local(model, params, x, y, config, device=device).delta
            if i in attackers:
                delta = {n: ATTACKS[attack] * t for n, t in delta.items()}
            deltas.append(delta)

        bound = median_norm_bound(deltas, clip_multiplier)
        aggregated = aggregate(
            defence.method,
            params,
            deltas,
            num_samples,
            device=device,
            trim_fraction=trim_fraction,
            clip_norm=bound if defence.clip else None,
        )
        flagged = [k for k, n in enumerate(aggregated.norms) if n > bound]
        result.attacker_flags += sum(k in attackers for k in flagged)
        result.honest_flags += sum(k not in attackers for k in flagged)
        clipped = [clip_by_norm(d, bound)[0] for d in deltas]

        for metric in METRICS:
            utilities: dict[str, BatchUtility] = {}
            clip_utility = CoalitionUtility(
                model, params, clipped, num_samples, x_val, y_val, metric=metric, device=device
            )
            if defence.method == "fedavg":
                utilities["rule"] = (
                    clip_utility
                    if defence.clip
                    else CoalitionUtility(
                        model,
                        params,
                        deltas,
                        num_samples,
                        x_val,
                        y_val,
                        metric=metric,
                        device=device,
                    )
                )
            else:
                utilities["rule"] = RuleUtility(
                    model,
                    params,
                    clipped if defence.clip else deltas,
                    x_val,
                    y_val,
                    method=defence.method,
                    trim_fraction=trim_fraction,
                    metric=metric,
                    device=device,
                )
                utilities["clip"] = clip_utility
            for pricing, utility in utilities.items():
                values = valuator.value(utility, len(members)).values
                paid = split_rewards(BUDGET, [float(v) for v in values])
                forfeit = split_rewards(
                    BUDGET, [0.0 if k in flagged else float(v) for k, v in enumerate(values)]
                )
                tally = result.tallies.setdefault(f"{pricing}/{metric}", Tally())
                tally.paid += sum(paid[k] for k in attackers)
                tally.forfeit += sum(forfeit[k] for k in attackers)
        params = aggregated.params
    result.accuracy = evaluate_params(model, params, x_val, y_val, "accuracy")
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--attackers", choices=("largest", "first"), default="largest")
    parser.add_argument("--clip-multiplier", type=float, default=2.0)
    parser.add_argument("--trim-fraction", type=float, default=0.2)
    parser.add_argument(
        "--attacks", nargs="+", choices=(*ATTACKS, ABSENT), default=[*ATTACKS, ABSENT]
    )
    parser.add_argument(
        "--defences", nargs="+", choices=list(DEFENCES), default=list(DEFAULT_DEFENCES)
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # Subnormal floats make this CPU run ~7x slower; flushing them did not change a digit of the
    # table in a 5-round check (it may in the last bit elsewhere).
    torch.set_flush_denormal(True)
    task = get_task("digits")
    sizes = [
        int(task.partition(k, NUM_ORGS, alpha=ALPHA, seed=0)[1].shape[0]) for k in range(NUM_ORGS)
    ]
    attackers = (
        sorted(sorted(range(NUM_ORGS), key=lambda k: -sizes[k])[:2])
        if args.attackers == "largest"
        else [0, 1]
    )
    print("command: python bench/robust.py " + " ".join(shlex.quote(a) for a in argv))
    print(
        f"digits, {NUM_ORGS} orgs (alpha {ALPHA}, seed 0), sizes {sizes}; attackers {attackers} "
        f"({sum(sizes[k] for k in attackers) / sum(sizes):.0%} of the samples); {args.rounds} "
        f"rounds; TrainConfig(epochs=1, lr=0.05, batch_size=32); clip bound "
        f"{args.clip_multiplier} x median norm; trimmed mean beta {args.trim_fraction}; "
        f"torch {torch.__version__} on {device}"
    )
    print(
        "acc% = final validation accuracy; Δclean = minus clean FedAvg's; flag = share of "
        "(organisation, round) pairs over the norm bound;\nshare = the attackers' summed rewards / "
        "(rounds x budget), exact Shapley each round, priced by the run's own rule (rule/) or by "
        "clipped FedAvg (clip/),\nunder accuracy (acc) or negative log-loss (nll); "
        "+ff = the same with norm-flagged organisations forfeiting the round's reward\n"
    )
    columns = [f"{p}/{m}" for p in ("rule", "clip") for m in METRICS]
    short = {"accuracy": "acc", "neg_log_loss": "nll"}
    header = (
        f"{'attack':<10} {'defence':<17} {'acc%':>6} {'Δclean':>7} {'flag atk':>8} {'flag hon':>8} "
        + " ".join(
            f"{c.split('/')[0] + '/' + short[c.split('/')[1]]:>8} {'+ff':>6}" for c in columns
        )
        + f" {'time':>6}"
    )
    print(header)
    print("-" * len(header))
    runs = [
        (attack, name)
        for attack in ("none", ABSENT, *ATTACKS)
        if attack in args.attacks and (attack != ABSENT or "fedavg" in args.defences)
        for name in (["fedavg"] if attack == ABSENT else args.defences)
    ]
    runs = list(dict.fromkeys(runs))
    clean = None
    if ("none", "fedavg") not in runs:  # the reference every row is compared with
        clean = run(
            "none",
            DEFENCES["fedavg"],
            attackers,
            rounds=args.rounds,
            clip_multiplier=args.clip_multiplier,
            trim_fraction=args.trim_fraction,
            device=device,
        ).accuracy
    for attack, name in runs:
        r = run(
            attack,
            DEFENCES[name],
            attackers,
            rounds=args.rounds,
            clip_multiplier=args.clip_multiplier,
            trim_fraction=args.trim_fraction,
            device=device,
        )
        if clean is None:
            clean = r.accuracy
        total = args.rounds * BUDGET
        shares = []
        for c in columns:
            tally = r.tallies.get(c)
            if tally is None or r.num_attackers == 0:
                shares.append(f"{'-':>8} {'-':>6}")
            else:
                shares.append(
                    f"{100 * tally.paid / total:>7.2f}% {100 * tally.forfeit / total:>5.2f}%"
                )
        flag_atk = (
            f"{r.attacker_flags / (r.num_attackers * args.rounds):>8.0%}"
            if r.num_attackers
            else f"{'-':>8}"
        )
        print(
            f"{attack:<10} {name:<17} {100 * r.accuracy:>6.2f} "
            f"{100 * (r.accuracy - clean):>+7.2f} {flag_atk} "
            f"{r.honest_flags / (r.num_honest * args.rounds):>8.0%} "
            + " ".join(shares)
            + f" {r.seconds:>5.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Does pricing punish privacy? Ten honest digits organisations train with DP-SGD at several
budgets, priced by the real books under the default policy, against the same run without DP.

For each target epsilon (at delta 1e-5, over all ``--rounds`` rounds of one local epoch, batch
32), the noise multiplier is the smallest Opacus's accountant finds for the organisation with
the fewest records (``opacus.accountants.utils.get_noise_multiplier``), so every organisation's
guarantee is at least the target; the epsilon each then actually spends (Opacus's RDP
accountant over its rounds) is printed. Per run: final validation accuracy, honest
organisation-rounds flagged (by flag), the largest and smallest share of the rewards, and the
Spearman correlation of each organisation's reward share with its share in the run without DP.

Usage: python bench/privacy.py [--rounds 10] [--epsilons 1 3 8] [--orgs 10] [--threads 1]
       [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fedledger.incentive.onchain import flag_names
from fedledger.simulation import TRAIN_CONFIG, Federation, run_federation
from fedledger.tasks import DigitsTask
from fedledger.tasks.privacy import PrivacyLedger
from fedledger.tasks.spec import PrivacySection

DELTA = 1e-5
MAX_GRAD_NORM = 1.0


def noise_for(epsilon: float, num_samples: int, rounds: int) -> float:
    """The noise multiplier that spends ``epsilon`` over the run for ``num_samples`` records."""
    from opacus.accountants.utils import get_noise_multiplier

    batches = math.ceil(num_samples / TRAIN_CONFIG.batch_size)
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=DELTA,
            sample_rate=1 / batches,
            steps=rounds * TRAIN_CONFIG.epochs * batches,
            accountant="rdp",
        )
    )


def spent(privacy: PrivacySection, num_samples: int, rounds: int) -> float:
    ledger = PrivacyLedger(privacy)
    for round_id in range(1, rounds + 1):
        ledger.charge(
            round_id, num_samples, epochs=TRAIN_CONFIG.epochs, batch_size=TRAIN_CONFIG.batch_size
        )
    return ledger.spent().epsilon


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def shares(federation: Federation) -> np.ndarray:
    totals = np.asarray(federation.totals(), dtype=float)
    return totals / totals.sum() if totals.sum() > 0 else totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--orgs", type=int, default=10)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 organisations, 2 rounds, eps 8")
    parser.add_argument("--json", type=Path, help="also write the table's rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.orgs, args.rounds, args.epsilons = 4, 2, [8.0]
    torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    task = DigitsTask()
    sizes = [len(task.partition(k, args.orgs, alpha=0.5, seed=0)[1]) for k in range(args.orgs)]
    print(
        f"digits-10, {args.orgs} organisations (Dirichlet 0.5; {min(sizes)}-{max(sizes)} records), "
        f"{args.rounds} rounds of 1 local epoch (batch {TRAIN_CONFIG.batch_size}, lr "
        f"{TRAIN_CONFIG.lr}), default pricing; DP-SGD clip {MAX_GRAD_NORM}, delta {DELTA:g}"
    )
    header = (
        f"{'target eps':>10} {'sigma':>7} {'eps spent':>15} {'accuracy':>9} "
        f"{'flagged':>8} {'max/min share':>14} {'rho vs no-DP':>12} {'s':>6}  flags"
    )
    print(header)
    baseline: np.ndarray | None = None
    for target in [None, *args.epsilons]:
        started = time.perf_counter()
        privacy = None
        eps_text = "-"
        sigma_text = "-"
        if target is not None:
            sigma = noise_for(target, min(sizes), args.rounds)
            privacy = PrivacySection(
                noise_multiplier=sigma, max_grad_norm=MAX_GRAD_NORM, epsilon=1e9, delta=DELTA
            )
            used = [spent(privacy, n, args.rounds) for n in sizes]
            eps_text = f"{min(used):.2f}-{max(used):.2f}"
            sigma_text = f"{sigma:.3f}"
        federation = run_federation(num_orgs=args.orgs, rounds=args.rounds, privacy=privacy)
        paid = shares(federation)
        if baseline is None:
            baseline = paid
        flags = Counter(name for r in federation.rounds for f in r.flags for name in flag_names(f))
        flagged = sum(bool(f) for r in federation.rounds for f in r.flags)
        total = args.orgs * args.rounds
        rows.append(
            {
                "target_epsilon": target,
                "noise_multiplier": None if privacy is None else privacy.noise_multiplier,
                "accuracy": federation.accuracy,
                "flagged": flagged / total,
                "flags": dict(flags),
                "max_share": float(paid.max()),
                "min_share": float(paid.min()),
                "spearman_vs_no_dp": spearman(paid, baseline),
            }
        )
        print(
            f"{'none' if target is None else f'{target:g}':>10} {sigma_text:>7} {eps_text:>15} "
            f"{federation.accuracy:>9.1%} {flagged / total:>8.1%} "
            f"{paid.max():>6.1%}/{paid.min():>6.1%} {spearman(paid, baseline):>12.2f} "
            f"{time.perf_counter() - started:>6.0f}  {dict(flags) or '-'}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

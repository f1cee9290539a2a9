"""What compressing updates saves and costs: the digits-10 federation with every upload sent as
the float32 delta, int8 (one symmetric scale per tensor) and top-k (the largest 10% and 1% of
each tensor's coordinates, with error feedback on every node).

Each organisation's honest delta goes through its own error-feedback memory and the codec;
the books get what the coordinator decodes from the canonical bytes, whose keccak is the
committed hash, and price the round under the default policy. Per scheme: the bytes uploaded
a round (all organisations, and one organisation; header included, the size is fixed by the
model's shapes), their ratio to the float32 upload, final validation accuracy, the
organisation-rounds flagged (by flag), the Spearman correlation of the reward shares with
those of the float32 run, and the wall time of the federation (after one untimed warm-up).

Usage: python bench/compression.py [--rounds 10] [--orgs 10] [--fractions 0.1 0.01]
       [--threads 1] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fedledger.incentive.onchain import flag_names
from fedledger.simulation import TRAIN_CONFIG, run_federation, spearman
from fedledger.tasks import DigitsTask
from fedledger.tasks.spec import CompressionSection


def label(compression: CompressionSection) -> str:
    if compression.scheme == "topk":
        return f"top-k {(compression.fraction or 0) * 100:g}%"
    return compression.scheme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--orgs", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 organisations, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the table's rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.orgs, args.rounds = 4, 2
    torch.set_num_threads(args.threads)
    schemes = [
        CompressionSection(scheme="none"),
        CompressionSection(scheme="int8"),
        *(CompressionSection(scheme="topk", fraction=f) for f in args.fractions),
    ]
    task = DigitsTask()
    sizes = [len(task.partition(k, args.orgs, alpha=0.5, seed=0)[1]) for k in range(args.orgs)]
    print(
        f"digits-10, {args.orgs} organisations (Dirichlet 0.5; {min(sizes)}-{max(sizes)} records), "
        f"{args.rounds} rounds of 1 local epoch (batch {TRAIN_CONFIG.batch_size}, lr "
        f"{TRAIN_CONFIG.lr}), default pricing; bytes are canonical safetensors, header included"
    )
    print(
        f"{'scheme':>10} {'bytes/round':>12} {'bytes/org':>10} {'ratio':>7} {'accuracy':>9} "
        f"{'flagged':>8} {'rho vs none':>11} {'s':>6}  flags"
    )
    run_federation(num_orgs=2, rounds=1)  # untimed: loads the data and warms torch up
    rows: list[dict[str, object]] = []
    baseline_bytes: float | None = None
    baseline_shares: np.ndarray | None = None
    for compression in schemes:
        started = time.perf_counter()
        federation = run_federation(num_orgs=args.orgs, rounds=args.rounds, compression=compression)
        seconds = time.perf_counter() - started
        per_round = sum(federation.upload_bytes) / len(federation.upload_bytes)
        paid = np.asarray(federation.shares())
        if baseline_bytes is None or baseline_shares is None:
            baseline_bytes, baseline_shares = per_round, paid
        every_flag = [f for r in federation.rounds for f in r.flags]
        flags = Counter(name for f in every_flag for name in flag_names(f))
        flagged = sum(bool(f) for f in every_flag) / len(every_flag)
        rho = spearman(paid, baseline_shares)
        rows.append(
            {
                "scheme": compression.scheme,
                "fraction": compression.fraction,
                "bytes_per_round": per_round,
                "bytes_per_organisation": per_round / args.orgs,
                "ratio": per_round / baseline_bytes,
                "accuracy": federation.accuracy,
                "flagged": flagged,
                "flags": dict(flags),
                "spearman_vs_none": rho,
                "seconds": seconds,
            }
        )
        print(
            f"{label(compression):>10} {per_round:>12,.0f} {per_round / args.orgs:>10,.0f} "
            f"{per_round / baseline_bytes:>7.3f} {federation.accuracy:>9.1%} {flagged:>8.1%} "
            f"{rho:>11.2f} {seconds:>6.1f}  {dict(flags) or '-'}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Attacks against the model and the rewards, priced by the coordinator's own ``close_books``.

Digits task, 10 organisations (Dirichlet(alpha) partition, seed 0), one local epoch of SGD a
round, every round screened, clipped, valued (exact Shapley), aggregated and paid exactly as
the coordinator closes a round. Two organisations attack by sending their honest delta
sign-flipped or scaled x10; each attack runs under every aggregation rule. Printed: final
validation accuracy against the same rule's clean run, and the attackers' share of the
reward budget over all rounds. A second table runs single free-riders.

Usage: python bench/robust.py [--rounds 30] [--alpha 0.5] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedledger.coordinator.policy import PricingPolicy
from fedledger.simulation import (
    Attack,
    copy_of,
    noise,
    run_federation,
    scaled,
    sign_flip,
    zero,
)

RULES = ("fedavg", "trimmed_mean", "median")
ATTACKS: dict[str, Attack] = {"sign flip": sign_flip, "x10": scaled(10.0)}
PAIRS = {"largest [2,3]": [2, 3], "first [0,1]": [0, 1]}
FREE_RIDERS: dict[str, Attack] = {
    "zero": zero,
    "noise": noise,
    "byte-identical copy": copy_of(3),
    "copy x3": copy_of(3, 3.0),
    "x100": scaled(100.0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="3 rounds, FedAvg only")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    rules = RULES[:1] if args.quick else RULES
    rows: list[dict[str, object]] = []
    started = time.perf_counter()

    print(f"Two attackers of 10, {rounds} rounds, Dirichlet({args.alpha})")
    print(f"{'rule':<14}{'attackers':<15}{'attack':<11}{'clean':>8}{'attacked':>10}{'paid':>8}")
    for rule in rules:
        policy = PricingPolicy(aggregation=rule)  # type: ignore[arg-type]
        clean = run_federation(rounds=rounds, policy=policy, alpha=args.alpha).accuracy
        for pair_name, pair in PAIRS.items():
            for attack_name, attack in ATTACKS.items():
                fed = run_federation(
                    rounds=rounds,
                    attacks=dict.fromkeys(pair, attack),
                    policy=policy,
                    alpha=args.alpha,
                )
                row = {
                    "rule": rule,
                    "attackers": pair_name,
                    "attack": attack_name,
                    "clean": clean,
                    "attacked": fed.accuracy,
                    "paid": fed.paid_share(pair),
                }
                rows.append(row)
                print(
                    f"{rule:<14}{pair_name:<15}{attack_name:<11}{clean:>8.2%}"
                    f"{fed.accuracy:>10.2%}{fed.paid_share(pair):>8.2%}"
                )

    free_rounds = min(rounds, 10)
    print(f"\nOne free-rider (organisation 4) of 10, {free_rounds} rounds, FedAvg")
    print(f"{'kind':<22}{'paid':>8}{'flagged rounds':>16}")
    for name, attack in FREE_RIDERS.items():
        fed = run_federation(rounds=free_rounds, attacks={4: attack}, alpha=args.alpha)
        flagged = sum(bool(r.flags[4]) for r in fed.rounds)
        rows.append({"free_rider": name, "paid": fed.paid_share([4]), "flagged": flagged})
        print(f"{name:<22}{fed.paid_share([4]):>8.2%}{flagged:>11d} / {free_rounds}")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does pricing punish privacy? Honest organisations train with DP-SGD at several budgets,
priced by the real books under the default policy, against the same run without DP.

Two tasks (``--task``): ``digits``, ten digits organisations (a Dirichlet(0.5) split) training
one local epoch a round (lr 0.05, batch 32); ``breast_cancer``, the three hospitals of
``examples/breast_cancer`` (its make_data.py split, its spec: the plug-in model, its [training]
and its validation metric, the coordinator's validation CSV).

For each target epsilon (at delta 1e-5, over all ``--rounds`` rounds of the task's local
epochs and batch size), the noise multiplier is the smallest Opacus's accountant finds for the organisation with
the fewest records (``opacus.accountants.utils.get_noise_multiplier``), so every organisation's
guarantee is at least the target; the epsilon each then actually spends (Opacus's RDP
accountant over its rounds) is printed. Per run: final validation accuracy, honest
organisation-rounds flagged (by flag), the largest and smallest share of the rewards, and the
Spearman correlation of each organisation's reward share with its share in the run without DP.
A last run at the middle epsilon has organisation 0 upload Gaussian noise as long as its honest
DP update instead (a free-rider the noise screen cannot tell from DP noise by length): its
share of the rewards against its share when honest.

Usage: python bench/privacy.py [--task digits|breast_cancer] [--rounds 10] [--epsilons 1 3 8]
       [--orgs 10 (digits)] [--threads 1] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedledger.incentive.onchain import flag_names
from fedledger.simulation import TRAIN_CONFIG, noise, run_federation, spearman
from fedledger.tasks import DigitsTask, load_data, load_spec, load_task, load_validation
from fedledger.tasks.base import BaseTask
from fedledger.tasks.privacy import PrivacyLedger
from fedledger.tasks.spec import PrivacySection
from fedledger.tasks.training import TrainConfig

DELTA = 1e-5
MAX_GRAD_NORM = 1.0
BREAST_CANCER = Path(__file__).resolve().parents[1] / "examples" / "breast_cancer"
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")


@dataclass(frozen=True)
class Setting:
    """A task's federation: what ``run_federation`` is given, the organisations' sizes, the
    local training (for the accountant) and the table's first line."""

    federation: dict[str, Any]
    sizes: list[int]
    config: TrainConfig
    title: str


def digits(orgs: int) -> Setting:
    task = DigitsTask()
    sizes = [len(task.partition(k, orgs, alpha=0.5, seed=0)[1]) for k in range(orgs)]
    title = (
        f"digits-10, {orgs} organisations (Dirichlet 0.5; {min(sizes)}-{max(sizes)} records), "
        f"{{rounds}} rounds of {TRAIN_CONFIG.epochs} local epoch (batch "
        f"{TRAIN_CONFIG.batch_size}, lr {TRAIN_CONFIG.lr}), default pricing"
    )
    return Setting({"num_orgs": orgs}, sizes, TRAIN_CONFIG, title)


def breast_cancer(folder: Path) -> Setting:
    """The example's hospitals, their CSV files written into ``folder`` by its make_data.py."""
    subprocess.run(
        [sys.executable, str(BREAST_CANCER / "make_data.py"), str(folder)],
        check=True,
        capture_output=True,
    )
    spec = load_spec(BREAST_CANCER / "spec.toml")
    node, validator = load_task(spec, "node"), load_task(spec, "validator")
    parts = [load_data(node, str(folder / f"{name}.csv")) for name in HOSPITALS]
    validation = load_validation(validator, str(folder / "validation.csv"))
    config = BaseTask(spec).train_config(seed=0)
    sizes = [len(y) for _, y in parts]
    title = (
        f"breast-cancer (examples/breast_cancer), {len(parts)} hospitals ({min(sizes)}-"
        f"{max(sizes)} records; validation {len(validation[1])}), {{rounds}} rounds of "
        f"{config.epochs} local epochs (model {spec.model.plugin}, batch {config.batch_size}, "
        f"lr {config.lr}, momentum {config.momentum}), default pricing, metric {spec.metric}"
    )
    federation = {
        "task": validator,
        "parts": parts,
        "validation": validation,
        "train_config": config,
    }
    return Setting(federation, sizes, config, title)


def noise_for(epsilon: float, num_samples: int, rounds: int, config: TrainConfig) -> float:
    """The noise multiplier that spends ``epsilon`` over the run for ``num_samples`` records."""
    from opacus.accountants.utils import get_noise_multiplier

    batches = math.ceil(num_samples / config.batch_size)
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=DELTA,
            sample_rate=1 / batches,
            steps=rounds * config.epochs * batches,
            accountant="rdp",
        )
    )


def spent(privacy: PrivacySection, num_samples: int, rounds: int, config: TrainConfig) -> float:
    ledger = PrivacyLedger(privacy)
    for round_id in range(1, rounds + 1):
        ledger.charge(round_id, num_samples, epochs=config.epochs, batch_size=config.batch_size)
    return ledger.spent().epsilon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["digits", "breast_cancer"], default="digits")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--orgs", type=int, help="digits only: organisations (10)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds, eps 8 (digits: 4 organisations)"
    )
    parser.add_argument("--json", type=Path, help="also write the table's rows here")
    args = parser.parse_args(argv)
    if args.task == "breast_cancer" and args.orgs is not None:
        parser.error("--orgs is for digits: the breast-cancer example has its three hospitals")
    if args.orgs is None:
        args.orgs = 10
    if args.quick:
        args.orgs, args.rounds, args.epsilons = 4, 2, [8.0]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        setting = digits(args.orgs) if args.task == "digits" else breast_cancer(Path(folder))
        rows = table(setting, args.rounds, args.epsilons)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def table(setting: Setting, rounds: int, epsilons: list[float]) -> list[dict[str, object]]:
    """Run the federations, printing a line each; the rows."""
    rows: list[dict[str, object]] = []
    sizes, config = setting.sizes, setting.config
    orgs = len(sizes)
    print(setting.title.format(rounds=rounds) + f"; DP-SGD clip {MAX_GRAD_NORM}, delta {DELTA:g}")
    header = (
        f"{'target eps':>10} {'sigma':>7} {'eps spent':>15} {'accuracy':>9} "
        f"{'flagged':>8} {'max/min share':>14} {'rho vs no-DP':>12} {'s':>6}  flags"
    )
    print(header)
    baseline: np.ndarray | None = None
    honest_share: dict[float, float] = {}
    runs: list[tuple[float | None, bool]] = [(None, False), *((e, False) for e in epsilons)]
    runs.append((sorted(epsilons)[len(epsilons) // 2], True))
    for target, free_rider in runs:
        started = time.perf_counter()
        privacy = None
        eps_text = "-"
        sigma_text = "-"
        if target is not None:
            sigma = noise_for(target, min(sizes), rounds, config)
            privacy = PrivacySection(
                noise_multiplier=sigma, max_grad_norm=MAX_GRAD_NORM, epsilon=1e9, delta=DELTA
            )
            used = [spent(privacy, n, rounds, config) for n in sizes]
            eps_text = f"{min(used):.2f}-{max(used):.2f}"
            sigma_text = f"{sigma:.3f}"
        attacks = {0: noise} if free_rider else {}
        federation = run_federation(
            **setting.federation, rounds=rounds, privacy=privacy, attacks=attacks
        )
        paid = np.asarray(federation.shares())
        if target is not None and not free_rider:
            honest_share[target] = float(paid[0])
        if baseline is None:
            baseline = paid
        honest = range(1 if free_rider else 0, orgs)
        honest_flags = [r.flags[k] for r in federation.rounds for k in honest]
        flags = Counter(name for f in honest_flags for name in flag_names(f))
        flagged = sum(bool(f) for f in honest_flags)
        total = len(honest_flags)
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
                "free_rider": free_rider,
                "org0_share": float(paid[0]),
            }
        )
        label = "none" if target is None else f"{target:g}" + (" +FR" if free_rider else "")
        print(
            f"{label:>10} {sigma_text:>7} {eps_text:>15} "
            f"{federation.accuracy:>9.1%} {flagged / total:>8.1%} "
            f"{paid.max():>6.1%}/{paid.min():>6.1%} {spearman(paid, baseline):>12.2f} "
            f"{time.perf_counter() - started:>6.0f}  {dict(flags) or '-'}"
        )
        if free_rider and target is not None:
            caught = Counter(name for r in federation.rounds for name in flag_names(r.flags[0]))
            print(
                f"{'':>10} +FR: organisation 0 uploads noise as long as its DP update: paid "
                f"{paid[0]:.1%} of the rewards (honest: {honest_share[target]:.1%}); its "
                f"flags {dict(caught) or '-'}"
            )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())

"""Gas of every ledger call and of a whole round's settlement, on the in-process EVM.

For each K (organisations), a fresh chain: deploy, register K organisations, then three rounds
in which every organisation commits an update:

1. settled directly (``finalizeRound``) while no organisation holds a token yet (cold balances);
   the round is extended once first (``extendRound``);
2. settled directly again (warm balances: each organisation was paid before);
3. settled by claims (``finalizeRoundWithRoot``, then one ``claimReward`` per organisation, with
   warm balances), the way the coordinator settles when more than ``claims_above`` are paid.

Every organisation gets a positive score and reward and no flags. Gas is each receipt's
``gasUsed``; "per round" costs count ``openRound`` and the settlement for the coordinator, and
the K commits (plus the K claims) for the organisations.

Usage: python bench/gas.py [--quick] [--orgs 10 50 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from web3.types import TxReceipt

from fedledger.devnet.embedded import embedded_web3
from fedledger.incentive.chain import devnet_account
from fedledger.incentive.commitment import keccak
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree
from fedledger.incentive.onchain import TOKEN_UNIT, ValuationRecord

FULL_ORGS = (10, 50, 100)
QUICK_ORGS = (3,)
VALUATION = ValuationRecord("exact:accuracy", seed=1, validation_hash=b"\x5a" * 32)
ROUND_S = 3600


@dataclass(frozen=True)
class CallGas:
    """Gas of one kind of ledger call at one K: every receipt's ``gasUsed``."""

    num_orgs: int
    call: str
    gas: list[int]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.gas)


@dataclass(frozen=True)
class Settlement:
    """A whole round's gas at one K under one settlement."""

    num_orgs: int
    settlement: str  # "direct (cold)", "direct", "root + claims"
    coordinator_gas: int  # openRound + finalize
    organisations_gas: int  # K commits (+ K claims)

    @property
    def total_gas(self) -> int:
        return self.coordinator_gas + self.organisations_gas


@dataclass
class GasReport:
    calls: list[CallGas] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)


def _gas(receipt: TxReceipt) -> int:
    return int(receipt["gasUsed"])


def measure(num_orgs: int) -> tuple[list[CallGas], list[Settlement]]:
    """Deploy on a fresh in-process chain and run the three rounds described above."""
    w3 = embedded_web3(num_orgs + 2)
    admin, coordinator = devnet_account(0), devnet_account(1)
    orgs = [devnet_account(2 + i) for i in range(num_orgs)]
    ledger, deploy_receipt = LedgerClient.deploy(
        w3, admin, coordinator.address, round_budget=2**256 - 1, task_spec=b"\x01" * 32
    )  # the settlement gas, not the budget, is measured
    as_coordinator = ledger.with_account(coordinator)
    as_org = [ledger.with_account(o) for o in orgs]
    gas: dict[str, list[int]] = {"deploy (ledger + token)": [_gas(deploy_receipt)]}

    def record(call: str, receipt: TxReceipt) -> int:
        used = _gas(receipt)
        gas.setdefault(call, []).append(used)
        return used

    for org in orgs:
        record("registerOrganisation", ledger.register_organisation(org.address))

    rewards = [(k + 1) * TOKEN_UNIT for k in range(num_orgs)]
    scores = [(k + 1) * 10**16 for k in range(num_orgs)]
    settlements: list[Settlement] = []
    for round_id, mode in enumerate(("direct (cold)", "direct", "root + claims"), start=1):
        now = int(w3.eth.get_block("latest")["timestamp"])
        model_hash = keccak(f"model {round_id}".encode())
        coordinator_gas = record(
            "openRound", as_coordinator.open_round(round_id, model_hash, now + ROUND_S)
        )
        if round_id == 1:
            coordinator_gas += record(
                "extendRound", as_coordinator.extend_round(round_id, now + 2 * ROUND_S)
            )
        organisations_gas = 0
        for k, client in enumerate(as_org):
            update_hash = keccak(f"update {round_id} {k}".encode())
            organisations_gas += record(
                "commitUpdate", client.commit_update(round_id, update_hash, 100 + k)
            )
        new_hash = keccak(f"model {round_id + 1}".encode())
        addresses = [o.address for o in orgs]
        if mode.startswith("direct"):
            call = "finalizeRound" + (" (first payout)" if mode == "direct (cold)" else "")
            coordinator_gas += record(
                call,
                as_coordinator.finalize_round(
                    round_id, new_hash, addresses, scores, rewards, valuation=VALUATION
                ),
            )
        else:
            tree = SettlementTree.build(
                [
                    SettlementLeaf(round_id, a, s, r, 0)
                    for a, s, r in zip(addresses, scores, rewards, strict=True)
                ]
            )
            coordinator_gas += record(
                "finalizeRoundWithRoot",
                as_coordinator.finalize_round_with_root(
                    round_id,
                    new_hash,
                    tree.root,
                    tree.total_reward,
                    num_orgs,
                    valuation=VALUATION,
                ),
            )
            for client, address in zip(as_org, addresses, strict=True):
                leaf = tree.leaf_of(address)
                organisations_gas += record(
                    "claimReward",
                    client.claim_reward(
                        round_id, leaf.score, leaf.reward, leaf.flags, tree.proof(address)
                    ),
                )
        settlements.append(Settlement(num_orgs, mode, coordinator_gas, organisations_gas))
    calls = [CallGas(num_orgs, call, used) for call, used in gas.items()]
    return calls, settlements


def collect(org_counts: Sequence[int]) -> GasReport:
    report = GasReport()
    for num_orgs in org_counts:
        started = time.perf_counter()
        calls, settlements = measure(num_orgs)
        report.calls.extend(calls)
        report.settlements.extend(settlements)
        report.seconds[num_orgs] = time.perf_counter() - started
    return report


def print_report(report: GasReport, org_counts: Sequence[int]) -> None:
    names = list(dict.fromkeys(c.call for c in report.calls))
    by_key = {(c.num_orgs, c.call): c for c in report.calls}
    header = f"{'call (mean gas; min-max)':<34}" + "".join(
        f"{'K=' + str(k):>26}" for k in org_counts
    )
    print(header)
    print("-" * len(header))
    for name in names:
        cells = []
        for k in org_counts:
            c = by_key.get((k, name))
            if c is None:
                cells.append(f"{'-':>26}")
            elif min(c.gas) == max(c.gas):
                cells.append(f"{c.gas[0]:>26,}")
            else:
                cells.append(f"{f'{c.mean:,.0f} ({min(c.gas):,}-{max(c.gas):,})':>26}")
        print(f"{name:<34}" + "".join(cells))
    print()
    header = (
        f"{'K':>4} {'settlement':<15} {'coordinator':>12} {'organisations':>14} {'total':>12} "
        f"{'per org':>9} {'coord. per org':>15}"
    )
    print("whole round (openRound + commits + settlement; extendRound in the cold round)")
    print(header)
    print("-" * len(header))
    for s in report.settlements:
        print(
            f"{s.num_orgs:>4} {s.settlement:<15} {s.coordinator_gas:>12,} "
            f"{s.organisations_gas:>14,} {s.total_gas:>12,} {s.total_gas / s.num_orgs:>9,.0f} "
            f"{s.coordinator_gas / s.num_orgs:>15,.0f}"
        )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 3 only: a smoke run")
    parser.add_argument("--orgs", type=int, nargs="+", default=list(FULL_ORGS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(list(argv))
    org_counts = list(QUICK_ORGS if args.quick else args.orgs)
    print("command: python bench/gas.py " + " ".join(shlex.quote(a) for a in argv))
    print(
        "in-process EVM (eth-tester + py-evm, Prague rules), ledger and token as compiled in "
        "contracts/build; gas = receipt gasUsed\n"
    )
    report = collect(org_counts)
    print_report(report, org_counts)
    print(
        "\nwall time per K (py-evm): "
        + ", ".join(f"K={k}: {s:.1f} s" for k, s in report.seconds.items())
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "calls": [
                        {"num_orgs": c.num_orgs, "call": c.call, "gas": c.gas, "mean": c.mean}
                        for c in report.calls
                    ],
                    "settlements": [
                        {**asdict(s), "total_gas": s.total_gas} for s in report.settlements
                    ],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

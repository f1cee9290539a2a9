"""Run fedledger's benchmarks: every one in turn, or those named.

Each benchmark is a script in this folder with ``main(argv) -> int``; ``--quick`` is passed on
to each (a smoke run of seconds), and arguments after ``--`` go to a single named benchmark.

Usage: python bench/run.py [digits10|aggregation|gas|scale|robust|shapley|fairness|privacy|
       compression|stall|txpath ...]
       [--quick] [-- ARGS]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = {
    "digits10": "digits-10 end to end: the floor, Flower (legacy and deployment runtimes), fedledger",
    "aggregation": "FedAvg throughput against memory bandwidth, torch.stack and Flower",
    "gas": "gas of every ledger call and of a round's settlement for K = 10, 50, 100",
    "scale": "one round with 100 organisations and a 1e6-parameter model",
    "robust": "attacks on the model and the rewards, priced as the coordinator prices a round",
    "shapley": "sampled Shapley valuators against exact: rank correlation, evaluations, time",
    "fairness": "each organisation's total reward against its Shapley value by retraining",
    "privacy": "DP-SGD at epsilon 1, 3, 8 against none: accuracy, flags and reward shares",
    "compression": "int8 and top-k updates against float32: bytes, accuracy, flags",
    "stall": "honest upload latency while 0, 50, 200 hostile clients poll, drip and flood",
    "txpath": "a transaction's time and JSON-RPC calls on anvil against web3's defaults",
}


def load(name: str) -> ModuleType:
    """The benchmark script ``bench/<name>.py`` as a module."""
    path = BENCH_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fedledger_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        epilog="benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="default: all of them")
    parser.add_argument("--quick", action="store_true", help="a smoke run of each, in seconds")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    if extra and len(names) != 1:
        parser.error("arguments after -- need exactly one benchmark named")
    codes: dict[str, int] = {}
    for name in names:
        print(f"=== {name}: {BENCHMARKS[name]}", flush=True)
        started = time.perf_counter()
        bench_main: Callable[[Sequence[str]], int] = load(name).main
        codes[name] = bench_main([*(["--quick"] if args.quick else []), *extra])
        print(f"=== {name}: exit {codes[name]} in {time.perf_counter() - started:.1f} s\n")
    failed = [n for n, c in codes.items() if c != 0]
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""FedAvg throughput: fedledger's aggregation against a memory-bandwidth ceiling, torch and Flower.

K updates of P float32 parameters each (four tensors per update, like a two-layer model) are
averaged by:

- ``fedledger fedavg``: ``fedledger.coordinator.aggregation.fedavg``, the weighted sum itself;
- ``fedledger aggregate``: ``aggregate("fedavg", ...)`` from the same module, the entry point
  the coordinator's books call (the books measure the norms once, before; it takes none);
- ``blocked``: the same weighted sum computed in cache-sized blocks of the parameter vector (a
  reference for what the accumulation order alone is worth; not fedledger code);
- ``torch.stack``: ``torch.stack(updates).mean(0)`` per tensor, the one-liner baseline;
- ``flwr``: Flower's ``flwr.server.strategy.aggregate.aggregate`` on NumPy arrays (when the
  ``bench`` extra is installed).

Every update has the same sample count, so every method computes the same average (checked).
The ceiling is a plain copy of the same bytes (``dst.copy_(src)``, tensor by tensor) measured
in the same run: throughput is reported as GB/s of update bytes read, K * P * 4 / seconds, and
as a share of the copy's. A copy also writes what it reads, so a reduction that keeps its
accumulator in cache can pass it; a read-only pass (``tensor.sum()`` of every update) is shown
as a second reference. Each figure is the fastest of ``--repeats`` runs after one warm-up.
On CUDA (``--device cuda``) the updates live on the device and the ceiling is a device copy.

One torch thread by default: the ceiling is measured with the same threads, so the shares hold
for any count, and on a small machine shared with other work two OpenMP threads spend most of
their time waiting for each other (measured here: a 40 MB copy at 0.3 GB/s with two threads
while another process kept one core busy, 7-11 GB/s with one).

Usage: python bench/aggregation.py [--quick] [--repeats 3] [--threads 1] [--device cpu]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from fedledger.coordinator.aggregation import aggregate, fedavg

FULL_CASES = ((10, 1_000_000), (10, 10_000_000), (100, 1_000_000), (100, 10_000_000))
QUICK_CASES = ((10, 100_000), (20, 200_000))
BLOCK = 1 << 18  # floats per block in the blocked reference: 1 MiB, about one core's L2
MEMORY_HEADROOM = 0.8  # use at most this share of the available memory


@dataclass(frozen=True)
class Row:
    """One method on one case."""

    num_updates: int
    num_params: int
    method: str
    seconds: float | None  # None when the method was skipped
    gb_per_s: float | None  # update bytes read per second, 1e9 bytes
    share_of_ceiling: float | None
    speedup_vs_flwr: float | None
    max_abs_error: float | None  # against a float64 reference average
    note: str = ""


def flwr_aggregate() -> Callable[..., list[object]] | None:
    """Flower's weighted average, or None without the ``bench`` extra."""
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError:
        return None
    return aggregate  # type: ignore[no-any-return]


def layout(num_params: int) -> dict[str, int]:
    """Four tensors adding up to ``num_params``: two weights and two biases."""
    bias0, bias1 = min(1024, num_params // 8), min(16, num_params // 64)
    weight0 = (num_params - bias0 - bias1) * 3 // 4
    return {
        "layer0.weight": weight0,
        "layer0.bias": bias0,
        "layer1.weight": num_params - weight0 - bias0 - bias1,
        "layer1.bias": bias1,
    }


def make_updates(
    num_updates: int, num_params: int, device: torch.device, seed: int = 0
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """A zero base model and ``num_updates`` distinct updates (scaled copies of one draw)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = layout(num_params)
    draw = {n: torch.randn(s, generator=generator).to(device) for n, s in sizes.items()}
    base = {n: torch.zeros(s, device=device) for n, s in sizes.items()}
    updates = [
        {n: t * (1.0 + k / num_updates) for n, t in draw.items()} for k in range(num_updates)
    ]
    return base, updates


def available_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device`` (MemAvailable on the host)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """The fastest of ``repeats`` timed calls after one warm-up, and the last result."""
    result = fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        del result
        gc.collect()
        started = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best, result


def copy_all(updates: Sequence[Mapping[str, Tensor]], out: list[dict[str, Tensor]]) -> None:
    for update, target in zip(updates, out, strict=True):
        for name, tensor in update.items():
            target[name].copy_(tensor)


def blocked_fedavg(
    base: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    num_samples: Sequence[int],
    block: int = BLOCK,
) -> dict[str, Tensor]:
    """w + sum_k (n_k / n) delta_k, one block of each tensor at a time, so the accumulator stays
    in cache while the K updates stream through it (the same sum, read once from memory)."""
    total = sum(num_samples)
    weights = [n / total for n in num_samples]
    out: dict[str, Tensor] = {}
    for name in sorted(base):
        acc = base[name].detach().clone().reshape(-1)
        flats = [u[name].detach().reshape(-1) for u in updates]
        for start in range(0, acc.numel(), block):
            piece = acc[start : start + block]
            for flat, weight in zip(flats, weights, strict=True):
                piece.add_(flat[start : start + block], alpha=weight)
        out[name] = acc.reshape(base[name].shape)
    return out


def stack_mean(updates: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {name: torch.stack([u[name] for u in updates]).mean(0) for name in updates[0]}


def reference(updates: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The plain average in float64, on the CPU: what every method should return."""
    out: dict[str, Tensor] = {}
    for name in updates[0]:
        acc = torch.zeros(updates[0][name].shape, dtype=torch.float64)
        for u in updates:
            acc.add_(u[name].detach().to("cpu", torch.float64))
        out[name] = acc / len(updates)
    return out


def max_error(result: Mapping[str, object], expected: Mapping[str, Tensor]) -> float:
    worst = 0.0
    for name, want in expected.items():
        got = torch.as_tensor(result[name]).detach().to("cpu", torch.float64)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def run_case(num_updates: int, num_params: int, *, repeats: int, device: torch.device) -> list[Row]:
    """Every method on K = ``num_updates`` updates of P = ``num_params`` parameters."""
    update_bytes = num_updates * num_params * 4
    # The updates, one copy of them (copy target, stacked or Flower's weighted copies), slack.
    needed = int(2.3 * update_bytes)
    budget = int(MEMORY_HEADROOM * available_bytes(device))
    if needed > budget:
        note = f"skipped: needs ~{needed / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB available"
        return [_absent(num_updates, num_params, "all", note)]
    base, updates = make_updates(num_updates, num_params, device)
    rows = _measure(base, updates, repeats=repeats, device=device)
    del base, updates
    gc.collect()
    ceiling_s = rows[0].seconds
    flwr_s = next((r.seconds for r in rows if r.method == "flwr aggregate" and r.seconds), None)
    return [
        replace(
            r,
            share_of_ceiling=ceiling_s / r.seconds if ceiling_s and r.seconds else None,
            speedup_vs_flwr=flwr_s / r.seconds if flwr_s and r.seconds else None,
        )
        for r in rows
    ]


def _absent(num_updates: int, num_params: int, method: str, note: str) -> Row:
    return Row(num_updates, num_params, method, None, None, None, None, None, note)


def _measure(
    base: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    *,
    repeats: int,
    device: torch.device,
) -> list[Row]:
    """The copy ceiling first, then every method; shares and ratios are filled in by the caller."""
    num_updates, num_params = len(updates), sum(t.numel() for t in updates[0].values())
    update_bytes = num_updates * num_params * 4
    num_samples = [100] * num_updates
    expected = reference(updates) if update_bytes <= 2**31 else None

    def timed(method: str, fn: Callable[[], object], note: str = "") -> Row:
        seconds, result = best_time(fn, repeats, device)
        error = (
            max_error(result, expected)
            if isinstance(result, Mapping) and expected is not None
            else None
        )
        del result
        gc.collect()
        return Row(
            num_updates,
            num_params,
            method,
            seconds,
            update_bytes / seconds / 1e9,
            None,
            None,
            error,
            note,
        )

    def copy_ceiling() -> None:
        target = [{n: torch.empty_like(t) for n, t in u.items()} for u in updates]
        started = time.perf_counter()
        copy_all(updates, target)
        _sync(device)
        timings.append(time.perf_counter() - started)

    timings: list[float] = []
    for _ in range(repeats + 1):  # the allocation stays outside the timed copy
        copy_ceiling()
        gc.collect()
    best = min(timings[1:] or timings)
    rows = [
        Row(
            num_updates,
            num_params,
            "copy (ceiling)",
            best,
            update_bytes / best / 1e9,
            None,
            None,
            None,
            "dst.copy_(src) of the update bytes",
        ),
        timed(
            "read-only (sum)",
            lambda: [t.sum() for u in updates for t in u.values()],
            "tensor.sum() of the update bytes",
        ),
        timed("fedledger fedavg", lambda: fedavg(base, updates, num_samples, device=device)),
        timed(
            "fedledger aggregate",
            lambda: aggregate("fedavg", base, updates, num_samples, device=device),
            "the books' entry point (rule dispatch + checks)",
        ),
        timed(
            "blocked (reference)",
            lambda: blocked_fedavg(base, updates, num_samples),
            f"{BLOCK} floats a block",
        ),
        timed("torch.stack(...).mean(0)", lambda: stack_mean(updates)),
    ]
    flwr_agg = flwr_aggregate()
    if flwr_agg is None:
        rows.append(_absent(num_updates, num_params, "flwr aggregate", "flwr not installed"))
    elif device.type != "cpu":
        rows.append(_absent(num_updates, num_params, "flwr aggregate", "NumPy: CPU only"))
    else:
        names = sorted(base)
        results = [
            ([u[n].numpy() for n in names], n_k)
            for u, n_k in zip(updates, num_samples, strict=True)
        ]
        rows.append(
            timed(
                "flwr aggregate",
                lambda: dict(zip(names, flwr_agg(results), strict=True)),
            )
        )
    return rows


def collect(cases: Sequence[tuple[int, int]], *, repeats: int, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    for num_updates, num_params in cases:
        case_rows = run_case(num_updates, num_params, repeats=repeats, device=device)
        print_rows(case_rows)
        rows.extend(case_rows)
    return rows


HEADER = (
    f"{'K':>4} {'P':>11} {'method':<26} {'seconds':>9} {'GB/s':>7} {'of ceiling':>10} "
    f"{'vs flwr':>8} {'max |err|':>10}  note"
)


def print_rows(rows: Sequence[Row]) -> None:
    def fmt(value: float | None, spec: str, width: int) -> str:
        return f"{value:{spec}}".rjust(width) if value is not None else "-".rjust(width)

    for r in rows:
        print(
            f"{r.num_updates:>4} {r.num_params:>11,} {r.method:<26} {fmt(r.seconds, '.4f', 9)} "
            f"{fmt(r.gb_per_s, '.2f', 7)} {fmt(r.share_of_ceiling, '.0%', 10)} "
            f"{fmt(r.speedup_vs_flwr, '.1f', 7)}{'x' if r.speedup_vs_flwr else ' '} "
            f"{fmt(r.max_abs_error, '.1e', 10)}  {r.note}",
            flush=True,
        )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases, one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the updates then live on the device)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, like NumPy's add; see the module doc)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(list(argv))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu")
        return 2
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = 1 if args.quick else args.repeats
    flwr_agg = flwr_aggregate()
    print("command: python bench/aggregation.py " + " ".join(shlex.quote(a) for a in argv))
    print(
        f"torch {torch.__version__} on {device} ({torch.get_num_threads()} thread(s)); "
        f"flwr {_flwr_version() if flwr_agg else 'not installed'}; best of {repeats} after a "
        f"warm-up; GB/s = K*P*4 bytes read / s; ceiling = copy of the same bytes\n"
    )
    print(HEADER)
    print("-" * len(HEADER))
    rows = collect(cases, repeats=repeats, device=device)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

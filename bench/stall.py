"""Honest uploads while hostile clients poll, drip and flood: can anyone stall the coordinator?

anvil with the honest organisations registered; ``fedledger coordinator serve`` in its own
process with its default limits; every honest organisation commits its update on-chain, so
that the commit phase is over and round 1 takes uploads. Then for each level N (0, 50, 200
hostile clients) a separate process runs N hostile clients on loopback, a third each of:

- **pollers**: long polls (``GET /v1/rounds/current?...&wait_s=30``), each from its own
  loopback address (127.1.x.y), re-polling as soon as one is answered (``Retry-After`` obeyed);
- **drippers**: a request line, then one header byte a second (slowloris), reconnecting when
  the server closes the connection;
- **flooders**: back to back, with no pause, unsigned 1 MiB uploads, ``GET /v1/rounds/1`` and
  ``GET /v1/rounds/current``, reconnecting when the server closes the connection.

While they run, this process makes ``--uploads`` honest uploads one after the other (each a
signed, committed update of the digits MLP from a fresh connection, as a node sends it) and as
many ``GET /v1/health`` calls, and reports their latency: p50, p99 (nearest rank) and max.
N = 0 is the peer: the same uploads with nobody hostile. Bounded: at most N clients, each with
one connection at a time, for at most ``--seconds`` a level; loopback only.

Usage: python bench/stall.py [--quick] [--levels 0,50,200] [--uploads 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
LEVELS = (0, 50, 200)
QUICK_LEVELS = (0, 6)
UPLOADS, QUICK_UPLOADS = 100, 5
KINDS = ("pollers", "drippers", "flooders")
FLOOD_BODY = b"\0" * 2**20
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------ the hostile clients


def source_address(i: int) -> str:
    """Hostile client ``i``'s own loopback address: the coordinator caps long polls per client
    address, so distinct clients come from distinct addresses (all of 127/8 is loopback)."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 response's status and headers; its body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split(" ")[1]), headers


class Hostile:
    """N hostile clients of one coordinator; ``stats[kind]`` counts what each kind got."""

    def __init__(self, host: str, port: int, counts: dict[str, int]) -> None:
        self.host, self.port, self.counts = host, port, counts
        self.stats: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
        self.stop = asyncio.Event()

    async def connect(self, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            self.host, self.port, local_addr=(source_address(i), 0)
        )

    async def run(self, seconds: float) -> None:
        tasks, i = [], 0
        for kind in KINDS:
            for _ in range(self.counts[kind]):
                tasks.append(asyncio.create_task(self.client(kind, i)))
                i += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        self.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def client(self, kind: str, i: int) -> None:
        behave = {"pollers": self.poll, "drippers": self.drip, "flooders": self.flood}[kind]
        counter = self.stats[kind]
        while not self.stop.is_set():
            writer = None
            try:
                reader, writer = await self.connect(i)
                counter["connections"] += 1
                await behave(reader, writer, counter)
                counter["closed by the server"] += 1
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                counter[f"connection ended: {type(exc).__name__}"] += 1
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(0.01)

    async def poll(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Counter[str]) -> None:  # fmt: skip
        request = (
            b"GET /v1/rounds/current?after_round=1&after_status=open&wait_s=30 HTTP/1.1\r\n"
            b"Host: coordinator\r\n\r\n"
        )
        while True:
            writer.write(request)
            status, headers = await read_response(reader)
            counter[f"HTTP {status}"] += 1
            if status == 429:
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            if headers.get("connection") == "close":
                return

    async def drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Counter[str]) -> None:  # fmt: skip
        writer.write(b"POST /v1/rounds/1/updates HTTP/1.1\r\nHost: coordinator\r\nX-Drip: ")
        while True:
            try:
                if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                    return  # the server closed the connection
                counter["answered"] += 1
            except TimeoutError:
                writer.write(b"x")
                counter["bytes dripped"] += 1

    async def flood(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Counter[str]) -> None:  # fmt: skip
        requests = [  # the refused upload last: the server closes the connection after it
            b"GET /v1/rounds/1 HTTP/1.1\r\nHost: coordinator\r\n\r\n",
            b"GET /v1/rounds/current HTTP/1.1\r\nHost: coordinator\r\n\r\n",
            b"POST /v1/rounds/1/updates HTTP/1.1\r\nHost: coordinator\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(FLOOD_BODY),
        ]
        n = 0
        while True:
            request = requests[n % len(requests)]
            n += 1
            writer.write(request)
            if request.startswith(b"POST"):
                writer.write(FLOOD_BODY)  # sent whether or not the server reads it
            status, headers = await read_response(reader)
            counter[f"HTTP {status}"] += 1
            if headers.get("connection") == "close":
                return


def hostile_main(argv: Sequence[str]) -> int:
    """The hostile process: ``--url``, the count of each kind, ``--seconds``; prints ``ready``
    once its clients are started, and its counts as JSON when stopped (SIGTERM) or timed out."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    for kind in KINDS:
        parser.add_argument(f"--{kind}", type=int, default=0)
    args = parser.parse_args(argv)

    async def main() -> dict[str, Counter[str]]:
        hostile = Hostile(args.host, args.port, {kind: getattr(args, kind) for kind in KINDS})
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, hostile.stop.set)
        print("ready", flush=True)
        await hostile.run(args.seconds)
        return hostile.stats

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


# ------------------------------------------------------------------ the honest side


@dataclass
class Level:
    hostile: int
    counts: dict[str, int]
    upload_ms: list[float] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    upload_status: dict[str, int] = field(default_factory=dict)
    hostile_stats: dict[str, dict[str, int]] = field(default_factory=dict)
    coordinator_rss_mib: float = 0.0
    coordinator_threads: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (with 100 values, p99 is the second largest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def split(n: int) -> dict[str, int]:
    counts = {kind: n // len(KINDS) for kind in KINDS}
    counts[KINDS[0]] += n - sum(counts.values())
    return counts


def _proc_status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return 0.0


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV, **env},
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class SignedUpload:
    body: bytes
    headers: dict[str, str]


def prepare_uploads(w3: Any, deployment: Any, count: int) -> list[SignedUpload]:
    """``count`` honest organisations' updates for round 1, committed on-chain and signed."""
    import torch

    from fedledger import wire
    from fedledger.incentive.chain import devnet_account
    from fedledger.incentive.commitment import encode_tensors
    from fedledger.incentive.ledger import LedgerClient
    from fedledger.incentive.signing import UploadAuthorization, sign_upload
    from fedledger.tasks import load_spec, load_task

    params = load_task(load_spec(), "node").build_model(seed=0).state_dict()
    ledger = LedgerClient(w3, deployment.ledger, devnet_account(1))
    chain_id = ledger.chain_id()
    uploads = []
    for k in range(count):
        account = devnet_account(2 + k)
        generator = torch.Generator().manual_seed(k)
        delta = {n: torch.randn(t.shape, generator=generator) * 0.01 for n, t in params.items()}
        body, digest = encode_tensors(delta)
        ledger.with_account(account).commit_update(1, digest, 100)
        auth = UploadAuthorization(
            organisation=account.address,
            round_id=1,
            update_hash=digest,
            num_samples=100,
            nonce=UploadAuthorization.new_nonce(),
            expiry=int(time.time()) + 3000,
        )
        signature = sign_upload(account, auth, chain_id=chain_id, ledger=ledger.address)
        uploads.append(SignedUpload(body, wire.upload_headers(auth, signature)))
    return uploads


def measure(url: str, uploads: Sequence[SignedUpload], level: Level) -> None:
    """Each upload from a fresh connection, a health check after it; their latencies."""
    import httpx

    status: Counter[str] = Counter()
    # One client (its set-up is not the server's time), no connection kept between requests.
    client = httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0))
    for upload in uploads:
        headers = {**upload.headers, "Content-Type": "application/octet-stream"}
        started = time.perf_counter()
        try:
            response = client.post(f"{url}/v1/rounds/1/updates", content=upload.body, headers=headers)  # fmt: skip
            status[str(response.status_code)] += 1
        except httpx.HTTPError as exc:
            status[type(exc).__name__] += 1
        level.upload_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        try:
            client.get(f"{url}/v1/health")
        except httpx.HTTPError as exc:
            status[f"health {type(exc).__name__}"] += 1
        level.health_ms.append((time.perf_counter() - started) * 1000)
    client.close()
    level.upload_status = dict(status)


def run(levels: Sequence[int], per_level: int, workdir: Path, *, seconds: float) -> list[Level]:
    import httpx

    from fedledger.devnet.anvil import free_port, start_anvil
    from fedledger.devnet.deploy import deploy_devnet
    from fedledger.incentive.chain import connect

    # One organisation more than upload: it commits and never uploads, so the round stays open.
    num_orgs = per_level * len(levels) + 1
    anvil = start_anvil(accounts=num_orgs + 2)
    try:
        w3 = connect(anvil.rpc_url)
        deployment = deploy_devnet(w3, num_orgs, rpc_url=anvil.rpc_url)
        deployment_file = workdir / "deployment.json"
        deployment.save(deployment_file)
        assert deployment.accounts is not None
        key = deployment.accounts.coordinator.private_key
        assert key is not None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = workdir / "coordinator.log"
        cmd = [
            sys.executable, "-m", "fedledger", "coordinator", "serve",
            "--deployment", str(deployment_file), "--data-dir", str(workdir / "coordinator"),
            "--port", str(port), "--rounds", "1", "--round-timeout", "3600",
        ]  # fmt: skip
        with _process(cmd, log, FEDLEDGER_KEY=key) as coordinator:
            deadline = time.monotonic() + 120
            while True:
                if coordinator.poll() is not None:
                    raise RuntimeError(f"the coordinator exited:\n{_tail(log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/v1/rounds/current", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the coordinator did not open round 1:\n{_tail(log)}")
                time.sleep(0.2)
            from fedledger.incentive.chain import devnet_account
            from fedledger.incentive.commitment import keccak
            from fedledger.incentive.ledger import LedgerClient

            uploads = prepare_uploads(w3, deployment, num_orgs - 1)
            spare = LedgerClient(w3, deployment.ledger, devnet_account(2 + num_orgs - 1))
            spare.commit_update(1, keccak(b"never uploaded"), 1)  # the commit phase ends
            results = []
            for i, n in enumerate(levels):
                level = Level(n, split(n))
                hostile_cmd = [
                    sys.executable, str(SCRIPT), "--role", "hostile", "--host", "127.0.0.1",
                    "--port", str(port), "--seconds", str(seconds),
                    *(f"--{kind}={count}" for kind, count in level.counts.items()),
                ]  # fmt: skip
                proc = subprocess.Popen(
                    hostile_cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **CHILD_ENV}
                )
                try:
                    assert proc.stdout is not None
                    if proc.stdout.readline().strip() != "ready":
                        raise RuntimeError("the hostile clients did not start")
                    time.sleep(min(3.0, seconds / 4) if n else 0)  # they connect, polls are held
                    measure(url, uploads[i * per_level : (i + 1) * per_level], level)
                    level.coordinator_rss_mib = _proc_status(coordinator.pid, "VmRSS") / 1024
                    level.coordinator_threads = int(_proc_status(coordinator.pid, "Threads"))
                finally:
                    proc.terminate()
                    out, _ = proc.communicate(timeout=60)
                level.hostile_stats = json.loads(out.strip().splitlines()[-1])
                results.append(level)
            if coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited:\n{_tail(log)}")
            tracebacks = log.read_text(errors="replace").count("Traceback")
            if tracebacks:
                raise RuntimeError(f"the coordinator logged {tracebacks} tracebacks:\n{_tail(log)}")
    finally:
        anvil.stop()
    return results


def print_levels(levels: Sequence[Level]) -> None:
    print(
        f"{'hostile':>7} {'poll/drip/flood':>15} {'uploads':>8} {'upload ms p50':>13} "
        f"{'p99':>7} {'max':>7} {'health ms p50':>13} {'p99':>7} {'RSS MiB':>8} {'threads':>7}"
    )
    for lv in levels:
        ok = lv.upload_status.get("201", 0)
        mix = "/".join(str(lv.counts[k]) for k in KINDS)
        print(
            f"{lv.hostile:>7} {mix:>15} {f'{ok}/{len(lv.upload_ms)}':>8} "
            f"{percentile(lv.upload_ms, 50):>13.1f} {percentile(lv.upload_ms, 99):>7.1f} "
            f"{max(lv.upload_ms):>7.1f} {percentile(lv.health_ms, 50):>13.1f} "
            f"{percentile(lv.health_ms, 99):>7.1f} {lv.coordinator_rss_mib:>8.0f} "
            f"{lv.coordinator_threads:>7}"
        )
    print()
    print("what the hostile clients got (counts over the level):")
    for lv in levels:
        for kind in KINDS:
            got = lv.hostile_stats.get(kind) or {}
            if got:
                shown = ", ".join(f"{k} {v}" for k, v in sorted(got.items()))
                print(f"  N={lv.hostile:<4} {kind:<9} {shown}")
    others = {k: v for lv in levels for k, v in lv.upload_status.items() if k != "201"}
    if others:
        print(f"honest uploads not accepted: {others}")


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:2] == ["--role", "hostile"]:
        return hostile_main(argv[2:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"levels {QUICK_LEVELS}, {QUICK_UPLOADS} uploads")  # fmt: skip
    parser.add_argument("--levels", help="hostile clients at each level (default 0,50,200)")
    parser.add_argument("--uploads", type=int, help=f"honest uploads a level (default {UPLOADS})")
    parser.add_argument("--seconds", type=float, default=120.0, help="longest a level runs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    levels = (
        [int(n) for n in args.levels.split(",")]
        if args.levels
        else list(QUICK_LEVELS if args.quick else LEVELS)
    )
    per_level = args.uploads or (QUICK_UPLOADS if args.quick else UPLOADS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedledger-stall-") as tmp:
        results = run(levels, per_level, Path(tmp), seconds=args.seconds)
    print_levels(results)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        rows = [
            asdict(lv)
            | {
                "upload_p50_ms": percentile(lv.upload_ms, 50),
                "upload_p99_ms": percentile(lv.upload_ms, 99),
                "health_p99_ms": percentile(lv.health_ms, 99),
            }
            for lv in results
        ]
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

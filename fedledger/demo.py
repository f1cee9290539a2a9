"""The one-command demo: a devnet chain, the coordinator on a loopback port, N organisation nodes."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from web3 import Web3

from fedledger import wire
from fedledger.coordinator.api import create_app
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.policy import PricingPolicy
from fedledger.coordinator.server import server_config
from fedledger.coordinator.service import RoundService
from fedledger.devnet.anvil import free_port, start_anvil
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect, devnet_account
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import TOKEN_UNIT
from fedledger.node.client import CoordinatorClient
from fedledger.node.runner import NodeRunner
from fedledger.report import read_metrics, write_report
from fedledger.runlog import LedgerLog, read_ledger
from fedledger.tasks import DigitsTask, load_spec

DEFAULT_REPORT_DIR = Path(".fedledger") / "demo-report"
"""Where the demo writes its report (``fedledger report``'s charts and summary.md)."""


@dataclass(frozen=True)
class OrganisationSummary:
    address: str
    num_samples: int | None  # the sample count it committed last, read from the contract
    value: float  # summed Shapley value over rounds, read from the contract
    reward: int  # summed token units over rounds, read from the contract
    balance: int  # token balance, read from the contract


@dataclass
class DemoResult:
    accuracies: list[float] = field(default_factory=list)
    organisations: list[OrganisationSummary] = field(default_factory=list)
    wall_time_s: float = 0.0
    ledger: str = ""
    report: Path | None = None  # the report's summary.md, the charts beside it


@contextmanager
def serve_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", port: int | None = None
) -> Iterator[str]:
    """Run a uvicorn server for ``app`` in a thread; yields its base URL."""
    port = port or free_port(host)
    server = uvicorn.Server(server_config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run_demo(
    *,
    organisations: int = 5,
    rounds: int = 10,
    chain: str = "embedded",
    spec: Path | None = None,
    seed: int = 0,
    console: Console | None = None,
    report_dir: Path | None = DEFAULT_REPORT_DIR,
) -> DemoResult:
    """Run a whole federation on a local chain and return accuracies and on-chain rewards.

    ``spec`` is a spec file of the digits task (default: the built-in one), whose split of the
    training part among the organisations the nodes train on; ``seed`` seeds the initial model
    and local training. The run's report goes to ``report_dir`` (None: none is written)."""
    console = console or Console()
    started = time.monotonic()
    torch.set_num_threads(1)  # N nodes and the coordinator share the cores: no oversubscription
    logging.getLogger("fedledger").setLevel(logging.ERROR)
    task = DigitsTask(load_spec(spec))
    accounts = organisations + 2

    anvil = start_anvil(accounts=accounts) if chain == "anvil" else None
    try:
        if anvil is not None:

            def make_w3() -> Web3:
                return connect(anvil.rpc_url)

        else:
            from fedledger.devnet.embedded import embedded_web3  # py-evm: 0.3 s to import

            shared = embedded_web3(accounts)

            def make_w3() -> Web3:
                return shared

        w3 = make_w3()
        deployment = deploy_devnet(
            w3,
            organisations,
            rpc_url=anvil.rpc_url if anvil else None,
            task_spec=task.spec.hash,
        )
        console.print(
            f"[bold]fedledger demo[/]: {organisations} organisations, {rounds} rounds, "
            f"chain {chain} (id {deployment.chain_id}), ledger {deployment.ledger}"
        )
        with tempfile.TemporaryDirectory(prefix="fedledger-demo-") as data_dir:
            settings = CoordinatorSettings(
                data_dir=Path(data_dir),
                task_spec=task.spec.source,
                total_rounds=rounds,
                round_timeout_s=120,
                quorum=max(1, (organisations + 1) // 2),
                pricing=PricingPolicy(model_seed=seed),
            )
            service = RoundService(
                settings, LedgerClient(make_w3(), deployment.ledger, devnet_account(1))
            )
            with serve_in_thread(create_app(service, manage_service=True)) as url:
                result = _run_nodes(
                    url,
                    make_w3,
                    deployment.ledger,
                    task,
                    organisations,
                    rounds,
                    seed,
                    console,
                )
                log = read_ledger(LedgerClient(make_w3(), deployment.ledger))
                if report_dir is not None:  # while the coordinator still serves the metrics
                    result.report = _write_report(report_dir, log, url)
        result.ledger = deployment.ledger
        result.organisations = _summarise(log)
    finally:
        if anvil is not None:
            anvil.stop()
    result.wall_time_s = time.monotonic() - started
    _print_summary(console, result)
    if result.report is not None:
        console.print(f"report (charts and summary) written to {result.report}", soft_wrap=True)
    return result


def _write_report(out: Path, log: LedgerLog, url: str) -> Path:
    """``fedledger report`` of the run into ``out``, from the ledger's ``log`` and the
    coordinator at ``url``; returns the summary's path."""
    with CoordinatorClient(url) as client:
        metrics = read_metrics(client, log)
    return write_report(out, log, metrics)[-1]


def _run_nodes(
    url: str,
    make_w3: Callable[[], Web3],
    ledger_address: str,
    task: DigitsTask,
    organisations: int,
    rounds: int,
    seed: int,
    console: Console,
) -> DemoResult:
    errors: list[BaseException] = []
    threads = []
    for k in range(organisations):
        runner = NodeRunner(
            CoordinatorClient(url),
            LedgerClient(make_w3(), ledger_address, devnet_account(2 + k)),
            task,
            task.load_data(f"{k}/{organisations}"),
            seed=seed * 1000 + k,
            poll_interval_s=0.05,
        )

        def work(runner: NodeRunner = runner) -> None:
            try:
                runner.run()
            except BaseException as exc:  # surfaced below: the demo fails loudly
                errors.append(exc)

        threads.append(threading.Thread(target=work, name=f"node-{k}", daemon=True))
    for thread in threads:
        thread.start()

    result = DemoResult()
    with (
        CoordinatorClient(url) as client,
        Progress(
            TextColumn("[bold blue]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        bar = progress.add_task("", total=rounds)
        reported = 0
        while reported < rounds:
            if errors:
                raise RuntimeError(f"a node failed: {errors[0]!r}") from errors[0]
            current = client.current_round()
            while reported < rounds and (
                current.round_id > reported + 1 or current.training == wire.TrainingStatus.DONE
            ):
                outcome = client.round_result(reported + 1)
                reported += 1
                accuracy = outcome.validation_accuracy
                if accuracy is not None:
                    result.accuracies.append(accuracy)
                shown = "failed" if accuracy is None else f"{accuracy:.1%}"
                progress.console.print(
                    f"round {outcome.round_id:>2}: validation accuracy {shown}, "
                    f"{sum(o.status == wire.UploadStatus.ACCEPTED for o in outcome.organisations)} updates"
                )
                progress.update(bar, advance=1, description=f"accuracy {shown}")
            time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise RuntimeError(f"a node failed: {errors[0]!r}") from errors[0]
    return result


def _summarise(log: LedgerLog) -> list[OrganisationSummary]:
    """Each organisation's totals over the run, from the ledger's log of it."""
    summaries = []
    for address in log.organisations:
        rows = [row for row in log.rows if row.organisation == address]
        committed = [row.samples for row in rows if row.samples is not None]
        summaries.append(
            OrganisationSummary(
                address=address,
                num_samples=committed[-1] if committed else None,
                value=sum(row.value for row in rows),
                reward=sum(int(row.reward) for row in rows),
                balance=log.balances[address],
            )
        )
    return summaries


def _print_summary(console: Console, result: DemoResult) -> None:
    table = Table(title=f"On-chain contributions and rewards (ledger {result.ledger})")
    table.add_column("organisation")
    table.add_column("samples", justify="right")
    table.add_column("summed Shapley", justify="right")
    table.add_column("rewards (FLR)", justify="right")
    table.add_column("balance (FLR)", justify="right")
    for org in result.organisations:
        table.add_row(
            f"{org.address[:8]}…{org.address[-6:]}",
            "-" if org.num_samples is None else str(org.num_samples),
            f"{org.value:+.4f}",
            f"{org.reward / TOKEN_UNIT:,.2f}",
            f"{org.balance / TOKEN_UNIT:,.2f}",
        )
    console.print(table)
    final = f"{result.accuracies[-1]:.1%}" if result.accuracies else "n/a"
    console.print(f"final validation accuracy {final}, wall time {result.wall_time_s:.1f} s")

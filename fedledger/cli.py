"""The ``fedledger`` command: demo, devnet, deploy, task, coordinator, node, model, rewards, claim, report, audit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedledger.config import ENV_PREFIX, PRICING_OPTIONS, load_into_context, source_of
from fedledger.coordinator.policy import PricingPolicy
from fedledger.errors import CodedError, FedledgerError
from fedledger.incentive.onchain import DEFAULT_ROUND_BUDGET, TOKEN_UNIT

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from pydantic import ValidationError

    from fedledger import wire
    from fedledger.incentive.compression import FeedbackFile
    from fedledger.incentive.deployment import Deployment
    from fedledger.incentive.ledger import LedgerClient, RetirementRecord
    from fedledger.node.client import CoordinatorClient
    from fedledger.tasks.spec import TaskSpec

app = typer.Typer(
    help="fedledger: federated learning with an on-chain incentive ledger.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
devnet_app = typer.Typer(
    help="A local anvil devnet with the contracts deployed.", no_args_is_help=True
)
coordinator_app = typer.Typer(help="The consortium's coordinator service.", no_args_is_help=True)
node_app = typer.Typer(help="An organisation's training node.", no_args_is_help=True)
task_app = typer.Typer(help="The consortium's task spec and plug-ins.", no_args_is_help=True)
model_app = typer.Typer(help="Global models, checked against the chain.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Encrypted keystores (Web3 Secret Storage, as geth and Foundry write them).",
    no_args_is_help=True,
)
certs_app = typer.Typer(
    help="TLS certificates: a consortium CA, the coordinator's, each organisation's.",
    no_args_is_help=True,
)
app.add_typer(devnet_app, name="devnet")
app.add_typer(task_app, name="task")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(node_app, name="node")
app.add_typer(model_app, name="model")
app.add_typer(certs_app, name="certs")
app.add_typer(keys_app, name="keys")

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # errors on stderr, one line each
DEFAULT_STATE_DIR = Path(".fedledger")

DeploymentOpt = Annotated[
    Path,
    typer.Option(help="Deployment file written by `fedledger devnet up` or `fedledger deploy`."),
]
RpcOpt = Annotated[
    str | None,
    typer.Option(
        help="JSON-RPC URL of the chain (default: the deployment file's).", envvar="FEDLEDGER_RPC"
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        help="Hex private key, for devnets (or set FEDLEDGER_KEY); elsewhere use --keystore.",
        envvar="FEDLEDGER_KEY",
        show_default=False,
    ),
]
KeystoreOpt = Annotated[
    Path | None,
    typer.Option(
        help="Encrypted JSON keystore that signs transactions (or set FEDLEDGER_KEYSTORE); its "
        "password from --password-file, FEDLEDGER_PASSWORD or a prompt.",
        envvar="FEDLEDGER_KEYSTORE",
        show_default=False,
    ),
]
PasswordFileOpt = Annotated[
    Path | None, typer.Option(help="File whose first line is the keystore's password.")
]
SpecOpt = Annotated[
    Path | None,
    typer.Option(
        "--spec",
        help="The consortium's task spec file (TOML; default: the built-in digits task).",
        show_default=False,
    ),
]
CoordinatorOpt = Annotated[str, typer.Option(help="Base URL of the coordinator.")]
LogFormatOpt = Annotated[
    str, typer.Option(help="`text`, or `json`: one JSON object a line, for log shippers.")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A TOML config file whose section for this command sets any of its options "
        "(docs/configuration.md); environment variables and flags override it.",
        is_eager=True,
        callback=load_into_context,
        show_default=False,
    ),
]
CaCertOpt = Annotated[
    Path | None,
    typer.Option(help="The consortium CA's certificate, to verify the coordinator's (https)."),
]
ClientCertOpt = Annotated[
    Path | None, typer.Option(help="This organisation's TLS client certificate (mutual TLS).")
]
ClientKeyOpt = Annotated[Path | None, typer.Option(help="The key of --client-cert.")]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", help="Allow plain HTTP to a coordinator on another host."),
]


RoundBudgetOpt = Annotated[
    float,
    typer.Option(
        help="The most one round may pay out, in tokens; the ledger refuses settlements above it."
    ),
]


def _token_units(tokens: float) -> int:
    """Tokens as given on the command line, in exact token units (18 decimals)."""
    return int(Decimal(str(tokens)) * TOKEN_UNIT)


def _fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code=1)


def _error(exc: FedledgerError) -> None:
    """Print a fedledger error on standard error, with its stable code when it has one."""
    code = f" [{exc.code.value}]" if isinstance(exc, CodedError) else ""
    errors.print(f"[bold red]error{escape(code)}:[/] {escape(str(exc))}")


def main() -> None:
    """The ``fedledger`` command: any fedledger error ends it with its message and status 1."""
    try:
        app(prog_name="fedledger", auto_envvar_prefix=ENV_PREFIX)
    except FedledgerError as exc:
        _error(exc)
        raise SystemExit(1) from None


_PRICING_KNOBS = tuple(
    k for k in PricingPolicy.model_fields if k not in ("task", "task_spec", "privacy_noise")
)
"""The knobs an operator sets; the task's name and spec hash come from the spec file."""


def _pricing_help(knob: str) -> str:
    """An option's help: the knob's description in ``PricingPolicy``, where it is defined."""
    return PricingPolicy.model_fields[knob].description or knob


def _parse_knobs(pairs: list[str]) -> list[tuple[str, str]]:
    """``KNOB=VALUE`` pairs of ``--set``, each knob checked against ``PricingPolicy``."""
    parsed = []
    for pair in pairs:
        knob, sep, value = pair.partition("=")
        if not sep or knob not in _PRICING_KNOBS:
            raise _fail(
                f"--set {pair!r}: expected KNOB=VALUE with KNOB one of {', '.join(_PRICING_KNOBS)}"
            )
        parsed.append((knob, value))
    return parsed


def _logging(verbose: bool, log_format: str = "text") -> None:
    """fedledger's INFO lines (one a round), everything with ``verbose``; as text or JSON."""
    from fedledger.logs import configure_logging

    if log_format not in ("text", "json"):
        raise _fail(f"--log-format must be `text` or `json`, not {log_format!r}")
    configure_logging(verbose=verbose, log_format="json" if log_format == "json" else "text")


def _signer(
    key: str | None, keystore: Path | None, password_file: Path | None
) -> LocalAccount | None:
    """The account that signs: a keystore unlocked with its password, or a hex key (devnets;
    a warning when it was typed on the command line, where ``ps`` shows it to everyone)."""
    import sys

    from fedledger.incentive.chain import account_from_key
    from fedledger.keys import read_password, unlock

    if keystore is not None:
        if key:
            raise _fail("give --keystore or --key (FEDLEDGER_KEY), not both")
        interactive = sys.stdin.isatty()
        password = read_password(
            password_file, prompt=_prompt_password if interactive else None, what=f"{keystore}"
        )
        return unlock(keystore, password)
    if not key:
        return None
    if any(arg == "--key" or arg.startswith("--key=") for arg in sys.argv):
        errors.print(
            "[yellow]warning:[/] a key on the command line is visible to every user of this "
            "machine (ps); use --keystore, or FEDLEDGER_KEY for devnet keys"
        )
    return account_from_key(key)


def _prompt_password(text: str) -> str:
    return str(typer.prompt(text, hide_input=True, err=True))


def _ledger(
    deployment_file: Path, rpc: str | None, account: LocalAccount | None
) -> tuple[LedgerClient, Deployment]:
    """The ledger client for a deployment file, checked against the chain it names."""
    from fedledger.errors import ChainError
    from fedledger.incentive.chain import connect, wait_for_rpc
    from fedledger.incentive.deployment import Deployment
    from fedledger.incentive.ledger import LedgerClient

    try:
        deployment = Deployment.load(deployment_file)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    url = rpc or deployment.rpc_url
    if not url:
        raise _fail("no RPC URL: pass --rpc (the deployment file names none)")
    w3 = connect(url)
    try:
        wait_for_rpc(w3, timeout_s=10)
    except ChainError as exc:
        raise _fail(f"{url}: {exc}") from exc
    if int(w3.eth.chain_id) != deployment.chain_id:
        raise _fail(
            f"{url} is chain {w3.eth.chain_id}, the deployment is on chain {deployment.chain_id}"
        )
    return LedgerClient(w3, deployment.ledger, account), deployment


def _client(
    url: str,
    ca_cert: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    insecure: bool,
) -> CoordinatorClient:
    """A coordinator client over the transport the options ask for, every file checked first."""
    from fedledger.certs import client_context
    from fedledger.node.client import CoordinatorClient, check_transport

    check_transport(url, insecure=insecure)
    if url.startswith("https://"):
        return CoordinatorClient(url, verify=client_context(ca_cert, client_cert, client_key))
    if ca_cert or client_cert or client_key:
        raise _fail(f"--ca-cert, --client-cert and --client-key are for https:// URLs, not {url}")
    return CoordinatorClient(url)


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    organisations: Annotated[int, typer.Option(min=1, max=12, help="Number of organisations.")] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="Number of federated rounds.")] = 10,
    chain: Annotated[
        str,
        typer.Option(
            help="`anvil` (a devnet the demo starts and stops), `embedded` (an in-process EVM, "
            "slower) or `auto`: anvil when it is installed, else embedded."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the initial model and local training.")] = 0,
    spec: Annotated[
        Path | None,
        typer.Option(
            help="A spec file of the digits task (training, split); default: the built-in one.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a whole federation locally: chain, coordinator on loopback, organisation nodes."""
    from fedledger.demo import run_demo

    if chain not in ("auto", "embedded", "anvil"):
        raise _fail("--chain must be `auto`, `anvil` or `embedded`")
    if chain == "auto":
        from fedledger.devnet.anvil import find_anvil
        from fedledger.errors import DevnetError

        try:
            find_anvil()
            chain = "anvil"
        except DevnetError:
            console.print("anvil is not installed (`npm install` in devnet/): the in-process EVM")
            chain = "embedded"
    run_demo(
        organisations=organisations,
        rounds=rounds,
        chain=chain,
        spec=spec,
        seed=seed,
        console=console,
    )


# ------------------------------------------------------------------------- devnet


@devnet_app.command("up")
def devnet_up(
    ctx: typer.Context,
    organisations: Annotated[
        int, typer.Option(min=0, help="Organisations to fund and register.")
    ] = 3,
    port: Annotated[int, typer.Option(help="Loopback port for anvil's JSON-RPC.")] = 8545,
    state_dir: Annotated[
        Path, typer.Option(help="Where the pid, chain state and deployment go.")
    ] = DEFAULT_STATE_DIR / "devnet",
    round_budget: RoundBudgetOpt = DEFAULT_ROUND_BUDGET / TOKEN_UNIT,
    spec: SpecOpt = None,
    password_file: Annotated[
        Path | None,
        typer.Option(
            help="Also write each account's keystore under STATE_DIR/keystores, encrypted with "
            "this file's first line (or FEDLEDGER_PASSWORD when set)."
        ),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Discard the chain saved by the last `devnet down` and deploy on a new one.",
        ),
    ] = False,
) -> None:
    """Start anvil on loopback, deploy the contracts and write `deployment.json`; or resume the
    chain the last `devnet down` saved (deployment, rounds, balances), unless --fresh."""
    import os

    from fedledger.devnet.anvil import port_in_use, start_anvil, stop_pid
    from fedledger.devnet.local import DevnetFolder, resume_deployment
    from fedledger.errors import ErrorCode, SetupError
    from fedledger.incentive.chain import connect
    from fedledger.keys import PASSWORD_ENV

    state_dir.mkdir(parents=True, exist_ok=True)
    folder = DevnetFolder(state_dir)
    if (running := folder.running_pid()) is not None:
        raise _fail(
            f"a devnet is already up (pid {running}, pid file {folder.pid_file}); run "
            "`fedledger devnet down` first"
        )
    if port_in_use("127.0.0.1", port):
        raise SetupError(
            ErrorCode.PORT_IN_USE,
            f"port {port} on 127.0.0.1 is in use by another program: stop it, or give "
            "`devnet up` another --port (nothing was started)",
            port=port,
        )
    if fresh and folder.discard_saved_chain():
        console.print(f"discarded the saved chain {folder.chain_state}")
    folder.check_resumable()
    resume = folder.has_saved_chain()
    task_spec = None
    if not resume:  # checked before anything starts (and torch is imported only to deploy)
        from fedledger.tasks import load_spec

        task_spec = load_spec(spec)
    anvil = start_anvil(
        port=port, accounts=organisations + 2, state_file=folder.chain_state, detach=True
    )
    folder.pid_file.write_text(str(anvil.pid))
    w3 = connect(anvil.rpc_url)
    try:
        if task_spec is None:
            deployment = resume_deployment(folder, w3, anvil.rpc_url)
        else:
            from fedledger.devnet.deploy import deploy_devnet

            deployment = deploy_devnet(
                w3,
                organisations,
                rpc_url=anvil.rpc_url,
                round_budget=_token_units(round_budget),
                task_spec=task_spec.hash,
            )
            deployment.save(folder.deployment_file)
    except BaseException:
        stop_pid(anvil.pid)
        folder.pid_file.unlink(missing_ok=True)
        raise
    console.print(f"anvil (pid {anvil.pid}) on {anvil.rpc_url}, chain id {deployment.chain_id}")
    if task_spec is None:
        console.print(
            f"resumed the devnet's chain from {folder.chain_state}: {w3.eth.block_number} blocks "
            "(`devnet up --fresh` starts a new one)"
        )
        given = ("organisations", "round_budget", "spec")
        sources = {name: ctx.get_parameter_source(name) for name in given}
        ignored = [
            f"--{name.replace('_', '-')}"
            for name, source in sources.items()
            if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
        ]
        if ignored:
            errors.print(
                f"[yellow]warning:[/] {', '.join(ignored)} ignored: the resumed chain keeps its "
                "deployment; `devnet up --fresh` deploys anew with them"
            )
    else:
        console.print(f"a fresh chain, saved to {folder.chain_state} by `fedledger devnet down`")
        console.print(f"task spec {task_spec.task.name!r}: 0x{task_spec.hash.hex()}")
    console.print(f"ledger {deployment.ledger}, token {deployment.token}")
    console.print(
        f"deployment in {folder.deployment_file} (devnet keys included: never use them elsewhere)"
    )
    if password_file is not None or os.environ.get(PASSWORD_ENV):
        _devnet_keystores(deployment, state_dir / "keystores", password_file)


def _devnet_keystores(deployment: Deployment, folder: Path, password_file: Path | None) -> None:
    """The devnet accounts' keystores: admin.json, coordinator.json, organisation-K.json."""
    from fedledger.incentive.chain import account_from_key
    from fedledger.keys import read_password, write_keystore

    assert deployment.accounts is not None
    password = read_password(password_file, prompt=None, what="the devnet keystores")
    entries = {"admin": deployment.accounts.admin, "coordinator": deployment.accounts.coordinator}
    entries |= {f"organisation-{k}": o for k, o in enumerate(deployment.accounts.organisations)}
    for name, entry in entries.items():
        if entry.private_key:
            write_keystore(account_from_key(entry.private_key), folder / f"{name}.json", password)
    console.print(f"keystores written to {folder} ({', '.join(entries)})")


@devnet_app.command("down")
def devnet_down(
    state_dir: Annotated[
        Path, typer.Option(help="The directory given to `devnet up`.")
    ] = DEFAULT_STATE_DIR / "devnet",
) -> None:
    """Stop the devnet's anvil (SIGTERM, waiting for it to write its chain for the next `up`)."""
    from fedledger.devnet.anvil import stop_pid
    from fedledger.devnet.local import DevnetFolder

    folder = DevnetFolder(state_dir)
    had_pid_file = folder.pid_file.exists()
    pid = folder.running_pid()  # removes a stale pid file
    if pid is None:
        if not had_pid_file:
            raise _fail(f"no devnet is up here (no {folder.pid_file})")
        console.print(f"anvil was not running (stale pid file {folder.pid_file} removed)")
        return
    stop_pid(pid, timeout_s=30)
    folder.pid_file.unlink(missing_ok=True)
    console.print(f"anvil (pid {pid}) stopped")
    if folder.has_saved_chain():
        console.print(
            f"chain saved in {folder.chain_state}: `fedledger devnet up` resumes it, "
            "`--fresh` starts over"
        )


# ------------------------------------------------------------------------- deploy


@app.command()
def deploy(
    rpc: Annotated[
        str, typer.Option(help="JSON-RPC URL of the target chain.", envvar="FEDLEDGER_RPC")
    ],
    coordinator: Annotated[str, typer.Option(help="Address of the coordinator service's account.")],
    out: Annotated[Path, typer.Option(help="Where to write the deployment file.")] = Path(
        "deployment.json"
    ),
    organisation: Annotated[
        list[str] | None,
        typer.Option("--organisation", help="Organisation address to register (repeatable)."),
    ] = None,
    round_budget: RoundBudgetOpt = DEFAULT_ROUND_BUDGET / TOKEN_UNIT,
    spec: SpecOpt = None,
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
) -> None:
    """Deploy the ledger and token to any EVM chain from the admin key, and register organisations."""
    from fedledger.devnet.deploy import deploy as deploy_contracts
    from fedledger.incentive.chain import connect, wait_for_rpc
    from fedledger.tasks import load_spec

    task_spec = load_spec(spec)
    admin = _signer(key, keystore, password_file)
    if admin is None:
        raise _fail("the admin's key is required: --keystore (or --key / FEDLEDGER_KEY)")
    w3 = connect(rpc)
    wait_for_rpc(w3, timeout_s=10)
    deployment = deploy_contracts(
        w3,
        admin,
        coordinator,
        organisation or [],
        rpc_url=rpc,
        round_budget=_token_units(round_budget),
        task_spec=task_spec.hash,
    )
    deployment.save(out)
    console.print(
        f"ledger {deployment.ledger}, token {deployment.token} on chain {deployment.chain_id}"
    )
    console.print(f"deployment written to {out}")


@app.command()
def register(
    organisation: Annotated[str, typer.Argument(help="Address of the organisation to register.")],
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
) -> None:
    """Register an organisation on the ledger (admin key)."""
    ledger, _ = _ledger(deployment, rpc, _signer(key, keystore, password_file))
    ledger.register_organisation(organisation)
    console.print(f"registered {organisation}")


@app.command("round-budget")
def round_budget_command(
    tokens: Annotated[
        float | None,
        typer.Argument(help="New budget in tokens (admin key); omit to show the current one."),
    ] = None,
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
) -> None:
    """Show or set the most one round may pay out (the ledger's roundBudget)."""
    ledger, _ = _ledger(
        deployment, rpc, _signer(key, keystore, password_file) if tokens is not None else None
    )
    if tokens is not None:
        ledger.set_round_budget(_token_units(tokens))
    budget = ledger.round_budget()
    console.print(f"round budget {budget / TOKEN_UNIT:,.4f} FLR ({budget} token units)")


@app.command("sample-cap")
def sample_cap_command(
    organisation: Annotated[str, typer.Argument(help="The organisation's address.")],
    samples: Annotated[
        int | None,
        typer.Argument(
            min=0, help="New cap (admin key; 0 removes it); omit to show the current one."
        ),
    ] = None,
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
) -> None:
    """Show or set the most samples an organisation may declare (the ledger's sampleCapOf)."""
    ledger, _ = _ledger(
        deployment, rpc, _signer(key, keystore, password_file) if samples is not None else None
    )
    if samples is not None:
        ledger.set_sample_cap(organisation, samples)
    cap = ledger.sample_cap_of(organisation)
    console.print(f"sample cap of {organisation}: {cap if cap else 'none'}")


@app.command("task-spec")
def task_spec_command(
    spec: Annotated[
        Path | None,
        typer.Argument(help="The spec file to record (admin key); omit to show the current hash."),
    ] = None,
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
) -> None:
    """Show or record the consortium's task spec (the ledger's taskSpec, fixed once round 1 opens)."""
    from fedledger.tasks import load_spec

    ledger, _ = _ledger(
        deployment, rpc, _signer(key, keystore, password_file) if spec is not None else None
    )
    if spec is not None:
        ledger.set_task_spec(load_spec(spec).hash)
    on_chain = ledger.task_spec()
    console.print(f"task spec 0x{on_chain.hex()}" if any(on_chain) else "no task spec recorded yet")


# --------------------------------------------------------------------------- keys


def _new_password(password_file: Path | None, out: Path) -> str:
    from fedledger.keys import read_password

    def prompt(text: str) -> str:
        return str(typer.prompt(text, hide_input=True, confirmation_prompt=True, err=True))

    import sys

    interactive = sys.stdin.isatty()
    return read_password(
        password_file, prompt=prompt if interactive else None, what=f"the new keystore {out}"
    )


@keys_app.command("new")
def keys_new(
    out: Annotated[Path, typer.Option(help="The keystore file to write.")],
    password_file: PasswordFileOpt = None,
) -> None:
    """Create a new account in an encrypted keystore; prints its address."""
    from eth_account import Account

    from fedledger.keys import write_keystore

    info = write_keystore(Account.create(), out, _new_password(password_file, out))
    console.print(f"{info.address} in {info.path}")


@keys_app.command("import")
def keys_import(
    out: Annotated[Path, typer.Option(help="The keystore file to write.")],
    password_file: PasswordFileOpt = None,
) -> None:
    """Encrypt an existing hex key into a keystore: the key is read from standard input (or a
    hidden prompt), never from the command line."""
    import sys

    from fedledger.incentive.chain import account_from_key
    from fedledger.keys import write_keystore

    if sys.stdin.isatty():
        raw = str(typer.prompt("hex private key", hide_input=True, err=True))
    else:
        raw = sys.stdin.readline()
    account = account_from_key(raw.strip())  # a ChainError, with nothing echoed, if not a key
    info = write_keystore(account, out, _new_password(password_file, out))
    console.print(f"{info.address} in {info.path}")


@keys_app.command("list")
def keys_list(
    paths: Annotated[list[Path], typer.Argument(help="Keystore files or folders of them.")],
) -> None:
    """The address in each keystore (no password needed)."""
    from fedledger.keys import keystore_address

    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    for path in files:
        console.print(f"{keystore_address(path)}  {path}")


# -------------------------------------------------------------------------- certs


@certs_app.command("ca")
def certs_ca(
    out: Annotated[Path, typer.Option(help="Folder for ca.pem and ca.key.")],
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "fedledger consortium CA",
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 3650,
) -> None:
    """Create the consortium's CA (set FEDLEDGER_CA_PASSPHRASE to encrypt its key)."""
    from fedledger.certs import create_ca

    issued = create_ca(out, name=name, days=days)
    console.print(f"CA certificate {issued.cert} (give it to every member), key {issued.key}")


@certs_app.command("issue")
def certs_issue(
    name: Annotated[str, typer.Argument(help="Common name, and the files' name.")],
    ca: Annotated[Path, typer.Option(help="The folder `fedledger certs ca` wrote.")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.pem and NAME.key.")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A DNS name or IP address the coordinator is reached at (repeatable): makes "
            "a server certificate; without it, an organisation's client certificate.",
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 397,
) -> None:
    """Issue a certificate signed by the consortium CA: the coordinator's, or a member's."""
    from fedledger.certs import issue

    issued = issue(ca, out, name, hosts=host or [], days=days)
    kind = f"server certificate for {', '.join(host)}" if host else "client certificate"
    console.print(f"{kind} {issued.cert}, key {issued.key}")


# --------------------------------------------------------------------------- task


@task_app.command("check")
def task_check(
    spec: Annotated[Path, typer.Argument(help="The task spec file.")],
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="An organisation's data to check against it (repeatable)."),
    ] = None,
    validation: Annotated[
        str | None, typer.Option(help="The validation data to check against it.")
    ] = None,
) -> None:
    """Parse a spec, load its plug-ins and model, check data files; print its hash and tensors."""
    from fedledger.tasks import load_data, load_spec, load_task, load_validation, tensor_shapes

    parsed = load_spec(spec)
    node_task = load_task(parsed, "node")
    validator = load_task(parsed, "validator")
    model = node_task.build_model(seed=0)
    size = sum(t.numel() for t in model.state_dict().values())
    console.print(f"{spec}: task {parsed.task.name!r} ({parsed.task.kind}), metric {parsed.metric}")
    console.print(f"keccak256 0x{parsed.hash.hex()}  (the ledger's taskSpec())")
    console.print(f"model: {size:,} parameters; to pin its tensors, add to the spec:")
    console.print("[model.tensors]", markup=False)
    for name, shape in tensor_shapes(model).items():
        console.print(f'"{name}" = {shape}', markup=False)
    sources = [("data", s) for s in data or []]
    sources += [("validation", validation)] if validation is not None else []
    failed = 0
    for what, source in sources:  # every file, so that one run lists every bad one
        try:
            x, y = (
                load_data(node_task, source)
                if what == "data"
                else load_validation(validator, source)
            )
        except FedledgerError as exc:
            failed += 1
            _error(exc)
            continue
        console.print(f"{what} {source}: {len(y)} rows, features {tuple(x.shape[1:])}: ok")
    if failed:
        raise typer.Exit(code=1)


# -------------------------------------------------------------------- coordinator


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """uvicorn's TLS settings for the coordinator (all None: plain HTTP)."""

    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    cert_reqs: int = 0  # ssl.CERT_NONE; ssl.CERT_REQUIRED with a client CA


def _server_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTLS:
    """The coordinator's TLS settings, every file checked before anything starts."""
    import ssl

    from fedledger.certs import check_pair, load_certificate

    if cert is None and key is None:
        if client_ca is not None:
            raise _fail("--client-ca needs --tls-cert and --tls-key (mutual TLS is over HTTPS)")
        return ServerTLS()
    if cert is None or key is None:
        raise _fail("give both --tls-cert and --tls-key")
    check_pair(cert, key)
    if client_ca is None:
        return ServerTLS(str(cert), str(key))
    load_certificate(client_ca)
    return ServerTLS(str(cert), str(key), str(client_ca), ssl.CERT_REQUIRED)


@coordinator_app.command("serve")
def coordinator_serve(
    ctx: typer.Context,
    config: ConfigOpt = None,
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
    data_dir: Annotated[
        Path, typer.Option(help="Durable state (SQLite and tensors).")
    ] = DEFAULT_STATE_DIR / "coordinator",
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to run.")] = 10,
    round_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds from opening a round to its deadline.")
    ] = 300.0,
    upload_grace: Annotated[
        float, typer.Option(min=0, help="Seconds uploads are still taken after the deadline.")
    ] = 5.0,
    quorum: Annotated[
        int, typer.Option(min=1, help="Fewest uploads for a round to aggregate.")
    ] = 1,
    quorum_policy: Annotated[
        str, typer.Option(help="At a deadline short of the quorum: `fail` or `extend` the round.")
    ] = "fail",
    max_extensions: Annotated[
        int, typer.Option(min=0, help="Extensions before a short round fails anyway.")
    ] = 1,
    max_upload_mb: Annotated[
        float, typer.Option(min=0.001, help="Upload size limit in MiB.")
    ] = 64.0,
    max_update_norm: Annotated[
        float | None, typer.Option(min=0.0, help="Refuse updates with a larger L2 norm.")
    ] = None,
    max_expiry: Annotated[
        int, typer.Option(min=1, help="Farthest in the future, in seconds, an upload may expire.")
    ] = 3600,
    device: Annotated[
        str | None, typer.Option(help="Torch device for aggregation (default: cuda if present).")
    ] = None,
    books_process: Annotated[
        str,
        typer.Option(
            help="Close each round's books in a process of its own: `on`, `off`, or `auto` "
            "(a model of 1e5 parameters or more on a multi-core CPU)."
        ),
    ] = "auto",
    poll_interval: Annotated[
        float, typer.Option(min=0.001, help="Seconds between the round driver's chain polls.")
    ] = 0.2,
    header_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a request's line and headers may take.")
    ] = 10.0,
    body_idle_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds an upload's body may pause (408 beyond).")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds an upload's whole body may take (408).")
    ] = 120.0,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Open connections at once (503 beyond).")
    ] = 512,
    max_concurrent_uploads: Annotated[
        int, typer.Option(min=1, help="Upload bodies read at once (503 busy beyond).")
    ] = 16,
    max_waits_per_client: Annotated[
        int, typer.Option(min=0, help="Long polls held at once for one client address (429).")
    ] = 8,
    max_waits: Annotated[
        int, typer.Option(min=0, help="Long polls held at once in all (429 beyond).")
    ] = 1024,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The key of --tls-cert (PEM).")] = None,
    client_ca: Annotated[
        Path | None,
        typer.Option(help="Require client certificates issued by this CA (mutual TLS)."),
    ] = None,
    reward_per_round: Annotated[
        float | None, typer.Option(help="Tokens paid per round (pricing: reward_per_round / 1e18).")
    ] = None,
    spec: SpecOpt = None,
    validation: Annotated[
        str | None,
        typer.Option(
            help="The validation data, as the task loads it (a CSV for tabular tasks; "
            "default: the task's own)."
        ),
    ] = None,
    aggregation: Annotated[str | None, typer.Option(help=_pricing_help("aggregation"))] = None,
    trim_fraction: Annotated[
        float | None, typer.Option(help=_pricing_help("trim_fraction"))
    ] = None,
    clip_multiplier: Annotated[
        float | None, typer.Option(help=_pricing_help("clip_multiplier") + " 0: never.")
    ] = None,
    max_exact: Annotated[int | None, typer.Option(help=_pricing_help("max_exact_players"))] = None,
    valuation_budget: Annotated[
        int | None, typer.Option(help=_pricing_help("valuation_budget"))
    ] = None,
    claims_above: Annotated[int | None, typer.Option(help=_pricing_help("claims_above"))] = None,
    pricing: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KNOB=VALUE",
            help="Set any pricing knob (repeatable): "
            + ", ".join(_PRICING_KNOBS)
            + ". Recorded with every round.",
        ),
    ] = None,
    log_format: LogFormatOpt = "text",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the coordinator API (uvicorn) and run the rounds."""
    import uvicorn
    from pydantic import ValidationError

    from fedledger.config import file_knobs
    from fedledger.coordinator.api import create_app
    from fedledger.coordinator.config import CoordinatorSettings
    from fedledger.coordinator.server import server_config
    from fedledger.coordinator.service import RoundService
    from fedledger.logs import access_log_enabled

    _logging(verbose, log_format)
    if not key and keystore is None:
        raise _fail("the coordinator's key is required: --keystore (or --key / FEDLEDGER_KEY)")
    if quorum_policy not in ("fail", "extend"):
        raise _fail("--quorum-policy must be `fail` or `extend`")
    if books_process not in ("auto", "on", "off"):
        raise _fail("--books-process must be `auto`, `on` or `off`")
    # Pricing: the file's [pricing], then FEDLEDGER_PRICING_<KNOB>, then --set and named flags.
    chosen = file_knobs(ctx, _PRICING_KNOBS)
    chosen.update({k: (v, "flag --set") for k, v in _parse_knobs(pricing or [])})
    named = {
        "aggregation": aggregation,
        "trim_fraction": trim_fraction,
        "clip_multiplier": None if clip_multiplier is None else (clip_multiplier or "none"),
        "max_exact": max_exact,
        "valuation_budget": valuation_budget,
        "claims_above": claims_above,
        "reward_per_round": None if reward_per_round is None else _token_units(reward_per_round),
    }
    chosen.update(
        {
            PRICING_OPTIONS[option]: (value, source_of(ctx, option))
            for option, value in named.items()
            if value is not None
        }
    )
    try:
        policy = PricingPolicy.model_validate(
            {k: None if v == "none" else v for k, (v, _) in chosen.items()}
        )
    except ValidationError as exc:
        raise _fail(f"invalid pricing: {_problems(exc, chosen)}") from exc
    try:
        settings = CoordinatorSettings(
            data_dir=data_dir,
            task_spec=spec,
            validation=validation,
            pricing=policy,
            total_rounds=rounds,
            round_timeout_s=round_timeout,
            upload_grace_s=upload_grace,
            quorum=quorum,
            quorum_policy=quorum_policy,
            max_extensions=max_extensions,
            max_upload_bytes=int(max_upload_mb * 2**20),
            max_update_norm=max_update_norm,
            max_expiry_s=max_expiry,
            device=device,
            books_process=books_process,
            poll_interval_s=poll_interval,
            header_timeout_s=header_timeout,
            body_idle_timeout_s=body_idle_timeout,
            body_timeout_s=body_timeout,
            max_connections=max_connections,
            max_concurrent_uploads=max_concurrent_uploads,
            max_waits_per_client=max_waits_per_client,
            max_waits=max_waits,
        )
    except ValidationError as exc:
        raise _fail(f"invalid coordinator settings: {_problems(exc, {})}") from exc
    tls = _server_tls(tls_cert, tls_key, client_ca)
    _print_settings(ctx, policy, chosen)
    ledger, _ = _ledger(deployment, rpc, _signer(key, keystore, password_file))
    service = RoundService(settings, ledger)
    service.start()
    scheme = "https" if tls.certfile else "http"
    console.print(
        f"coordinator for ledger {ledger.address} on {scheme}://{host}:{port} (docs at /docs)"
        + (", client certificates required" if client_ca else "")
    )
    try:
        uvicorn_config = server_config(
            create_app(service, members_only=client_ca is not None),
            host=host,
            port=port,
            log_level="info" if verbose else "warning",
            log_config=None,  # uvicorn's records through fedledger's handler and format
            access_log=access_log_enabled(verbose=verbose),
            ssl_certfile=tls.certfile,
            ssl_keyfile=tls.keyfile,
            ssl_ca_certs=tls.ca_certs,
            ssl_cert_reqs=tls.cert_reqs,
        )
        uvicorn.Server(uvicorn_config).run()
    finally:
        service.stop()


def _problems(exc: ValidationError, sources: Mapping[str, tuple[object, str]]) -> str:
    """A pydantic error as one line: each bad field, where its value came from, and why."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "settings"
        origin = sources.get(str(error["loc"][0]), (None, ""))[1] if error["loc"] else ""
        parts.append(f"{field}{f' (from {origin})' if origin else ''}: {error['msg']}")
    return "; ".join(parts)


def _print_settings(
    ctx: typer.Context,
    policy: PricingPolicy | None = None,
    knobs: Mapping[str, tuple[object, str]] | None = None,
) -> None:
    """The effective settings, each with where it came from (secrets masked), at start-up."""
    from fedledger.config import loaded_config, masked

    loaded = loaded_config(ctx)
    console.print(
        "settings"
        + (f" (config {loaded.path}; environment and flags override it)" if loaded else "")
        + ":",
        soft_wrap=True,
    )
    # With a policy, its knobs are shown as pricing.KNOB, whichever option set them.
    shown_as_knob = {"pricing", *PRICING_OPTIONS} if policy is not None else set()
    for name, value in ctx.params.items():
        if name == "config" or name in shown_as_knob:
            continue
        console.print(
            f"  {name} = {escape(masked(name, value))}  ({source_of(ctx, name)})", soft_wrap=True
        )
    if policy is not None:
        for knob, value in policy.record().items():
            if knob not in _PRICING_KNOBS:
                continue  # the task's, set from the spec
            origin = (knobs or {}).get(knob, (None, "default"))[1]
            console.print(f"  pricing.{knob} = {escape(str(value))}  ({origin})", soft_wrap=True)


# --------------------------------------------------------------------------- node


@node_app.command("run")
def node_run(
    ctx: typer.Context,
    config: ConfigOpt = None,
    coordinator: CoordinatorOpt = "http://127.0.0.1:8000",
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
    spec: SpecOpt = None,
    data: Annotated[
        str,
        typer.Option(
            help="This organisation's training data, as the task loads it: a CSV file for "
            "tabular tasks; INDEX/COUNT (its share of a split) for the digits task."
        ),
    ] = "0/1",
    seed: Annotated[int, typer.Option(help="Seed of local training (batch order).")] = 0,
    outbox: Annotated[
        Path | None,
        typer.Option(help="Keep a copy of every update sent, and its signed headers, here."),
    ] = None,
    privacy_ledger: Annotated[
        Path | None,
        typer.Option(
            help="With DP-SGD in the spec: where this node records the privacy it has spent "
            "(default: .fedledger/privacy/LEDGER-ORGANISATION.json). Keep it: it is the budget."
        ),
    ] = None,
    receipts: Annotated[
        Path | None,
        typer.Option(
            help="Where this node keeps the coordinator's signed receipt of each upload, "
            "round-NNNN.json (default: .fedledger/receipts/LEDGER-ORGANISATION/). Keep them: "
            "they prove an upload the coordinator acknowledged (`fedledger audit --receipt`)."
        ),
    ] = None,
    ca_cert: CaCertOpt = None,
    client_cert: ClientCertOpt = None,
    client_key: ClientKeyOpt = None,
    insecure: InsecureOpt = False,
    log_format: LogFormatOpt = "text",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Take part in every round: check the spec, verify the model, train, commit, upload signed."""
    from fedledger.node.runner import NodeRunner, RoundOutcome, Settled
    from fedledger.receipts import ReceiptBox
    from fedledger.tasks import load_data, load_spec, load_task

    _logging(verbose, log_format)
    if not key and keystore is None:
        raise _fail("the organisation's key is required: --keystore (or --key / FEDLEDGER_KEY)")
    _print_settings(ctx)
    coordinator_client = _client(coordinator, ca_cert, client_cert, client_key, insecure)
    learning_task = load_task(load_spec(spec), "node")
    dataset = load_data(learning_task, data)
    ledger, _ = _ledger(deployment, rpc, _signer(key, keystore, password_file))
    assert ledger.account is not None
    if not ledger.is_organisation(ledger.account.address):
        raise _fail(
            f"{ledger.account.address} is not a registered organisation on {ledger.address}"
        )

    def report(outcome: RoundOutcome) -> None:
        local = ", ".join(f"{k} {v:.4f}" for k, v in outcome.local_metrics.items())
        spent = ""
        if outcome.epsilon is not None and (dp := learning_task.spec.privacy) is not None:
            spent = f"; epsilon {outcome.epsilon:.3f} of {dp.epsilon:g} spent (delta {dp.delta:g})"
        console.print(
            f"round {outcome.round_id}: uploaded {outcome.update_hash[:18]}… "
            f"({outcome.num_samples} samples, train loss {outcome.train_loss:.4f}; local {local}"
            f"{spent})"
        )

    def settled(round_: Settled) -> None:
        from fedledger.incentive.onchain import flag_names

        shown = ", ".join(f"{k} {v:.4f}" for k, v in round_.validation.items()) or "not reported"
        flags = f", flagged {', '.join(flag_names(round_.flags))}" if round_.flags else ""
        console.print(
            f"round {round_.round_id} settled: global model validation {shown}; "
            f"reward {round_.reward / TOKEN_UNIT:,.4f} FLR{flags}"
        )

    console.print(
        f"node {ledger.account.address}: task {learning_task.spec.task.name!r}, "
        f"{len(dataset[1])} samples, coordinator {coordinator}"
    )
    privacy = None
    if learning_task.spec.privacy is not None:
        from fedledger.tasks.privacy import PrivacyLedger

        path = privacy_ledger or (
            DEFAULT_STATE_DIR / "privacy" / f"{ledger.address}-{ledger.account.address}.json"
        )
        privacy = PrivacyLedger(learning_task.spec.privacy, path)
        spent = privacy.spent()
        console.print(
            f"DP-SGD: epsilon {spent.epsilon:.3f} of {spent.budget:g} spent so far "
            f"(delta {spent.delta:g}, {spent.rounds} rounds; ledger {path})"
        )
    receipt_box = ReceiptBox(
        receipts or DEFAULT_STATE_DIR / "receipts" / f"{ledger.address}-{ledger.account.address}"
    )
    console.print(f"receipts of the uploads kept in {escape(str(receipt_box.folder))}")
    with coordinator_client as client:
        runner = NodeRunner(
            client,
            ledger,
            learning_task,
            dataset,
            seed=seed,
            privacy=privacy,
            feedback=_feedback_file(learning_task.spec, ledger),
            outbox=outbox,
            receipts=receipt_box,
            on_round=report,
            on_settled=settled,
        )
        outcomes = runner.run()
    if runner.budget_spent is not None:
        errors.print(f"[yellow]privacy budget spent:[/] {escape(str(runner.budget_spent))}")
        console.print(
            "retired on-chain: the coordinator no longer waits for this organisation and "
            "reports it as retired"
        )
    console.print(f"training done: took part in {len(outcomes)} round(s)")


def _feedback_file(spec: TaskSpec, ledger: LedgerClient) -> FeedbackFile | None:
    """With compressed updates, the node's error-feedback file (what compression held back),
    kept beside its privacy ledger so that a restarted node re-encodes a committed round."""
    if spec.compression.scheme == "none":
        return None
    from fedledger.incentive.compression import Codec, FeedbackFile

    assert ledger.account is not None
    path = DEFAULT_STATE_DIR / "compression" / f"{ledger.address}-{ledger.account.address}.st"
    console.print(f"updates compressed ({spec.compression.scheme}); held back kept in {path}")
    return FeedbackFile(Codec.of(spec.compression), path)


# -------------------------------------------------------------------------- model


@model_app.command("pull")
def model_pull(
    round_id: Annotated[
        int, typer.Option("--round", min=1, help="The finalized round whose new model to fetch.")
    ],
    out: Annotated[Path, typer.Option(help="Where to write the model (safetensors).")],
    coordinator: CoordinatorOpt = "http://127.0.0.1:8000",
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    ca_cert: CaCertOpt = None,
    client_cert: ClientCertOpt = None,
    client_key: ClientKeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Fetch the global model a round produced and check its keccak256 against the chain."""
    from fedledger.incentive.commitment import decode_tensors, keccak
    from fedledger.incentive.onchain import RoundState

    coordinator_client = _client(coordinator, ca_cert, client_cert, client_key, insecure)
    ledger, _ = _ledger(deployment, rpc, None)
    if not 1 <= round_id <= ledger.round_count():
        raise _fail(f"round {round_id} does not exist on ledger {ledger.address}")
    record = ledger.get_round(round_id)
    if record.state != RoundState.FINALIZED:
        raise _fail(f"round {round_id} is {record.state.name.lower()}: it produced no model yet")
    expected = "0x" + record.new_model_hash.hex()
    with coordinator_client as client:
        data = client.model(expected)
    served = "0x" + keccak(data).hex()
    if served != expected:
        raise _fail(
            f"the coordinator served a model hashing to {served}, but the ledger records "
            f"{expected} for round {round_id}; not written"
        )
    tensors = decode_tensors(data)  # refuses anything but safetensors
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    size = sum(t.numel() for t in tensors.values())
    console.print(f"round {round_id}: model {expected} ({size:,} parameters) written to {out}")


# ------------------------------------------------------------------------ rewards


def _retired_text(record: RetirementRecord | None) -> str:
    if record is None:
        return "-"
    spent = "" if record.epsilon is None else f", epsilon {record.epsilon:.3f} spent"
    return f"since round {record.since_round}{spent}"


@app.command()
def rewards(
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    org: Annotated[str | None, typer.Option("--org", help="Only this organisation.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per-round contribution scores, rewards and token balances, read from the contract."""
    from fedledger.runlog import read_ledger

    ledger, _ = _ledger(deployment, rpc, None)
    log = read_ledger(ledger, [org] if org else None)
    rounds, rows, balances, retired = len(log.rounds), log.rows, log.balances, log.retired
    paid = log.total_rewards  # totalRewardOf
    private = any(row.epsilon is not None for row in rows)
    if as_json:
        print(
            json.dumps(
                {
                    "ledger": ledger.address,
                    "rounds": [dataclasses.asdict(row) for row in rows],
                    # decimal strings: 21-digit token amounts do not survive JSON numbers in
                    # jq or JavaScript (doubles)
                    "balances": {address: str(units) for address, units in balances.items()},
                    "total_rewards": {address: str(units) for address, units in paid.items()},
                    "retired": {
                        address: {"since_round": r.since_round, "epsilon": r.epsilon}
                        for address, r in retired.items()
                    },
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"Rewards on ledger {ledger.address} ({rounds} rounds)")
    right = ("round", "value", "reward (FLR)")
    for column in ("round", "state", "organisation", "committed", "value", "reward (FLR)"):
        table.add_column(column, justify="right" if column in right else "left")
    table.add_column("payment")
    table.add_column("flags")
    if private:
        table.add_column("epsilon", justify="right")
    for row in rows:
        epsilon = [] if not private else ["-" if row.epsilon is None else f"{row.epsilon:.3f}"]
        table.add_row(
            str(row.round),
            row.state,
            row.organisation,
            "-" if row.committed is None else row.committed[:18] + "…",
            f"{row.value:+.4f}" if row.settled else "-",
            f"{row.reward_tokens:,.4f}" if row.settled else "-",
            row.payment,
            ", ".join(row.flags) or "-",
            *epsilon,
        )
    console.print(table)
    unclaimed = sum(row.payment == "unclaimed" for row in rows)
    if unclaimed:
        console.print(
            f"{unclaimed} reward(s) settled by Merkle root are not claimed yet: a node claims "
            "its own automatically (the amount is in its claim ticket until then)."
        )
    totals = Table(title="Token balances")
    totals.add_column("organisation")
    totals.add_column("paid in all (FLR)", justify="right")
    totals.add_column("balance (FLR)", justify="right")
    if retired:
        totals.add_column("retired")
    for address, balance in balances.items():
        status = [] if not retired else [_retired_text(retired.get(address))]
        totals.add_row(
            address, f"{paid[address] / TOKEN_UNIT:,.4f}", f"{balance / TOKEN_UNIT:,.4f}", *status
        )
    console.print(totals)


@app.command()
def claim(
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    coordinator: CoordinatorOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    keystore: KeystoreOpt = None,
    password_file: PasswordFileOpt = None,
    ca_cert: CaCertOpt = None,
    client_cert: ClientCertOpt = None,
    client_key: ClientKeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Claim every reward of this organisation (its key) that the chain says is unclaimed in
    rounds settled by Merkle root; each claim ticket is checked against the on-chain root first.

    Exits 1 if a ticket does not verify or a claim was refused (the others are still claimed).
    """
    from fedledger.node.claims import Claim, ClaimResult, claim_unclaimed

    account = _signer(key, keystore, password_file)
    if account is None:
        raise _fail("the organisation's key is required: --keystore (or --key / FEDLEDGER_KEY)")
    coordinator_client = _client(coordinator, ca_cert, client_cert, client_key, insecure)
    ledger, _ = _ledger(deployment, rpc, account)

    def show(result: ClaimResult) -> None:
        if isinstance(result, Claim):
            console.print(
                f"round {result.round_id}: claimed {result.reward / TOKEN_UNIT:,.4f} FLR "
                f"({result.reward} token units, tx {result.tx_hash})",
                soft_wrap=True,
            )
        elif result.is_problem:
            errors.print(f"[bold red]round {result.round_id}:[/] {escape(result.detail)}")
        else:
            errors.print(f"[yellow]round {result.round_id}:[/] {escape(result.detail)}")

    with coordinator_client as client:
        results = claim_unclaimed(ledger, client, on_result=show)
    claimed = [r for r in results if isinstance(r, Claim)]
    total = sum(c.reward for c in claimed)
    console.print(
        f"{account.address}: claimed {len(claimed)} round(s), {total / TOKEN_UNIT:,.4f} FLR in "
        f"all ({total} token units)"
        if claimed
        else f"{account.address}: nothing to claim on ledger {ledger.address}",
        soft_wrap=True,
    )
    problems = [r for r in results if not isinstance(r, Claim) and r.is_problem]
    if problems:
        raise _fail(
            f"{len(problems)} round(s) not claimed: {', '.join(str(r.round_id) for r in problems)}"
        )


@app.command("report")
def report_command(
    out: Annotated[Path, typer.Option(help="Folder to write the charts and summary.md into.")],
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    coordinator: CoordinatorOpt = "http://127.0.0.1:8000",
    ca_cert: CaCertOpt = None,
    client_cert: ClientCertOpt = None,
    client_key: ClientKeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Charts (PNG) and a Markdown summary of a run: rewards, scores and flags from the
    contract, the global model's validation metrics from the coordinator when it answers."""
    from fedledger.report import MetricsUnavailable, read_metrics, write_report
    from fedledger.runlog import read_ledger

    coordinator_client = _client(coordinator, ca_cert, client_cert, client_key, insecure)
    ledger, _ = _ledger(deployment, rpc, None)
    log = read_ledger(ledger)
    with coordinator_client as client:
        metrics = read_metrics(client, log)
    if isinstance(metrics, MetricsUnavailable):
        errors.print(f"[yellow]{escape(metrics.line)}[/]")
    written = write_report(out, log, metrics)
    console.print(
        f"report of {len(log.rounds)} round(s) on ledger {log.ledger} written to "
        f"{escape(str(out))}: {', '.join(path.name for path in written)}",
        soft_wrap=True,
    )


@app.command()
def audit(
    round_id: Annotated[
        int | None,
        typer.Option(
            "--round",
            help="The finished round to recompute (default: the round of the --receipt files).",
            show_default=False,
        ),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option(help="The coordinator's data directory (or a copy); opened read-only."),
    ] = DEFAULT_STATE_DIR / "coordinator",
    deployment: DeploymentOpt = DEFAULT_STATE_DIR / "devnet" / "deployment.json",
    rpc: RpcOpt = None,
    spec: Annotated[
        Path | None,
        typer.Option(
            help="Your copy of the task spec (default: the one the coordinator kept).",
            show_default=False,
        ),
    ] = None,
    validation: Annotated[
        str | None,
        typer.Option(help="Your copy of the validation data (default: the kept one)."),
    ] = None,
    receipt: Annotated[
        list[Path] | None,
        typer.Option(
            "--receipt",
            help="A receipt the coordinator signed for an upload (a node keeps one a round, "
            "in .fedledger/receipts/); repeat for several organisations of one round.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Recompute a round from the coordinator's stored updates and check it against the chain.

    Checks the task spec against the ledger's, every update against its commitment, every
    on-chain committer for an upload in the store, the validation set against its recorded
    hash, the aggregate against the new model hash, and the scores, rewards, flags (or the
    Merkle root) against the ledger. With --receipt, checks the receipt is signed by the
    ledger's coordinator and reports its update dropped if the store or the settlement lacks
    it. Exits 1 on any mismatch.
    """
    from fedledger.coordinator.audit import audit_round
    from fedledger.receipts import read_receipt

    receipts = [read_receipt(path) for path in receipt or []]
    round_id = _audited_round(round_id, receipts, receipt or [])
    ledger, _ = _ledger(deployment, rpc, None)
    if not 1 <= round_id <= ledger.round_count():
        raise _fail(
            f"round {round_id} does not exist on ledger {ledger.address} "
            f"({ledger.round_count()} rounds so far)"
        )
    try:
        report = audit_round(
            round_id, ledger, data_dir, spec=spec, validation=validation, receipts=receipts
        )
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from exc
    table = Table(title=f"Audit of round {round_id} on ledger {ledger.address}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        table.add_row(
            escape(check.what),
            "[green]ok[/]" if check.ok else "[bold red]MISMATCH[/]",
            escape(check.detail),
        )
    console.print(table)
    for dropped in report.dropped:
        errors.print(f"[bold red]dropped acknowledged upload:[/] {escape(str(dropped))}")
    if not report.ok:
        raise _fail(f"round {round_id}: {len(report.mismatches)} check(s) failed")
    console.print(f"round {round_id}: all {len(report.checks)} checks passed")


def _audited_round(
    round_id: int | None, receipts: list[wire.UploadReceipt], paths: list[Path]
) -> int:
    """The round to audit: ``--round``, which every receipt must be for, or the receipts' one."""
    rounds = {r.round_id for r in receipts}
    if round_id is None:
        if len(rounds) != 1:
            raise _fail(
                "give --round, or --receipt files of one round"
                + (f" (they are for rounds {sorted(rounds)})" if rounds else "")
            )
        return rounds.pop()
    for path, r in zip(paths, receipts, strict=True):
        if r.round_id != round_id:
            raise _fail(f"{path} is a receipt for round {r.round_id}, not round {round_id}")
    return round_id

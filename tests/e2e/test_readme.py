"""The README's commands, as written: every ``fedledger`` command it shows parses against the
real CLI (options, types, config files), and those that need nothing outside this machine run,
in order, against a devnet of their own; each command shown is accounted for."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.main import get_command

from fedledger.cli import app
from fedledger.config import ENV_PREFIX
from fedledger.devnet.anvil import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DEVNET_COORDINATOR_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"

CONFIG_FILES = {
    "consortium.toml": ROOT / "examples" / "config" / "consortium.toml",
    "hospital_a.toml": ROOT / "examples" / "config" / "hospital_a.toml",
}
"""The README's config files are the examples' (the command as written reads them)."""

RUN = (
    "fedledger keys new",
    "fedledger keys import",
    "fedledger keys list",
    "python examples/breast_cancer/make_data.py",
    "fedledger task check",
    "fedledger devnet up",
    "fedledger rewards",
    "fedledger devnet down",
    "fedledger certs ca",
    "fedledger certs issue",
)
"""Commands run as written, in the README's order, in a fresh folder with a devnet."""

ELSEWHERE = {
    "./do demo": "tests/test_demo.py runs the demo it starts",
    "./do test": "the suite itself, which CI starts with this command",
    # About 40 s each, more than the suite has room for on two cores: run them with
    # `python tests/e2e/test_readme.py`. Their flow (separate processes on a devnet, a task
    # plug-in, an audit) is tests/e2e/test_own_task.py; a consortium losing members to the
    # screens, tests/coordinator/test_aggregate_minimum.py.
    "./do example": "examples/NAME/run.sh, run by this file as a script",
}
"""Commands that start what other tests run (their arguments are checked where they are)."""


@dataclass(frozen=True)
class Shown:
    """A command of the README: its line and its text (continuations joined, comment cut)."""

    line: int
    text: str

    @property
    def program(self) -> str:
        """``fedledger keys new``-style: the program (without ``.venv/bin/``) and its words."""
        return self.text.removeprefix(".venv/bin/")


def readme_commands() -> list[Shown]:
    """Every command line of the README's ```bash blocks."""
    shown: list[Shown] = []
    in_block = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), start=1):
        if line.startswith("```"):
            in_block = line.strip() == "```bash" and not in_block
            continue
        if not in_block:
            continue
        text = re.sub(r"\s+#.*$", "", line.strip())
        if pending is not None:
            start, before = pending
            text = f"{before} {text}"
        elif not text.startswith(("./do ", ".venv/bin/")):
            continue
        else:
            start = number
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        shown.append(Shown(start, " ".join(text.split())))
    return shown


def cli_arguments(shown: Shown) -> list[str]:
    """A ``fedledger`` command's arguments as the shell would pass them: no redirection, no
    ``...`` (the options shown before), optional ``[--flag value]`` given, config files the
    examples'."""
    words = shlex.split(shown.program)[1:]
    arguments: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word == "<":
            skip_next = True
        elif word != "...":
            word = word.strip("[]")
            arguments.append(str(CONFIG_FILES.get(word, word)))
    return arguments


COMMANDS = readme_commands()


EXAMPLES = [s for s in COMMANDS if s.text.startswith("./do example ")]


def test_the_readme_shows_commands_and_each_is_accounted_for() -> None:
    assert len(COMMANDS) >= 25 and len(EXAMPLES) == 2, COMMANDS
    for shown in COMMANDS:
        fedledger = shown.program.startswith("fedledger ")
        elsewhere = any(shown.text.startswith(prefix) for prefix in ELSEWHERE)
        run = shown.program.startswith(RUN)
        assert fedledger or elsewhere or run, f"README.md:{shown.line}: {shown.text}"


@pytest.mark.parametrize(
    "shown", [s for s in COMMANDS if s.program.startswith("fedledger ")], ids=lambda s: str(s.line)
)
def test_every_fedledger_command_of_the_readme_parses(shown: Shown) -> None:
    """Its subcommand exists, every option it gives is one of the command's and of the right
    type, required arguments are there, and a config file it names is valid."""
    command = get_command(app)
    arguments = cli_arguments(shown)
    path = ["fedledger"]
    while arguments and hasattr(command, "commands") and arguments[0] in command.commands:
        path.append(arguments.pop(0))
        command = command.commands[path[-1]]
    assert not hasattr(command, "commands"), f"README.md:{shown.line}: no such command"
    context = command.make_context(" ".join(path), arguments, auto_envvar_prefix=ENV_PREFIX)
    assert context.params, f"README.md:{shown.line}: {shown.text}"


def test_the_commands_that_need_only_this_machine_run_as_written(tmp_path: Path) -> None:
    """Keys, the task check, certificates, a devnet and the rewards it shows, in order, in a
    fresh folder (the deployment the README deploys to a chain is the devnet's)."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "coordinator.hex").write_text(DEVNET_COORDINATOR_KEY + "\n")
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "FEDLEDGER_PASSWORD": "correct horse battery staple",
        "FEDLEDGER_DEVNET_UP_PORT": str(free_port()),  # as written, on a port of its own
    }
    ran: list[str] = []
    try:
        for shown in COMMANDS:
            if not shown.program.startswith(RUN):
                continue
            command = shown.text.replace(".venv/bin/", f"{VENV_BIN}/")
            command = re.sub(r"\[([^\]]*)\]", r"\1", command)  # the optional parts, given
            if shown.program.startswith("fedledger rewards"):
                deployed = tmp_path / ".fedledger" / "devnet" / "deployment.json"
                (tmp_path / "deployment.json").write_bytes(deployed.read_bytes())
                command = command.replace("--org 0xHospitalA", "")
            done = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=180, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"README.md:{shown.line}: {command}\n{done.stderr}"
            assert "Traceback" not in done.stdout + done.stderr
            ran.append(shown.program.split(" --")[0])
    finally:
        subprocess.run(
            [str(VENV_BIN / "fedledger"), "devnet", "down"], cwd=tmp_path, env=env,
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    assert {prefix for prefix in RUN if any(r.startswith(prefix) for r in ran)} == set(RUN)
    assert (tmp_path / "admin.json").exists() and (tmp_path / "pki" / "ca").is_dir()


def run_example(shown: Shown) -> None:
    """One example's whole consortium of separate processes, two rounds instead of ten
    (``ROUNDS``), its audit of the last round included: the command ends 0 only when that
    audit passes."""
    done = subprocess.run(
        ["bash", "-c", shown.text], cwd=ROOT, env={**os.environ, "ROUNDS": "2"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"README.md:{shown.line}: {shown.text}\n{done.stdout[-4000:]}"
    assert "round 2: all" in done.stdout and "checks passed" in done.stdout


if __name__ == "__main__":  # the examples, as written, by hand: python tests/e2e/test_readme.py
    for example in EXAMPLES:
        run_example(example)
        print(f"README.md:{example.line}: {example.text}: ran, audit passed")

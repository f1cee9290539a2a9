"""Config files: file < environment < flag for every option and pricing knob, the effective
settings printed with their sources (secrets masked), and every bad file refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedledger.cli import app
from fedledger.config import ENV_PREFIX, ConfigError
from fedledger.errors import ErrorCode, SetupError

DEVNET_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"


def serve(
    tmp_path: Path, config: str, *flags: str, **env: str
) -> tuple[int, str, BaseException | None]:
    """``coordinator serve --config`` up to where it needs a chain (there is none: it stops at
    the missing deployment file, after printing its settings)."""
    path = tmp_path / "consortium.toml"
    path.write_text(config)
    result = CliRunner().invoke(
        app,
        ["coordinator", "serve", "--config", str(path),
         "--deployment", str(tmp_path / "none.json"), *flags],
        env={"FEDLEDGER_KEY": DEVNET_KEY, **env},
        auto_envvar_prefix=ENV_PREFIX,
    )  # fmt: skip
    return result.exit_code, " ".join(result.output.split()), result.exception


def test_a_setting_comes_from_the_file_then_the_environment_then_the_flag(
    tmp_path: Path,
) -> None:
    config = "[coordinator]\nport = 8101\nrounds = 4\nquorum = 2\nupload_grace = 1.5\n"
    _, shown, _ = serve(tmp_path, config, "--quorum", "3", FEDLEDGER_COORDINATOR_SERVE_ROUNDS="6")
    assert f"config {tmp_path / 'consortium.toml'}" in shown
    assert f"port = 8101 ({tmp_path / 'consortium.toml'})" in shown
    assert "rounds = 6 (env FEDLEDGER_COORDINATOR_SERVE_ROUNDS)" in shown
    assert "quorum = 3 (flag)" in shown
    assert "host = 127.0.0.1 (default)" in shown
    assert "no deployment file" in shown  # it went on with these settings


def test_a_pricing_knob_comes_from_the_file_then_the_environment_then_the_flags(
    tmp_path: Path,
) -> None:
    config = (
        '[pricing]\neta = 0.5\nmetric = "accuracy"\naggregation = "median"\nmin_aggregated = 2\n'
    )
    _, shown, _ = serve(
        tmp_path, config, "--set", "min_aggregated=4", "--aggregation", "trimmed_mean",
        FEDLEDGER_PRICING_ETA="0.25",
    )  # fmt: skip
    file = tmp_path / "consortium.toml"
    assert f"pricing.metric = accuracy ({file})" in shown
    assert "pricing.eta = 0.25 (env FEDLEDGER_PRICING_ETA)" in shown
    assert "pricing.min_aggregated = 4 (flag --set)" in shown
    assert "pricing.aggregation = trimmed_mean (flag)" in shown
    assert "pricing.max_weight_multiple = 3.0 (default)" in shown
    assert " aggregation = " not in shown.replace("pricing.aggregation", "")  # shown once


def test_secrets_are_masked_in_the_settings_printed(tmp_path: Path) -> None:
    rpc = "https://auditor:hunter2@mainnet.example:8443/v3/0123456789abcdef"
    _, shown, _ = serve(tmp_path, f'[coordinator]\nrpc = "{rpc}"\n')
    assert "rpc = https://mainnet.example:8443/*** (" in shown
    assert "key = *** (env FEDLEDGER_KEY)" in shown
    for secret in ("hunter2", "0123456789abcdef", DEVNET_KEY, DEVNET_KEY[2:]):
        assert secret not in shown


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "[coordinator]\nprot = 8001\n",
            "[coordinator] prot: no such setting (did you mean 'port'?)",
        ),
        (
            '[coordinator]\nport = "eighty"\n',
            "[coordinator] port = 'eighty': Input should be a valid integer",
        ),
        (
            "[coordinator]\nport = 70000\n",
            "[coordinator] port = 70000: Input should be less than or equal to 65535",
        ),
        (
            "[coordinator]\nquorum = 0\n",
            "[coordinator] quorum = 0: Input should be greater than or equal to 1",
        ),
        (f'[coordinator]\nkey = "{DEVNET_KEY}"\n', "a private key does not belong in a file"),
        ('[coordinator]\npricing = "eta=1"\n', "pricing knobs go in the [pricing] section"),
        ("[coordinator]\nmax_exact = 9\n", "write `max_exact_players` in the [pricing] section"),
        ("[coordinatr]\nport = 1\n", "unknown section [coordinatr] (did you mean 'coordinator'?)"),
        ("port = 8001\n", "unknown section [port]"),
        ("[coordinator\n", "not valid TOML: Expected ']'"),
        ("[pricing]\netaa = 1.0\n", "[pricing] etaa: no such pricing knob (did you mean 'eta'?)"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, config: str, expected: str
) -> None:
    code, _, exc = serve(tmp_path, config)
    assert code != 0 and isinstance(exc, ConfigError), exc
    assert exc.code is ErrorCode.BAD_CONFIG
    assert str(exc).startswith(f"{tmp_path / 'consortium.toml'}: ") and expected in str(exc)


def test_a_bad_pricing_value_or_variable_names_where_it_came_from(tmp_path: Path) -> None:
    code, shown, _ = serve(tmp_path, "[pricing]\neta = -1\n")
    assert (
        code == 1
        and f"eta (from {tmp_path / 'consortium.toml'}): Input should be greater than 0" in shown
    )
    code, _, exc = serve(tmp_path, "", FEDLEDGER_PRICING_ETTA="1")
    assert isinstance(exc, ConfigError) and "FEDLEDGER_PRICING_ETTA: no such pricing knob" in str(
        exc
    )


def test_a_missing_file_stops_the_command_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedledger", "node", "run", "--config", str(tmp_path / "node.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert (
        done.stderr.strip() == f"error [bad_config]: {tmp_path / 'node.toml'}: no such config file"
    )
    assert "Traceback" not in done.stdout + done.stderr


def test_one_file_serves_both_roles_each_reading_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "consortium.toml"
    path.write_text(
        "[coordinator]\nport = 8102\n\n[pricing]\neta = 0.5\n\n"
        '[node]\ndata = "2/5"\nseed = 7\ncoordinator = "http://127.0.0.1:8102"\n'
    )
    result = CliRunner().invoke(
        app,
        ["node", "run", "--config", str(path), "--deployment", str(tmp_path / "none.json")],
        env={"FEDLEDGER_KEY": DEVNET_KEY},
        auto_envvar_prefix=ENV_PREFIX,
    )
    shown = " ".join(result.output.split())
    assert f"data = 2/5 ({path})" in shown and f"seed = 7 ({path})" in shown
    assert "port" not in shown and "pricing" not in shown


@pytest.mark.parametrize(
    ("example", "command"),
    [("consortium.toml", ["coordinator", "serve"]), ("hospital_a.toml", ["node", "run"])],
)
def test_the_example_config_files_hold_only_valid_settings(
    example: str, command: list[str]
) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "config" / example
    result = CliRunner().invoke(
        app, [*command, "--config", str(path)], env={"FEDLEDGER_KEY": DEVNET_KEY},
        auto_envvar_prefix=ENV_PREFIX,
    )  # fmt: skip
    # Every key and knob was taken: it stops only at the first file it names that this
    # checkout lacks (the consortium's certificates), after its settings were validated.
    assert isinstance(result.exception, SetupError), result.exception
    assert "cannot read the certificate pki/" in str(result.exception)


def test_the_configuration_page_lists_every_key_and_knob() -> None:
    from typer.main import get_command

    from fedledger.config import PRICING_OPTIONS
    from fedledger.coordinator.policy import PricingPolicy

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    group = get_command(app)
    for role, command in (("coordinator", "serve"), ("node", "run")):
        options = group.commands[role].commands[command].params  # type: ignore[attr-defined]
        for option in options:
            if option.name not in ("config", "key", "pricing", *PRICING_OPTIONS):
                assert f"| `{option.name}` |" in page, option.name
    for knob in PricingPolicy.model_fields:
        if knob not in ("task", "task_spec", "privacy_noise"):
            assert f"| `{knob}` |" in page, knob

"""Role config files: a TOML section per role gives a command its settings, under the environment
and the flags (file < environment < flag)."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import typer

from fedledger.errors import CodedError, ErrorCode

ENV_PREFIX = "FEDLEDGER"
"""Every option of every command also reads ``FEDLEDGER_<COMMAND>_<OPTION>`` (click's automatic
environment variables: ``FEDLEDGER_COORDINATOR_SERVE_PORT``); options with a documented name
of their own (``FEDLEDGER_KEYSTORE``, ``FEDLEDGER_RPC``) read that one."""

PRICING_ENV_PREFIX = f"{ENV_PREFIX}_PRICING_"
"""A pricing knob's environment override: ``FEDLEDGER_PRICING_ETA=0.5``."""

SECTIONS = {"coordinator serve": "coordinator", "node run": "node"}
"""Which section of a config file a command reads its options from."""

EXTRA_SECTIONS = {"coordinator": ("pricing",), "node": ()}
"""The other sections a role reads (the coordinator's pricing policy)."""

PRICING_OPTIONS = {
    "aggregation": "aggregation",
    "trim_fraction": "trim_fraction",
    "clip_multiplier": "clip_multiplier",
    "max_exact": "max_exact_players",
    "valuation_budget": "valuation_budget",
    "claims_above": "claims_above",
    "reward_per_round": "reward_per_round",
}
"""``coordinator serve``'s options that set a pricing knob, and the knob each sets: in a file
they are written as knobs, in [pricing]."""

_NOT_IN_FILES = {
    "key": "a private key does not belong in a file: give `keystore` and `password_file`",
    "config": "a config file does not name another one",
    "pricing": "pricing knobs go in the [pricing] section, one key each",
}


class ConfigError(CodedError):
    """A config file that cannot be used; nothing was started."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_CONFIG, message)


@dataclass(frozen=True)
class LoadedConfig:
    """A config file as read: its path and its sections (the role's, validated)."""

    path: Path
    sections: Mapping[str, Mapping[str, Any]]


def read_config(path: Path, *, known_sections: Iterable[str]) -> LoadedConfig:
    """Parse ``path`` as TOML whose top-level tables are all in ``known_sections``."""
    try:
        document = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    known = list(known_sections)
    for name, table in document.items():
        if name not in known:
            raise ConfigError(f"{path}: unknown section [{name}]{_hint(name, known)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: `{name}` must be a section ([{name}]), not a value")
    return LoadedConfig(path, document)


def _hint(name: str, known: Iterable[str]) -> str:
    options = list(known)
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def load_into_context(
    ctx: typer.Context, param: typer.CallbackParam, value: Path | None
) -> Path | None:
    """The ``--config`` callback (eager): check the file's section for the command against its
    options, convert each value as the option would, and make them the options' defaults, so
    the environment and the command line still override them."""
    if value is None:
        return None
    command = " ".join(ctx.command_path.split()[1:])
    section = SECTIONS[command]
    # One file may serve several roles: each reads its sections and leaves the others'.
    known = [*SECTIONS.values(), *(s for extra in EXTRA_SECTIONS.values() for s in extra)]
    loaded = read_config(value, known_sections=known)
    options = {p.name: p for p in ctx.command.params if p.name and p.name not in ("help",)}
    settable = [n for n in options if n not in _NOT_IN_FILES]
    defaults: dict[str, Any] = {}
    for key, raw in loaded.sections.get(section, {}).items():
        where = f"{value}: [{section}] {key}"
        if key in _NOT_IN_FILES:
            raise ConfigError(f"{where}: {_NOT_IN_FILES[key]}")
        if section == "coordinator" and key in PRICING_OPTIONS:
            knob = PRICING_OPTIONS[key]
            raise ConfigError(f"{where}: a pricing knob: write `{knob}` in the [pricing] section")
        if key not in options:
            raise ConfigError(f"{where}: no such setting{_hint(key, settable)}")
        try:
            options[key].process_value(ctx, raw if isinstance(raw, list) else _flag_text(raw))
        except typer.BadParameter as exc:
            raise ConfigError(f"{where} = {raw!r}: {_reason(exc)}") from None
        defaults[key] = raw if isinstance(raw, list) else _flag_text(raw)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["fedledger.config"] = loaded
    return value


def _flag_text(raw: object) -> object:
    """A TOML value as the option's parser takes it (booleans and paths as they are)."""
    return raw if isinstance(raw, bool) else str(raw)


def _reason(exc: typer.BadParameter) -> str:
    """click's ``Invalid value for '--port': why`` without the flag: the file's key is named."""
    message = exc.format_message()
    return message.split(": ", 1)[1] if message.startswith("Invalid value") else message


def loaded_config(ctx: typer.Context) -> LoadedConfig | None:
    """The config file ``--config`` read for this command, if any."""
    loaded: LoadedConfig | None = ctx.meta.get("fedledger.config")
    return loaded


def file_knobs(ctx: typer.Context, knobs: Iterable[str]) -> dict[str, tuple[object, str]]:
    """Pricing knobs from the file's [pricing] section, then the environment
    (``FEDLEDGER_PRICING_<KNOB>``), each with where it came from; unknown knobs refused."""
    known = list(knobs)
    chosen: dict[str, tuple[object, str]] = {}
    loaded = loaded_config(ctx)
    if loaded is not None:
        for knob, value in loaded.sections.get("pricing", {}).items():
            if knob not in known:
                raise ConfigError(
                    f"{loaded.path}: [pricing] {knob}: no such pricing knob{_hint(knob, known)}"
                )
            chosen[knob] = (value, str(loaded.path))
    for name, value in os.environ.items():
        if not name.startswith(PRICING_ENV_PREFIX):
            continue
        knob = name.removeprefix(PRICING_ENV_PREFIX).lower()
        if knob not in known:
            raise ConfigError(f"{name}: no such pricing knob{_hint(knob, known)}")
        chosen[knob] = (value, f"env {name}")
    return chosen


def source_of(ctx: typer.Context, name: str) -> str:
    """Where an option's value came from: ``flag``, ``env NAME``, the config file, ``default``."""
    source = ctx.get_parameter_source(name)
    kind = source.name if source is not None else "DEFAULT"
    if kind == "COMMANDLINE":
        return "flag"
    if kind == "ENVIRONMENT":
        param = next(p for p in ctx.command.params if p.name == name)
        envvar = param.envvar or f"{ctx.auto_envvar_prefix}_{name.upper()}"
        return f"env {envvar if isinstance(envvar, str) else envvar[0]}"
    if kind == "DEFAULT_MAP":
        loaded = loaded_config(ctx)
        return str(loaded.path) if loaded is not None else "config"
    return "default"


def masked(name: str, value: object) -> str:
    """A setting as printed at start-up: secrets hidden, an RPC URL without its credentials or
    path (a provider's API key often sits there)."""
    if value is None:
        return "-"
    if name in ("key", "password"):
        return "***"
    if name == "rpc" and isinstance(value, str):
        parts = urlsplit(value)
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        hidden = "/***" if parts.path.strip("/") or parts.query else ""
        return urlunsplit((parts.scheme, netloc, hidden, "", ""))
    return str(value)

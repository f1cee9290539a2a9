"""configure_logging: levels by logger, the text format as it was, and one JSON object a line."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from fedledger.coordinator.results import RoundSummary
from fedledger.logs import HANDLER_NAME, access_log_enabled, configure_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root and fedledger loggers back as they were (pytest's own handlers included)."""
    root, ours = logging.getLogger(), logging.getLogger("fedledger")
    handlers, level, our_level = list(root.handlers), root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


def configured(*, verbose: bool = False, log_format: str = "text") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(verbose=verbose, log_format=log_format, stream=stream)  # type: ignore[arg-type]
    return stream


def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    stream = configured(log_format="json")
    summary = RoundSummary(
        round_id=4,
        outcome="settled",
        organisations=3,
        committed=3,
        uploaded=3,
        aggregated=2,
        metrics={"accuracy": 0.9},
        paid_units=12 * 10**18 + 5 * 10**17,
        flags={"copied_update": 1},
    )
    before = datetime.now(UTC)
    logging.getLogger("fedledger.coordinator").info(summary.message(), extra=summary.fields())
    logging.getLogger("fedledger.node").warning("round %d: upload refused", 5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    stamp = datetime.fromisoformat(first["time"])
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)
    assert first["level"] == "INFO" and first["logger"] == "fedledger.coordinator"
    assert first["message"] == summary.message()
    assert first["round_id"] == 4 and first["outcome"] == "settled"
    assert first["aggregated"] == 2 and first["committed"] == 3
    assert first["paid_units"] == "12500000000000000000"  # exact: a decimal string
    assert first["paid_tokens"] == "12.5"
    assert first["metrics"] == {"accuracy": 0.9} and first["flags"] == {"copied_update": 1}
    assert first["reason"] is None
    assert second["level"] == "WARNING" and second["logger"] == "fedledger.node"
    assert second["message"] == "round 5: upload refused"
    assert "args" not in second and "msg" not in second and "round_id" not in second


def test_json_lines_carry_the_traceback_on_one_line() -> None:
    stream = configured(log_format="json")
    try:
        raise ValueError("bad tensor")
    except ValueError:
        logging.getLogger("fedledger.coordinator").exception("round driver failed")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["message"] == "round driver failed"
    assert "ValueError: bad tensor" in record["exception"]


def test_text_format_is_time_level_logger_message() -> None:
    stream = configured()
    logging.getLogger("fedledger.coordinator").info("round %d open", 1)
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO fedledger\.coordinator: round 1 open", line
    ), line


def test_without_verbose_fedledger_speaks_at_info_and_libraries_at_warning() -> None:
    stream = configured()
    logging.getLogger("fedledger.node").info("ours")
    logging.getLogger("somelib.server").info("theirs, info")
    logging.getLogger("web3.providers").info("theirs too")
    logging.getLogger("somelib.server").warning("theirs, warning")
    logging.getLogger("fedledger.node").debug("ours, debug")
    shown = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]
    assert shown == ["ours", "theirs, warning"]


def test_verbose_shows_every_logger_at_info() -> None:
    stream = configured(verbose=True)
    logging.getLogger("somelib.server").info("theirs, info")
    logging.getLogger("fedledger.node").info("ours")
    shown = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]
    assert shown == ["theirs, info", "ours"]


def test_configuring_again_replaces_the_handler_and_leaves_others() -> None:
    root = logging.getLogger()
    others = [h for h in root.handlers if h.get_name() != HANDLER_NAME]
    first = configured(log_format="json")
    second = configured()
    assert len([h for h in root.handlers if h.get_name() == HANDLER_NAME]) == 1
    assert [h for h in root.handlers if h.get_name() != HANDLER_NAME] == others
    logging.getLogger("fedledger").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().endswith("INFO fedledger: once\n")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configured(log_format="xml")


def test_uvicorn_access_log_only_when_verbose() -> None:
    assert access_log_enabled(verbose=False) is False
    assert access_log_enabled(verbose=True) is True

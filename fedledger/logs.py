"""Log output for fedledger's commands: levels, and a text or JSON-lines format on stderr."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The text format: time, level, logger and message."""

_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName", "color_message"}
"""What every LogRecord carries (and uvicorn's coloured copy of a message); anything else on a
record came from ``extra=``."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO-8601, UTC), level, logger, message, the fields
    given with ``extra=``, and the traceback of an exception, if any."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


HANDLER_NAME = "fedledger"
"""The name of the handler ``configure_logging`` installs on the root logger."""


def configure_logging(
    *, verbose: bool, log_format: LogFormat, stream: TextIO | None = None
) -> None:
    """Send log records to ``stream`` (stderr) in ``log_format``: fedledger's at INFO and up;
    other libraries' at WARNING and up, or at INFO too when ``verbose``. Calling it again
    replaces what an earlier call set up; other handlers are left alone."""
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r}: use 'text' or 'json'")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()  # a StreamHandler leaves its stream open
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("fedledger").setLevel(logging.INFO)


def access_log_enabled(*, verbose: bool) -> bool:
    """Whether uvicorn should log every request (``uvicorn.run(access_log=...)``): only when
    ``verbose``."""
    return verbose

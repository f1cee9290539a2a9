"""Named crash points for fault-injection tests: the process kills itself with SIGKILL there.

Set ``FEDLEDGER_FAILPOINTS=name[,name...]`` in a coordinator's or node's environment; unset (the
default) every failpoint is a no-op. Used by the crash tests to stop the coordinator at exact
moments (between fsync and commit, between a mined transaction and its record) that an
external ``kill -9`` could only hit by luck.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "FEDLEDGER_FAILPOINTS"

UPLOAD_AFTER_BLOB = "upload.after_blob"  # the update file is durable, its row is not
CLOSE_AFTER_AGGREGATE = "close.after_aggregate"  # the new model is stored, nothing settled
CLOSE_AFTER_FINALIZE_TX = "close.after_finalize_tx"  # finalizeRound mined, not yet recorded
OPEN_AFTER_TX = "open.after_tx"  # openRound mined, not yet recorded
NODE_AFTER_COMMIT = "node.after_commit"  # the node committed on-chain, has not uploaded
BOOKS_BEFORE_ANSWER = "books.before_answer"  # the books process closed a round, has not answered


def failpoint(name: str) -> None:
    """Die here, at once and without cleanup, if ``name`` is armed in the environment."""
    armed = os.environ.get(ENV_VAR, "")
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)

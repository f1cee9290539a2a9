"""Durable coordinator state: SQLite for records, content-addressed files for tensors.

A write is acknowledged only after the file is fsync'd and renamed into place and the
database transaction has committed, so an acknowledged update survives a crash.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedledger.wire import RoundStatus

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    model_hash TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    extensions INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    new_model_hash TEXT,
    result_json TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round_id INTEGER NOT NULL,
    organisation TEXT NOT NULL,
    update_hash TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    nonce TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (round_id, organisation)
);
CREATE TABLE IF NOT EXISTS nonces (
    organisation TEXT NOT NULL,
    nonce TEXT NOT NULL,
    PRIMARY KEY (organisation, nonce)
);
"""


@dataclass(frozen=True)
class StoredRound:
    round_id: int
    model_hash: str
    deadline: int
    status: RoundStatus
    new_model_hash: str | None
    result: dict[str, Any] | None
    extensions: int = 0


@dataclass(frozen=True)
class StoredUpdate:
    round_id: int
    organisation: str
    update_hash: str
    num_samples: int
    nonce: str
    received_at: float


class Store:
    """The coordinator's data directory: ``state.sqlite3`` plus ``blobs/<keccak hex>.safetensors``."""

    def __init__(self, data_dir: Path, *, read_only: bool = False) -> None:
        """Open (creating if needed) the data directory. ``read_only`` opens an existing one
        without touching it, for an auditor reading a live coordinator's directory."""
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self._lock = threading.RLock()
        database = self.data_dir / "state.sqlite3"
        if read_only:
            if not database.exists():
                raise FileNotFoundError(f"no coordinator state in {self.data_dir}")
            self._db = sqlite3.connect(
                f"{database.resolve().as_uri()}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
            return
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._remove_partial_blobs()
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable unit of writes (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ blobs

    def _remove_partial_blobs(self) -> None:
        for partial in self.blob_dir.glob("*.part"):
            partial.unlink(missing_ok=True)

    def blob_path(self, digest_hex: str) -> Path:
        return self.blob_dir / f"{digest_hex.removeprefix('0x').lower()}.safetensors"

    def put_blob(self, digest_hex: str, data: bytes) -> Path:
        """Write ``data`` under its hash durably: temp file, fsync, rename, fsync the directory."""
        path = self.blob_path(digest_hex)
        if path.exists() and path.stat().st_size == len(data):
            return path
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.blob_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    def collect_garbage(self) -> int:
        """Delete blobs no record refers to (an upload interrupted between fsync and commit).

        Run at start-up, before any request is served; returns how many files were removed.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT update_hash FROM updates UNION SELECT model_hash FROM rounds"
                " UNION SELECT new_model_hash FROM rounds WHERE new_model_hash IS NOT NULL"
                " UNION SELECT substr(key, 12) FROM meta WHERE key LIKE 'validation:%'"
            ).fetchall()
        referenced = {self.blob_path(str(row[0])).name for row in rows}
        removed = 0
        for path in self.blob_dir.glob("*.safetensors"):
            if path.name not in referenced:
                path.unlink()
                removed += 1
        return removed

    def get_blob(self, digest_hex: str) -> bytes | None:
        path = self.blob_path(digest_hex)
        return path.read_bytes() if path.exists() else None

    # ------------------------------------------------------------------- meta

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def keep_task(self, spec_hash: str, spec_text: str, spec_path: Path | None) -> None:
        """Record the task spec the coordinator runs (its text, and where its file was, for
        plug-ins imported relative to it): what ``fedledger audit`` loads by default."""
        with self.transaction() as db:
            for key, value in (
                (f"task_spec:{spec_hash}", spec_text),
                (f"task_spec_path:{spec_hash}", str(spec_path or "")),
            ):
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def task_spec(self, spec_hash: str) -> tuple[str, str | None] | None:
        """The text and file path of the task spec with ``spec_hash`` kept by ``keep_task``."""
        text = self.get_meta(f"task_spec:{spec_hash}")
        if text is None:
            return None
        return text, self.get_meta(f"task_spec_path:{spec_hash}") or None

    def keep_validation(self, validation_hash: str, data: bytes) -> None:
        """Keep the validation set's canonical bytes (a blob no round refers to, so marked in
        ``meta`` for the garbage collector): the audit re-scores rounds on it."""
        self.put_blob(validation_hash, data)
        self.set_meta(f"validation:{validation_hash}", "1")

    # ----------------------------------------------------------------- rounds

    def add_round(self, round_id: int, model_hash: str, deadline: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO rounds (round_id, model_hash, deadline, status)"
                " VALUES (?, ?, ?, 'open')",
                (round_id, model_hash, deadline),
            )

    def set_round_status(
        self,
        round_id: int,
        status: RoundStatus,
        *,
        new_model_hash: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET status = ?, new_model_hash = COALESCE(?, new_model_hash),"
                " result_json = COALESCE(?, result_json) WHERE round_id = ?",
                (
                    status.value,
                    new_model_hash,
                    None if result is None else json.dumps(result),
                    round_id,
                ),
            )

    def set_deadline(self, round_id: int, deadline: int, *, extensions: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET deadline = ?, extensions = ? WHERE round_id = ?",
                (deadline, extensions, round_id),
            )

    def get_round(self, round_id: int) -> StoredRound | None:
        with self._lock:
            row = self._db.execute(
                "SELECT round_id, model_hash, deadline, status, new_model_hash, result_json,"
                " extensions"
                " FROM rounds WHERE round_id = ?",
                (round_id,),
            ).fetchone()
        return None if row is None else _round(row)

    def is_global_model(self, digest_hex: str) -> bool:
        """Whether ``digest_hex`` is a round's global model (its start or its result)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM rounds WHERE model_hash = ? OR new_model_hash = ? LIMIT 1",
                (digest_hex, digest_hex),
            ).fetchone()
        return row is not None

    def latest_round(self) -> StoredRound | None:
        with self._lock:
            row = self._db.execute(
                "SELECT round_id, model_hash, deadline, status, new_model_hash, result_json,"
                " extensions"
                " FROM rounds ORDER BY round_id DESC LIMIT 1"
            ).fetchone()
        return None if row is None else _round(row)

    # ---------------------------------------------------------------- updates

    def insert_update(self, update: StoredUpdate) -> tuple[StoredUpdate, bool]:
        """Record an accepted update and burn its nonce, atomically; True if it was new.

        If the organisation already has an update in the round, nothing is written and the
        stored one is returned with False (the caller compares hashes).
        """
        with self.transaction() as db:
            existing = db.execute(
                "SELECT round_id, organisation, update_hash, num_samples, nonce, received_at"
                " FROM updates WHERE round_id = ? AND organisation = ?",
                (update.round_id, update.organisation),
            ).fetchone()
            if existing is not None:
                return StoredUpdate(*existing), False
            db.execute(
                "INSERT INTO updates (round_id, organisation, update_hash, num_samples, nonce, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    update.round_id,
                    update.organisation,
                    update.update_hash,
                    update.num_samples,
                    update.nonce,
                    update.received_at,
                ),
            )
            db.execute(
                "INSERT OR IGNORE INTO nonces (organisation, nonce) VALUES (?, ?)",
                (update.organisation, update.nonce),
            )
        return update, True

    def get_update(self, round_id: int, organisation: str) -> StoredUpdate | None:
        with self._lock:
            row = self._db.execute(
                "SELECT round_id, organisation, update_hash, num_samples, nonce, received_at"
                " FROM updates WHERE round_id = ? AND organisation = ?",
                (round_id, organisation),
            ).fetchone()
        return None if row is None else StoredUpdate(*row)

    def updates_for(self, round_id: int) -> list[StoredUpdate]:
        """The round's accepted updates, sorted by organisation address (the books take them in
        on-chain commit order: ``fedledger.coordinator.inputs``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round_id, organisation, update_hash, num_samples, nonce, received_at"
                " FROM updates WHERE round_id = ? ORDER BY lower(organisation)",
                (round_id,),
            ).fetchall()
        return [StoredUpdate(*row) for row in rows]

    def nonce_used(self, organisation: str, nonce: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM nonces WHERE organisation = ? AND nonce = ?", (organisation, nonce)
            ).fetchone()
        return row is not None


def _round(row: tuple[Any, ...]) -> StoredRound:
    round_id, model_hash, deadline, status, new_model_hash, result_json, extensions = row
    return StoredRound(
        round_id=int(round_id),
        model_hash=str(model_hash),
        deadline=int(deadline),
        status=RoundStatus(status),
        new_model_hash=new_model_hash,
        result=None if result_json is None else json.loads(result_json),
        extensions=int(extensions),
    )

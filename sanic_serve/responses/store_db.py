"""The responses store's SQLite file: its tables, and a connection set up the way every worker
shares it (WAL mode, a busy timeout, pages handed back to the file system as rows go)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 1
# A writer that finds the file locked waits this long before giving up (transactions last
# milliseconds; this only matters when many workers write at the same moment).
BUSY_TIMEOUT_MS = 10_000
# Pages of the write-ahead log before a checkpoint copies them into the database: at most this
# share of the bound (and SQLite's own default, 1000 pages, for large bounds).
_WAL_SHARE = 0.25
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: eviction takes the lowest first
    id TEXT NOT NULL UNIQUE,
    previous_id TEXT,
    status TEXT NOT NULL,
    created_s REAL NOT NULL,
    expires_s REAL,                         -- NULL: no TTL
    cancel INTEGER NOT NULL DEFAULT 0,      -- a cancel was asked for (by any worker)
    lease_s REAL,                           -- running: its runner reports again before this time
    body_bytes INTEGER NOT NULL,            -- body, items and events: what evicting it frees
    body BLOB NOT NULL                      -- the response without ``output``
);
CREATE TABLE IF NOT EXISTS items (
    response_seq INTEGER NOT NULL REFERENCES responses(seq) ON DELETE CASCADE,
    kind INTEGER NOT NULL,                  -- 0: input item, 1: output item
    position INTEGER NOT NULL,
    item_id TEXT,
    body BLOB NOT NULL,
    PRIMARY KEY (response_seq, kind, position)
);
CREATE INDEX IF NOT EXISTS items_by_id ON items(item_id);
CREATE TABLE IF NOT EXISTS events (
    response_seq INTEGER NOT NULL REFERENCES responses(seq) ON DELETE CASCADE,
    sequence_number INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (response_seq, sequence_number)
);
"""


class StoreError(Exception):
    """The database cannot be opened or used (its message is fit for the start-up error line)."""


def connect(path: Path, max_bytes: int) -> tuple[sqlite3.Connection, int]:
    """A connection to the store at ``path`` (made, with its folder, if missing) and its page size.
    Usable from several threads; transactions are explicit (``write``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        return db, _setup(db, path, max_bytes)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open the responses database {path}: {exc}") from exc


def _setup(db: sqlite3.Connection, path: Path, max_bytes: int) -> int:
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA foreign_keys = ON")
    # Only takes effect before the first table exists; the file is always made with it.
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"the responses database {path} cannot use WAL mode (its file system?)")
    db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
    page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    wal_pages = max(16, min(1000, int(max_bytes * _WAL_SHARE) // page_size))
    db.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
    db.execute(f"PRAGMA journal_size_limit = {wal_pages * page_size}")
    with write(db):
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the responses database {path} was written by a newer hfserve; "
                "move it away or point --responses-db elsewhere"
            )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return page_size


@contextmanager
def write(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once (``IMMEDIATE``), so that two workers never both read
    and then both try to upgrade to a write lock (which would fail one of them)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")

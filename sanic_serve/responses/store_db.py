"""The responses store's SQLite file: its tables, and a connection set up the way every worker
shares it (WAL mode, a busy timeout, pages handed back to the file system as rows go)."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("hfserve")

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


def files_bytes(path: Path) -> int:
    """What the store takes on disk: the database file, its write-ahead log and the log's index
    (``-wal`` and ``-shm``), all three counted against the bound."""
    total = 0
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        try:
            total += os.stat(path.with_name(name)).st_size
        except FileNotFoundError:
            pass
    return total


def footprint_bytes(db: sqlite3.Connection, path: Path, page_size: int) -> int:
    """The store's size on disk as the bound sees it: the three files, where the database file
    counts at least its live pages (rows written since the last checkpoint are in the log, pages
    freed since then are still in the file)."""
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    on_disk = files_bytes(path)
    try:
        main_file = os.stat(path).st_size
    except FileNotFoundError:
        main_file = 0
    return on_disk + max(0, (pages - free) * page_size - main_file)


def wal_bytes(path: Path) -> int:
    try:
        return os.stat(path.with_name(path.name + "-wal")).st_size
    except FileNotFoundError:
        return 0


def fold_wal(db: sqlite3.Connection) -> None:
    """Copy the log into the database file and truncate the log to nothing. It waits (the busy
    timeout) for readers of older pages, which only ever hold them for one short statement."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.OperationalError:  # busy: another connection checkpoints; the next write retries
        pass


@dataclass
class Bound:
    """Keeps one connection's store under ``max_bytes`` on disk (called with the store's lock)."""

    db: sqlite3.Connection
    path: Path
    page_size: int
    max_bytes: int

    def footprint(self) -> int:
        return footprint_bytes(self.db, self.path, self.page_size)

    def make_room(self, incoming_bytes: int) -> None:
        """Evict expired responses, then the oldest finished ones, until ``incoming_bytes`` more
        (plus the slack of page fill and indexes) fit under the bound, the log counted."""
        # Rows share pages and carry index entries: count what is written at one and a half times
        # its size, and never aim above the bound less one page per table and index. The write
        # lands in the log first, beside the file: the pair must fit, so the log is folded into
        # the file (and truncated) whenever it stands in the way, before anything is evicted.
        need = int(incoming_bytes * 1.5) + 4 * self.page_size
        with write(self.db) as db:
            db.execute("DELETE FROM responses WHERE expires_s IS NOT NULL AND expires_s <= ?", (time.time(),))
        for _ in range(64):  # each round frees at least one response; bounded so it cannot spin
            excess = self.footprint() + need - self.max_bytes
            if excess > 0 and wal_bytes(self.path) > 0:
                fold_wal(self.db)
                excess = self.footprint() + need - self.max_bytes
            if excess <= 0:
                return
            if not self.evict_oldest(excess):
                return

    def evict_oldest(self, excess_bytes: int) -> bool:
        """Delete the oldest responses not running (a running one holds a lease its worker keeps
        renewing) whose sizes add up to ``excess_bytes`` (at least one); False when nothing is left
        to evict."""
        with write(self.db) as db:
            rows = db.execute(
                "SELECT seq, body_bytes FROM responses WHERE lease_s IS NULL OR lease_s < ? ORDER BY seq",
                (time.time(),),
            ).fetchall()
            if not rows:
                return False
            victims, freed = [], 0
            for seq, size in rows:
                victims.append((seq,))
                freed += int(size)
                if freed >= excess_bytes:
                    break
            db.executemany("DELETE FROM responses WHERE seq = ?", victims)
        log.info(
            "responses store: evicted %d oldest response(s) to stay under %d bytes",
            len(victims),
            self.max_bytes,
        )
        self.shrink()
        return True

    def shrink(self) -> None:
        """Give the free pages back to the file system and fold the log into the file."""
        if int(self.db.execute("PRAGMA freelist_count").fetchone()[0]) == 0:
            return
        # Frees one page per step: run it to the end (execute() would step it once).
        self.db.executescript("PRAGMA incremental_vacuum;")
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

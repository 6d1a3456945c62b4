"""Stored responses: one SQLite file shared by every HTTP worker.

Each worker opens its own connection (``ResponseStore``) at start-up. The file is in WAL mode, so
readers never wait for a writer, and every write is one short ``BEGIN IMMEDIATE`` transaction, so
workers writing at once queue for a few milliseconds at most (``busy_timeout`` covers the wait).

Layout: ``responses`` holds a response's body without its ``output``; its input and output items
are rows of ``items`` (so ``item_reference`` finds any item by id without a second copy of the
output), and a background response's stream events are rows of ``events``. Rows of a response go
with it (foreign keys, ``ON DELETE CASCADE``).

Bound: the database file is kept under ``max_bytes``. Before a write the oldest finished responses
are evicted until the new one fits, and the freed pages are handed back to the file system
(``auto_vacuum = INCREMENTAL``); the write-ahead log is checkpointed and truncated to a small share
of the bound. Responses still running (``queued``, ``in_progress``) are never evicted. With
``ttl_s``, a response older than that is gone as if deleted.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sanic_serve.responses.store_db import StoreError as StoreError  # re-exported: callers catch it here
from sanic_serve.responses.store_db import connect, write

log = logging.getLogger("hfserve")

RUNNING_STATUSES = ("queued", "in_progress")
# A running background response whose worker has not reported for this long (the worker died, the
# server was stopped) is failed: no one will ever finish it. Runners report every few seconds.
LEASE_S = 30.0
INTERRUPTED_MESSAGE = "The response was interrupted: the server stopped or restarted while it ran."
_INPUT, _OUTPUT = 0, 1


@dataclass
class StoredTurn:
    """One stored response of a chain: what it was asked (``input_items``), what it answered
    (``output_items``) and its own ``instructions`` (a new request does not inherit them)."""

    response_id: str
    input_items: list[dict[str, Any]] = field(default_factory=list)
    output_items: list[dict[str, Any]] = field(default_factory=list)
    instructions: Any = None
    status: str = "completed"


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items as stored: every one has an ``id`` (the input items list and ``item_reference`` need
    one); an item the caller sent without one gets a fresh id."""
    out = []
    for item in items:
        if not item.get("id"):
            prefix = "msg" if item.get("type", "message") == "message" else "item"
            item = {**item, "id": f"{prefix}_{uuid.uuid4().hex}"}
        out.append(item)
    return out


class ResponseStore:
    """Stored responses, their input items and a background response's events (see the module
    docstring). Methods are short blocking calls; one instance may be used from several threads."""

    def __init__(self, path: Path, max_bytes: int, ttl_s: float | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._db, self.page_size = connect(self.path, self.max_bytes)
        with self._lock:
            self._make_room(0)  # started with a lower bound than before: shrink to it now

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return write(self._db)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
            self._db.close()

    # -- writing ---------------------------------------------------------------------------------
    def save(
        self,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        *,
        previous_response_id: str | None,
        create: bool = True,
    ) -> None:
        """Insert the response (by ``response["id"]``) with this request's own input items, or
        update it, keeping its place in the eviction order and a pending cancel. ``create=False``
        only updates: a background run reporting progress does not bring back a response that was
        deleted or evicted meanwhile."""
        response_id = str(response["id"])
        body = _dumps({k: v for k, v in response.items() if k != "output"})
        inputs = [(i, item.get("id"), _dumps(item)) for i, item in enumerate(_with_ids(input_items))]
        outputs = [(i, item.get("id"), _dumps(item)) for i, item in enumerate(response.get("output") or [])]
        size = len(body) + sum(len(b) for _, _, b in inputs) + sum(len(b) for _, _, b in outputs)
        now = time.time()
        status = str(response.get("status") or "completed")
        lease = now + LEASE_S if status in RUNNING_STATUSES else None
        with self._lock:
            self._make_room(size)
            with self._write() as db:
                row = db.execute("SELECT seq FROM responses WHERE id = ?", (response_id,)).fetchone()
                if row is None and not create:
                    return
                if row is None:
                    expires = now + self.ttl_s if self.ttl_s is not None else None
                    seq = db.execute(
                        "INSERT INTO responses"
                        " (id, previous_id, status, created_s, expires_s, lease_s, body_bytes, body)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (response_id, previous_response_id, status, now, expires, lease, size, body),
                    ).lastrowid
                else:
                    seq = row[0]
                    db.execute(
                        "UPDATE responses SET status = ?, lease_s = ?, body_bytes = ?, body = ?"
                        " WHERE seq = ?",
                        (status, lease, size, body, seq),
                    )
                    db.execute("DELETE FROM items WHERE response_seq = ?", (seq,))
                db.executemany(
                    "INSERT INTO items (response_seq, kind, position, item_id, body) VALUES (?, ?, ?, ?, ?)",
                    [(seq, _INPUT, *row_) for row_ in inputs] + [(seq, _OUTPUT, *row_) for row_ in outputs],
                )
            self._make_room(0)  # the estimate can fall short: evict more (this one too, if alone too big)
            self._shrink()

    def append_events(self, response_id: str, events: list[dict[str, Any]]) -> None:
        """Keep a background response's stream events (by their ``sequence_number``), for
        ``GET /v1/responses/{id}?stream=true``. Events of an unknown response are dropped."""
        if not events:
            return
        rows = [(int(e["sequence_number"]), _dumps(e)) for e in events]
        size = sum(len(b) for _, b in rows)
        with self._lock:
            self._make_room(size)
            with self._write() as db:
                row = db.execute("SELECT seq FROM responses WHERE id = ?", (response_id,)).fetchone()
                if row is None:
                    return
                db.executemany(
                    "INSERT OR REPLACE INTO events (response_seq, sequence_number, body) VALUES (?, ?, ?)",
                    [(row[0], n, b) for n, b in rows],
                )
                db.execute("UPDATE responses SET body_bytes = body_bytes + ? WHERE seq = ?", (size, row[0]))
            self._shrink()

    def heartbeat(self, response_id: str) -> None:
        """A running response's worker is still at it (see ``LEASE_S``)."""
        with self._lock, self._write() as db:
            db.execute(
                "UPDATE responses SET lease_s = ? WHERE id = ? AND lease_s IS NOT NULL",
                (time.time() + LEASE_S, response_id),
            )

    def delete(self, response_id: str) -> bool:
        """Remove a response with its items and events; False when there was none (or it had
        expired)."""
        with self._lock:
            with self._write() as db:
                found = self._live_seq(response_id) is not None
                db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            self._shrink()
        return found

    def request_cancel(self, response_id: str) -> bool:
        """Ask the worker running a background response to stop it (any worker may ask); False
        when there is no such response."""
        with self._lock, self._write() as db:
            if self._live_seq(response_id) is None:
                return False
            db.execute("UPDATE responses SET cancel = 1 WHERE id = ?", (response_id,))
            return True

    def cancel_requested(self, response_id: str) -> bool:
        """True once a cancel was asked for, and also when the response is gone (deleted or
        evicted): its runner has nothing left to report to and should stop."""
        with self._lock:
            row = self._db.execute(
                "SELECT cancel, expires_s FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return row is None or bool(row[0]) or self._expired(row[1])

    # -- reading ---------------------------------------------------------------------------------
    def get(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            self._fail_orphan(response_id)
            seq_body = self._live_row(response_id)
            if seq_body is None:
                return None
            seq, body = seq_body
            response: dict[str, Any] = orjson.loads(body)
            response["output"] = self._items(seq, _OUTPUT)
        return response

    def status(self, response_id: str) -> str | None:
        """The response's status alone (cheap: a poll while waiting for a cancel to land)."""
        with self._lock:
            self._fail_orphan(response_id)
            row = self._db.execute(
                "SELECT status, expires_s FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return None if row is None or self._expired(row[1]) else str(row[0])

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        """This request's own input items, in the order they were sent."""
        with self._lock:
            seq = self._live_seq(response_id)
            return None if seq is None else self._items(seq, _INPUT)

    def chain(self, response_id: str) -> list[StoredTurn] | None:
        """The stored conversation that ends with ``response_id``, oldest first, followed through
        each response's ``previous_response_id``; None when it or any link is gone."""
        turns: list[StoredTurn] = []
        seen: set[str] = set()
        current: str | None = response_id
        with self._lock:
            while current is not None:
                if current in seen:  # cannot be made through the API; a damaged file must not hang us
                    return None
                seen.add(current)
                row = self._db.execute(
                    "SELECT seq, previous_id, status, expires_s, body FROM responses WHERE id = ?", (current,)
                ).fetchone()
                if row is None or self._expired(row[3]):
                    return None
                seq, previous, status, _, body = row
                turns.append(
                    StoredTurn(
                        response_id=current,
                        input_items=self._items(seq, _INPUT),
                        output_items=self._items(seq, _OUTPUT),
                        instructions=orjson.loads(body).get("instructions"),
                        status=str(status),
                    )
                )
                current = previous
        turns.reverse()
        return turns

    def item(self, item_id: str) -> dict[str, Any] | None:
        """An input or output item of any live stored response, by its id (the latest copy: a
        client that replays its history stores the same item again)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.body, r.expires_s FROM items i JOIN responses r ON r.seq = i.response_seq"
                " WHERE i.item_id = ? ORDER BY i.response_seq DESC",
                (item_id,),
            ).fetchall()
        for body, expires in rows:
            if not self._expired(expires):
                found: dict[str, Any] = orjson.loads(body)
                return found
        return None

    def events_after(self, response_id: str, after: int) -> list[dict[str, Any]]:
        """Stored events with a ``sequence_number`` above ``after``, in order."""
        with self._lock:
            seq = self._live_seq(response_id)
            if seq is None:
                return []
            rows = self._db.execute(
                "SELECT body FROM events WHERE response_seq = ? AND sequence_number > ?"
                " ORDER BY sequence_number",
                (seq, after),
            ).fetchall()
        return [orjson.loads(b) for (b,) in rows]

    def size_bytes(self) -> int:
        """Bytes the database's pages take (what the bound holds), free pages not counted."""
        with self._lock:
            return self._used_bytes()

    # -- internals (called with the lock held) ---------------------------------------------------
    def _expired(self, expires_s: float | None) -> bool:
        return expires_s is not None and expires_s <= time.time()

    def _live_row(self, response_id: str) -> tuple[int, bytes] | None:
        row = self._db.execute(
            "SELECT seq, expires_s, body FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        if row is None or self._expired(row[1]):
            return None
        return int(row[0]), row[2]

    def _fail_orphan(self, response_id: str) -> None:
        """A running response whose runner stopped reporting becomes ``failed`` (once)."""
        row = self._db.execute(
            "SELECT seq, body FROM responses WHERE id = ? AND lease_s IS NOT NULL AND lease_s < ?",
            (response_id, time.time()),
        ).fetchone()
        if row is None:
            return
        body = orjson.loads(row[1])
        body.update(status="failed", error={"code": "server_error", "message": INTERRUPTED_MESSAGE})
        with self._write() as db:
            db.execute(
                "UPDATE responses SET status = 'failed', lease_s = NULL, body = ?"
                " WHERE seq = ? AND lease_s < ?",
                (_dumps(body), row[0], time.time()),
            )
        log.warning("background response %s was interrupted (its worker stopped); marked failed", response_id)

    def _live_seq(self, response_id: str) -> int | None:
        row = self._db.execute("SELECT seq, expires_s FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None or self._expired(row[1]) else int(row[0])

    def _items(self, seq: int, kind: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT body FROM items WHERE response_seq = ? AND kind = ? ORDER BY position", (seq, kind)
        ).fetchall()
        return [orjson.loads(b) for (b,) in rows]

    def _used_bytes(self) -> int:
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self.page_size

    def _make_room(self, incoming_bytes: int) -> None:
        """Evict expired responses, then the oldest finished ones, until ``incoming_bytes`` more
        (plus the slack of page fill and indexes) fit under the bound."""
        # Rows share pages and carry index entries: count what is written at one and a half times
        # its size, and never aim above the bound less one page per table and index.
        need = int(incoming_bytes * 1.5) + 4 * self.page_size
        with self._write() as db:
            db.execute("DELETE FROM responses WHERE expires_s IS NOT NULL AND expires_s <= ?", (time.time(),))
        for _ in range(64):  # each round frees at least one response; bounded so it cannot spin
            excess = self._used_bytes() + need - self.max_bytes
            if excess <= 0:
                return
            if not self._evict_oldest(excess):
                return

    def _evict_oldest(self, excess_bytes: int) -> bool:
        """Delete the oldest responses not running (a running one holds a lease its worker keeps
        renewing) whose sizes add up to ``excess_bytes`` (at least one); False when nothing is left
        to evict."""
        with self._write() as db:
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
        self._shrink()
        return True

    def _shrink(self) -> None:
        """Give the free pages back to the file system and fold the log into the file."""
        if int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) == 0:
            return
        # Frees one page per step: run it to the end (execute() would step it once).
        self._db.executescript("PRAGMA incremental_vacuum;")
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

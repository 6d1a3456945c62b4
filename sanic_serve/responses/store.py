"""Stored responses: one SQLite file shared by every HTTP worker.

Each worker opens its own connection (``ResponseStore``) at start-up. The file is in WAL mode, so
readers never wait for a writer, and every write is one short ``BEGIN IMMEDIATE`` transaction, so
workers writing at once queue for a few milliseconds at most (``busy_timeout`` covers the wait).

Layout: ``responses`` holds a response's body without its ``output``; its input and output items
are rows of ``items`` (so ``item_reference`` finds any item by id without a second copy of the
output), and a background response's stream events are rows of ``events``. Rows of a response go
with it (foreign keys, ``ON DELETE CASCADE``).

Bound: the database file, its write-ahead log and the log's index (``-wal``, ``-shm``) together are
kept under ``max_bytes``. Before a write the log is folded into the file (and truncated) when it
would not fit, then the oldest finished responses are evicted until the new one fits, and the freed
pages are handed back to the file system (``auto_vacuum = INCREMENTAL``). Responses still running
(``queued``, ``in_progress``) are never evicted. With ``ttl_s``, a response older than that is gone
as if deleted.

Threads: the methods are blocking calls (a write may wait ``BUSY_TIMEOUT_MS`` for another worker,
plus a checkpoint); async code runs them with ``await store.call(store.method, ...)`` on the
store's own thread, so a slow write never stalls the worker's event loop. A lock makes any mix of
callers safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson

from sanic_serve.responses.partial import cut_short
from sanic_serve.responses.store_db import Bound, connect, write
from sanic_serve.responses.store_db import StoreError as StoreError  # re-exported: callers catch it here

log = logging.getLogger("hfserve")

RUNNING_STATUSES = ("queued", "in_progress")
# Given up on (by a cancel, or failed because its runner stopped reporting): a late save of the
# run does not bring it back, and a runner finding its response so stops.
ABANDONED_STATUSES = ("failed", "cancelled")
# A running background response whose worker has not reported for this long (the worker died, the
# server was stopped) is failed: no one will ever finish it. Runners report every few seconds.
LEASE_S = 30.0
INTERRUPTED_MESSAGE = "The response was interrupted: the server stopped or restarted while it ran."
_INPUT, _OUTPUT = 0, 1
_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass
class StoredTurn:
    """One stored response of a chain: what it was asked (``input_items``), what it answered
    (``output_items``) and its own ``instructions`` (a new request does not inherit them)."""

    response_id: str
    input_items: list[dict[str, Any]] = field(default_factory=list)
    output_items: list[dict[str, Any]] = field(default_factory=list)
    instructions: Any = None
    # As stored: ``queued`` / ``in_progress`` for a background run still going (its lease alive;
    # one whose runner stopped reporting is ``failed`` by the time the chain is read).
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
    docstring). Methods are blocking calls, safe from several threads; from async code, ``call``."""

    def __init__(self, path: Path, max_bytes: int, ttl_s: float | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._db, self.page_size = connect(self.path, self.max_bytes)
        # One thread: the calls of one worker queue here in order, as they would on the lock.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="responses-store")
        self._bound = Bound(self._db, self.path, self.page_size, self.max_bytes)
        with self._lock:
            self._bound.make_room(0)  # started with a lower bound than before: shrink to it now

    async def call(self, method: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``method(*args, **kwargs)`` (a method of this store, or code that calls them) on the
        store's own thread, awaited without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(method, *args, **kwargs))

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return write(self._db)

    def close(self) -> None:
        self._executor.shutdown(wait=True)  # calls already queued finish first
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
        deleted or evicted meanwhile. A response already ``failed`` or ``cancelled`` is not
        updated: a run that stalled past its lease and was failed stays failed."""
        response_id = str(response["id"])
        body = _dumps({k: v for k, v in response.items() if k != "output"})
        inputs = [(i, item.get("id"), _dumps(item)) for i, item in enumerate(_with_ids(input_items))]
        outputs = [(i, item.get("id"), _dumps(item)) for i, item in enumerate(response.get("output") or [])]
        size = len(body) + sum(len(b) for _, _, b in inputs) + sum(len(b) for _, _, b in outputs)
        now = time.time()
        status = str(response.get("status") or "completed")
        lease = now + LEASE_S if status in RUNNING_STATUSES else None
        with self._lock:
            self._bound.make_room(size)
            with self._write() as db:
                row = db.execute("SELECT seq, status FROM responses WHERE id = ?", (response_id,)).fetchone()
                if row is None and not create:
                    return
                if row is not None and row[1] in ABANDONED_STATUSES:
                    log.info("response %s is already %s; its late update is dropped", response_id, row[1])
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
            self._bound.make_room(0)  # the estimate can fall short: evict more (this one too, if too big)
            self._bound.shrink()

    def append_events(self, response_id: str, events: list[dict[str, Any]]) -> None:
        """Keep a background response's stream events (by their ``sequence_number``), for
        ``GET /v1/responses/{id}?stream=true``. Events of an unknown response are dropped, and so
        are those of a response already failed or cancelled (its stored stream has ended)."""
        if not events:
            return
        rows = [(int(e["sequence_number"]), _dumps(e)) for e in events]
        size = sum(len(b) for _, b in rows)
        with self._lock:
            self._bound.make_room(size)
            with self._write() as db:
                row = db.execute("SELECT seq, status FROM responses WHERE id = ?", (response_id,)).fetchone()
                if row is None or row[1] in ABANDONED_STATUSES:
                    return
                db.executemany(
                    "INSERT OR REPLACE INTO events (response_seq, sequence_number, body) VALUES (?, ?, ?)",
                    [(row[0], n, b) for n, b in rows],
                )
                db.execute("UPDATE responses SET body_bytes = body_bytes + ? WHERE seq = ?", (size, row[0]))
            self._bound.shrink()

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
            self._bound.shrink()
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
        evicted) or was failed meanwhile (its lease ran out): its runner has nothing left to
        report to and should stop."""
        with self._lock:
            row = self._db.execute(
                "SELECT cancel, expires_s, status FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return row is None or bool(row[0]) or self._expired(row[1]) or row[2] in ABANDONED_STATUSES

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
        each response's ``previous_response_id``; None when it or any link is gone. Each turn has
        its status: a link still running says so (a running response cannot be chained from), and
        one whose runner died is failed first, as reading it alone would."""
        turns: list[StoredTurn] = []
        seen: set[str] = set()
        current: str | None = response_id
        with self._lock:
            while current is not None:
                if current in seen:  # cannot be made through the API; a damaged file must not hang us
                    return None
                seen.add(current)
                self._fail_orphan(current)
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
        """Stored events with a ``sequence_number`` above ``after``, in order (an orphaned run's
        ending included: it is failed first)."""
        with self._lock:
            self._fail_orphan(response_id)
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
        """Bytes the store takes on disk (what the bound holds): the database, ``-wal`` and
        ``-shm`` files, the database counted at least at its live pages."""
        with self._lock:
            return self._bound.footprint()

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
        """A running response whose runner stopped reporting becomes ``failed`` (once): its stored
        stream gets its open items closed as ``incomplete`` and ``error`` + ``response.failed``
        (a replay ends), and its output is what the events got to."""
        error = {"code": "server_error", "message": INTERRUPTED_MESSAGE}
        with self._write() as db:
            row = db.execute(
                "SELECT seq, body FROM responses WHERE id = ? AND lease_s IS NOT NULL AND lease_s < ?",
                (response_id, time.time()),
            ).fetchone()
            if row is None:
                return
            seq, body = row[0], orjson.loads(row[1])
            events = [
                orjson.loads(b)
                for (b,) in db.execute(
                    "SELECT body FROM events WHERE response_seq = ? ORDER BY sequence_number", (seq,)
                ).fetchall()
            ]
            ending, final = cut_short(body, events, self._items(seq, _OUTPUT), error)
            rows = [(i, item.get("id"), _dumps(item)) for i, item in enumerate(final.pop("output"))]
            db.execute(
                "UPDATE responses SET status = ?, lease_s = NULL, body = ? WHERE seq = ?",
                (str(final.get("status")), _dumps(final), seq),
            )
            db.execute("DELETE FROM items WHERE response_seq = ? AND kind = ?", (seq, _OUTPUT))
            db.executemany(
                "INSERT INTO items (response_seq, kind, position, item_id, body) VALUES (?, ?, ?, ?, ?)",
                [(seq, _OUTPUT, *r) for r in rows],
            )
            db.executemany(
                "INSERT OR REPLACE INTO events (response_seq, sequence_number, body) VALUES (?, ?, ?)",
                [(seq, int(e["sequence_number"]), _dumps(e)) for e in ending],
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

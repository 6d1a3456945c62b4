"""The responses store on its own: no server, a SQLite file in a temporary folder."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sanic_serve.responses import store as store_module
from sanic_serve.responses.store import ResponseStore, StoreError

MB = 1024 * 1024


def response(rid: str, text: str = "Hello!", status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "instructions": extra.pop("instructions", None),
        "output": [
            {
                "type": "message",
                "id": f"msg_out_{rid}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        ],
        **extra,
    }


def user(text: str, item_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
    }
    if item_id:
        item["id"] = item_id
    return item


def on_disk(path: Path) -> int:
    """The store's files together: the database, its write-ahead log and the log's index."""
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return sum(f.stat().st_size for f in files if f.exists())


@pytest.fixture()
def store(tmp_path: Path) -> Any:
    s = ResponseStore(tmp_path / "responses.sqlite3", max_bytes=64 * MB)
    yield s
    s.close()


def test_save_get_round_trip_keeps_the_body_exactly(store: ResponseStore) -> None:
    body = response("resp_1", metadata={"k": "v"}, usage={"input_tokens": 3})
    store.save(body, [user("Hi", "msg_in_1")], previous_response_id=None)
    assert store.get("resp_1") == body
    assert store.get("resp_unknown") is None


def test_input_items_in_order_and_given_ids(store: ResponseStore) -> None:
    items = [
        user("one", "msg_a"),
        user("two"),
        {"type": "function_call_output", "call_id": "c", "output": "x"},
    ]
    store.save(response("resp_1"), items, previous_response_id=None)
    stored = store.input_items("resp_1")
    assert stored is not None
    assert [i["content"][0]["text"] for i in stored[:2]] == ["one", "two"]
    assert stored[0]["id"] == "msg_a"
    assert stored[1]["id"].startswith("msg_") and stored[2]["id"].startswith("item_")
    assert len({i["id"] for i in stored}) == 3
    assert store.input_items("resp_unknown") is None


def test_save_again_updates_in_place_and_keeps_cancel(store: ResponseStore) -> None:
    store.save(response("resp_1", status="queued", text=""), [user("Hi")], previous_response_id=None)
    assert store.request_cancel("resp_1")
    store.save(response("resp_1", text="done"), [user("Hi")], previous_response_id=None)
    got = store.get("resp_1")
    assert got is not None and got["output"][0]["content"][0]["text"] == "done"
    assert store.cancel_requested("resp_1")
    assert len(store.input_items("resp_1") or []) == 1


def test_update_only_does_not_bring_back_a_deleted_response(store: ResponseStore) -> None:
    store.save(response("resp_1", status="queued"), [user("Hi")], previous_response_id=None)
    assert store.delete("resp_1")
    store.save(response("resp_1"), [user("Hi")], previous_response_id=None, create=False)
    assert store.get("resp_1") is None
    assert store.cancel_requested("resp_1")  # gone: its runner should stop


def test_chain_oldest_first_with_instructions_per_turn(store: ResponseStore) -> None:
    store.save(response("r1", "A1", instructions="be brief"), [user("Q1")], previous_response_id=None)
    store.save(response("r2", "A2"), [user("Q2")], previous_response_id="r1")
    store.save(response("r3", "A3", instructions="other"), [user("Q3")], previous_response_id="r2")
    chain = store.chain("r3")
    assert chain is not None
    assert [t.response_id for t in chain] == ["r1", "r2", "r3"]
    assert [t.input_items[0]["content"][0]["text"] for t in chain] == ["Q1", "Q2", "Q3"]
    assert [t.output_items[0]["content"][0]["text"] for t in chain] == ["A1", "A2", "A3"]
    assert [t.instructions for t in chain] == ["be brief", None, "other"]
    assert store.chain("r1") is not None and len(store.chain("r1") or []) == 1


def test_chain_with_a_missing_link_is_none(store: ResponseStore) -> None:
    store.save(response("r1"), [user("Q1")], previous_response_id=None)
    store.save(response("r2"), [user("Q2")], previous_response_id="r1")
    assert store.delete("r1")
    assert store.chain("r2") is None
    assert store.chain("nope") is None
    assert store.get("r2") is not None  # only the chain is broken


def test_item_finds_input_and_output_items(store: ResponseStore) -> None:
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "add", "arguments": "{}"}
    body = response("r1")
    body["output"].append(call)
    store.save(body, [user("Q1", "msg_q")], previous_response_id=None)
    assert store.item("msg_q") == user("Q1", "msg_q")
    assert store.item("fc_1") == call
    assert store.item("msg_out_r1") == body["output"][0]
    assert store.item("nope") is None
    store.delete("r1")
    assert store.item("fc_1") is None


def test_delete_answers_whether_there_was_one(store: ResponseStore) -> None:
    store.save(response("r1"), [user("Q")], previous_response_id=None)
    store.append_events("r1", [{"type": "response.created", "sequence_number": 0}])
    assert store.delete("r1") is True
    assert store.delete("r1") is False
    assert store.get("r1") is None and store.events_after("r1", -1) == []


def test_events_after_in_order(store: ResponseStore) -> None:
    store.save(response("r1", status="in_progress"), [user("Q")], previous_response_id=None)
    events = [{"type": f"e{i}", "sequence_number": i} for i in range(5)]
    store.append_events("r1", events[:2])
    store.append_events("r1", events[2:])
    assert store.events_after("r1", -1) == events
    assert store.events_after("r1", 2) == events[3:]
    assert store.events_after("r1", 4) == []
    store.append_events("nope", events)  # an unknown response: dropped, no error
    assert store.events_after("nope", -1) == []


def test_cancel_flags(store: ResponseStore) -> None:
    assert store.request_cancel("nope") is False
    store.save(response("r1", status="in_progress"), [user("Q")], previous_response_id=None)
    assert store.cancel_requested("r1") is False
    assert store.request_cancel("r1") is True
    assert store.cancel_requested("r1") is True


def test_ttl_expires_responses(tmp_path: Path) -> None:
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=MB, ttl_s=0.3)
    s.save(response("r1"), [user("Q")], previous_response_id=None)
    assert s.get("r1") is not None
    time.sleep(0.5)
    assert s.get("r1") is None and s.chain("r1") is None and s.input_items("r1") is None
    assert s.item("msg_out_r1") is None
    assert s.delete("r1") is False
    s.close()


def test_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    first = ResponseStore(path, max_bytes=MB)
    first.save(response("r1"), [user("Q")], previous_response_id=None)
    first.close()
    again = ResponseStore(path, max_bytes=MB)
    assert again.get("r1") == response("r1")
    assert again.chain("r1") is not None
    again.close()


def test_wal_mode_and_one_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "db.sqlite3"  # the folder is made
    s = ResponseStore(path, max_bytes=MB)
    s.save(response("r1"), [user("Q")], previous_response_id=None)
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 1
    s.close()


def test_eviction_keeps_the_file_under_the_bound_oldest_first(tmp_path: Path) -> None:
    bound = 200 * 1024
    path = tmp_path / "db.sqlite3"
    s = ResponseStore(path, max_bytes=bound)
    filler = "x" * 3000
    for i in range(200):
        s.save(response(f"r{i}", f"{i} {filler}"), [user(f"Q{i} {filler}")], previous_response_id=None)
        assert s.size_bytes() <= bound
        assert on_disk(path) <= bound, "the database, -wal and -shm files together stay under the bound"
    kept = [i for i in range(200) if s.get(f"r{i}") is not None]
    assert kept and 199 in kept and 0 not in kept
    assert kept == list(range(kept[0], 200)), "evicted oldest first, a contiguous newest run is kept"
    assert len(kept) >= 10, "the bound is used, not emptied"
    s.close()
    assert on_disk(path) <= bound


def test_running_responses_are_not_evicted(tmp_path: Path) -> None:
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=120 * 1024)
    s.save(response("running", status="in_progress"), [user("Q")], previous_response_id=None)
    filler = "y" * 4000
    for i in range(60):
        s.save(response(f"r{i}", filler), [user("Q")], previous_response_id=None)
    assert s.get("running") is not None
    assert s.get("r0") is None and s.get("r59") is not None
    s.close()


def test_a_response_bigger_than_the_bound_is_not_kept(tmp_path: Path) -> None:
    bound = 100 * 1024
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=bound)
    s.save(response("small"), [user("Q")], previous_response_id=None)
    s.save(response("huge", "z" * (3 * bound)), [user("Q")], previous_response_id=None)
    assert s.get("huge") is None
    assert s.size_bytes() <= bound
    s.close()


def test_an_orphaned_running_response_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "LEASE_S", 0.2)
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=MB)
    s.save(response("r1", status="in_progress"), [user("Q")], previous_response_id=None)
    s.heartbeat("r1")
    assert s.status("r1") == "in_progress"
    time.sleep(0.4)
    got = s.get("r1")
    assert got is not None and got["status"] == "failed"
    assert got["error"]["code"] == "server_error"
    assert s.status("r1") == "failed"
    s.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer hfserve"):
        ResponseStore(path, max_bytes=MB)


def test_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot open"):
        ResponseStore(blocker / "db.sqlite3", max_bytes=MB)


def _writer(path: str, prefix: str, count: int) -> None:
    s = ResponseStore(Path(path), max_bytes=64 * MB)
    for i in range(count):
        s.save(response(f"{prefix}{i}"), [user("Q")], previous_response_id=None)
        s.request_cancel(f"{prefix}{i}")
    s.close()


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    ResponseStore(path, max_bytes=64 * MB).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), f"p{n}_", 40)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = ResponseStore(path, max_bytes=64 * MB)
    assert all(s.get(f"p{n}_{i}") is not None for n in range(3) for i in range(40))
    assert all(s.cancel_requested(f"p{n}_{i}") for n in range(3) for i in range(40))
    s.close()


def test_reopening_with_a_lower_bound_shrinks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    big = ResponseStore(path, max_bytes=4 * MB)
    for i in range(100):
        big.save(response(f"r{i}", "w" * 8000), [user("Q")], previous_response_id=None)
    assert big.size_bytes() > 600 * 1024
    big.close()
    small = ResponseStore(path, max_bytes=200 * 1024)
    assert small.size_bytes() <= 200 * 1024
    assert small.get("r99") is not None and small.get("r0") is None
    small.close()
    assert on_disk(path) <= 200 * 1024


def test_a_failed_or_cancelled_response_is_not_moved_by_a_late_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that stalled past its lease was failed; the runner's next save must not flip it back
    (nor add events after its stored end). A cancelled one stays cancelled too."""
    monkeypatch.setattr(store_module, "LEASE_S", 0.2)
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=MB)
    s.save(response("r1", status="in_progress"), [user("Q")], previous_response_id=None)
    time.sleep(0.4)
    assert s.status("r1") == "failed"
    ended = s.events_after("r1", -1)
    s.save(response("r1", status="in_progress"), [user("Q")], previous_response_id=None, create=False)
    s.save(response("r1", text="late"), [user("Q")], previous_response_id=None, create=False)
    s.append_events("r1", [{"type": "response.output_text.delta", "sequence_number": 99}])
    got = s.get("r1")
    assert got is not None and got["status"] == "failed" and s.events_after("r1", -1) == ended
    assert s.cancel_requested("r1"), "its runner, if alive, is told to stop"
    s.save(response("r2", status="in_progress"), [user("Q")], previous_response_id=None)
    s.save(response("r2", status="cancelled"), [user("Q")], previous_response_id=None, create=False)
    s.save(response("r2"), [user("Q")], previous_response_id=None, create=False)
    assert s.status("r2") == "cancelled"
    s.close()


def test_an_orphaned_run_ends_its_stored_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed for a dead worker: the open item is closed as incomplete with its text so far, and
    error + response.failed end the stream, so a replay ends."""
    monkeypatch.setattr(store_module, "LEASE_S", 0.2)
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=MB)
    s.save(response("r1", status="in_progress"), [user("Q")], previous_response_id=None)
    item = {"type": "message", "id": "m1", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": "m1", "output_index": 0, "content_index": 0}
    s.append_events(
        "r1",
        [
            {"type": "response.created", "sequence_number": 0, "response": response("r1", status="queued")},
            {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item},
            {"type": "response.content_part.added", "sequence_number": 2, **where, "part": part},
            {"type": "response.output_text.delta", "sequence_number": 3, **where, "delta": "Hel"},
        ],
    )
    time.sleep(0.4)
    events = s.events_after("r1", 3)
    assert [e["type"] for e in events] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    assert [e["sequence_number"] for e in events] == [4, 5, 6, 7, 8]
    assert events[0]["text"] == "Hel" and events[2]["item"]["status"] == "incomplete"
    got = s.get("r1")
    assert got is not None and got["status"] == "failed"
    assert got == events[-1]["response"]
    assert got["output"][0]["content"][0]["text"] == "Hel"
    s.close()


def test_chain_fails_dead_links_and_tells_each_turns_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=MB)
    s.save(response("r1"), [user("Q1")], previous_response_id=None)
    s.save(response("r2", status="in_progress"), [user("Q2")], previous_response_id="r1")
    chain = s.chain("r2")
    assert chain is not None and [t.status for t in chain] == ["completed", "in_progress"]
    monkeypatch.setattr(store_module, "LEASE_S", 0.2)
    s.heartbeat("r2")
    time.sleep(0.4)
    chain = s.chain("r2")  # its worker died: the chain finds it failed, not still running
    assert chain is not None and [t.status for t in chain] == ["completed", "failed"]
    got = s.get("r2")
    assert got is not None and got["status"] == "failed"
    s.close()


def test_call_runs_on_the_store_thread_without_blocking_the_loop(store: ResponseStore) -> None:
    store.save(response("r1"), [user("Q")], previous_response_id=None)

    async def main() -> None:
        held = threading.Event()

        def hold() -> None:
            with store._lock:  # a write waiting on another worker, as far as this store knows
                held.set()
                time.sleep(0.6)

        threading.Thread(target=hold, daemon=True).start()
        held.wait(5)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        got = await store.call(store.get, "r1")
        ticker.cancel()
        assert got is not None and got["id"] == "r1"
        assert ticks >= 10, "the loop ran while the call waited"
        assert await store.call(store.status, "nope") is None
        with pytest.raises(KeyError):
            await store.call(store.save, {"no id": 1}, [], previous_response_id=None)

    asyncio.run(main())

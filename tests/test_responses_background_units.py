"""Background runs without a server: a fake event generator drained by the runner into a real store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from sanic_serve.responses import background
from sanic_serve.responses.items import PreparedContext
from sanic_serve.responses.request import parse_responses_request
from sanic_serve.responses.store import INTERRUPTED_MESSAGE, ResponseStore

RID = "resp_test"


class FakeRun:
    """``response_events`` as the runner sees it: created, in_progress, one message whose text
    comes ``words`` deltas apart (``pause_s``), then completed. Knows whether it was closed."""

    def __init__(self, words: int, pause_s: float) -> None:
        self.words, self.pause_s = words, pause_s
        self.closed = False
        self.seq = 0

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def body(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": RID, "object": "response", "status": status, "background": True, "output": output}

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        try:
            yield self._event("response.created", response=self.body("in_progress", []))
            yield self._event("response.in_progress", response=self.body("in_progress", []))
            item = {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            yield self._event("response.output_item.added", output_index=0, item=item)
            part = {"type": "output_text", "text": "", "annotations": []}
            yield self._event(
                "response.content_part.added", item_id="msg_1", output_index=0, content_index=0, part=part
            )
            for i in range(self.words):
                await asyncio.sleep(self.pause_s)
                yield self._event(
                    "response.output_text.delta",
                    item_id="msg_1",
                    output_index=0,
                    content_index=0,
                    delta=f"w{i} ",
                )
            text = "".join(f"w{i} " for i in range(self.words))
            done = {**item, "status": "completed", "content": [{**part, "text": text}]}
            yield self._event("response.output_item.done", output_index=0, item=done)
            yield self._event("response.completed", response=self.body("completed", [done]))
        finally:
            self.closed = True


@pytest.fixture()
def store(tmp_path: Path) -> Any:
    s = ResponseStore(tmp_path / "db.sqlite3", max_bytes=16 * 1024 * 1024)
    yield s
    s.close()


async def start(store: ResponseStore, run: FakeRun) -> background._Runner:
    """What ``start_background`` does once the request was found able to run."""
    req = parse_responses_request({"model": "m", "input": "Hi", "background": True})
    context = PreparedContext(
        input_items=[{"type": "message", "id": "msg_in", "role": "user", "content": "Hi"}]
    )
    events = run.events()
    first = await anext(events)
    queued = {**first["response"], "status": "queued"}
    store.save(queued, context.input_items, previous_response_id=None)
    runner = background._Runner(store, req, context, events, {**first, "response": queued})
    background._running[runner.id] = runner
    runner.task = asyncio.get_running_loop().create_task(runner.run())
    return runner


async def wait_status(store: ResponseStore, statuses: tuple[str, ...], timeout_s: float = 10.0) -> str:
    for _ in range(int(timeout_s / 0.02)):
        status = store.status(RID)
        if status in statuses:
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"status still {store.status(RID)}")


def test_a_run_is_stored_to_its_end(store: ResponseStore) -> None:
    async def main() -> None:
        run = FakeRun(words=5, pause_s=0.01)
        runner = await start(store, run)
        assert store.status(RID) in ("queued", "in_progress")
        assert runner.task is not None
        await runner.task
        got = store.get(RID)
        assert got is not None and got["status"] == "completed"
        assert got["output"][0]["content"][0]["text"] == "w0 w1 w2 w3 w4 "
        events = store.events_after(RID, -1)
        assert [e["sequence_number"] for e in events] == list(range(run.seq))
        assert events[0]["response"]["status"] == "queued"  # created, as the client was answered
        assert background.running(RID) is None
        assert store.input_items(RID) == [
            {"type": "message", "id": "msg_in", "role": "user", "content": "Hi"}
        ]

    asyncio.run(main())


def test_a_cancel_from_the_store_stops_the_run_with_its_output_so_far(store: ResponseStore) -> None:
    async def main() -> None:
        run = FakeRun(words=1000, pause_s=0.01)
        runner = await start(store, run)
        await asyncio.sleep(0.3)
        assert store.request_cancel(RID)  # as another worker's cancel route does
        assert await wait_status(store, ("cancelled", "completed")) == "cancelled"
        assert runner.task is not None
        await asyncio.wait_for(runner.task, 5)
        assert run.closed, "the generator is closed: the host generation is aborted"
        got = store.get(RID)
        assert got is not None
        text = got["output"][0]["content"][0]["text"]
        assert text.startswith("w0 w1 ") and len(text.split()) < 1000
        assert store.events_after(RID, -1)[-1]["sequence_number"] == run.seq - 1  # all flushed

    asyncio.run(main())


def test_a_deleted_run_stops_and_stays_deleted(store: ResponseStore) -> None:
    async def main() -> None:
        run = FakeRun(words=1000, pause_s=0.01)
        runner = await start(store, run)
        await asyncio.sleep(0.2)
        assert store.delete(RID)
        assert runner.task is not None
        await asyncio.wait_for(runner.task, 5)
        assert run.closed and store.get(RID) is None

    asyncio.run(main())


def test_a_stopping_worker_fails_its_runs(store: ResponseStore) -> None:
    async def main() -> None:
        run = FakeRun(words=1000, pause_s=0.01)
        await start(store, run)
        await asyncio.sleep(0.2)
        await background.stop_all()
        assert run.closed
        got = store.get(RID)
        assert got is not None and got["status"] == "failed"
        assert got["error"] == {"code": "server_error", "message": INTERRUPTED_MESSAGE}

    asyncio.run(main())


def test_a_follower_sees_every_event_once(store: ResponseStore) -> None:
    async def main() -> None:
        run = FakeRun(words=20, pause_s=0.005)
        runner = await start(store, run)
        seen = [e["sequence_number"] async for e in runner.follow(2)]
        assert seen == list(range(3, run.seq))

    asyncio.run(main())

"""Background runs without a server: a fake event generator drained by the runner into a real store.
A run cut short (cancelled, stopped with the worker) still ends its stored stream by the rules, and
the OpenAI SDK reads the replay to a final response; store calls never stall the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from sanic_serve.responses import background
from sanic_serve.responses.events import response_body
from sanic_serve.responses.items import PreparedContext
from sanic_serve.responses.request import parse_responses_request
from sanic_serve.responses.store import INTERRUPTED_MESSAGE, ResponseStore
from tests.responses_helpers import check_events

RID = "resp_test"
REQ = parse_responses_request({"model": "m", "input": "Hi", "background": True})


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
        """A whole Response (the spec's schema), as ``response_events`` carries."""
        return {**response_body(REQ, RID, 1700000000, status), "output": output}

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
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
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
                    logprobs=[],
                )
            text = "".join(f"w{i} " for i in range(self.words))
            where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
            yield self._event("response.output_text.done", **where, text=text, logprobs=[])
            yield self._event("response.content_part.done", **where, part={**part, "text": text})
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
    req = REQ
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
        assert got["output"][0]["status"] == "incomplete", "the open message is not left in_progress"
        # The stored stream ends by the rules: the open item closed, one terminal event that the
        # SDK accepts, carrying the cancelled response as stored.
        events = store.events_after(RID, -1)
        assert events[run.seq - 1]["type"] == "response.output_text.delta"  # all the run's events
        final = check_events(events)
        assert events[-1]["type"] == "response.completed" and final["status"] == "cancelled"
        assert final == got
        assert sdk_final_response(store).status == "cancelled"

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
        assert got["output"][0]["status"] == "incomplete"
        events = store.events_after(RID, -1)
        final = check_events(events)  # error, then response.failed: a replay ends
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        assert events[-2]["message"] == INTERRUPTED_MESSAGE and final == got

    asyncio.run(main())


def test_a_follower_sees_every_event_once(store: ResponseStore) -> None:
    async def main() -> None:
        run = FakeRun(words=20, pause_s=0.005)
        runner = await start(store, run)
        seen = [e["sequence_number"] async for e in runner.follow(2)]
        assert seen == list(range(3, run.seq))

    asyncio.run(main())


def sdk_final_response(store: ResponseStore) -> Any:
    """``client.responses.stream(response_id=...).get_final_response()`` over the stored events,
    served as ``GET /v1/responses/{id}?stream=true`` serves them."""

    def serve(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith(f"/responses/{RID}")
        body = b"".join(
            b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
            for e in store.events_after(RID, -1)
        )
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    http = httpx.Client(transport=httpx.MockTransport(serve))
    client = openai.OpenAI(base_url="http://test/v1", api_key="unused", http_client=http)
    with client.responses.stream(response_id=RID) as stream:
        return stream.get_final_response()


def test_a_run_stays_failed_once_its_lease_was_given_up(store: ResponseStore) -> None:
    """A run that stalled past its lease was failed by a reader: it stops, and its late writes
    neither bring the response back nor add events after the stored end."""

    async def main() -> None:
        run = FakeRun(words=1000, pause_s=0.01)
        runner = await start(store, run)
        await asyncio.sleep(0.2)
        with store._lock:  # as _fail_orphan does once the lease ran out
            store._db.execute("UPDATE responses SET lease_s = 0 WHERE id = ?", (RID,))
        assert store.status(RID) == "failed"
        assert runner.task is not None
        await asyncio.wait_for(runner.task, 5)
        assert run.closed, "its generation is aborted"
        got = store.get(RID)
        assert got is not None and got["status"] == "failed"
        events = store.events_after(RID, -1)
        check_events(events)
        assert events[-1]["type"] == "response.failed"

    asyncio.run(main())


def test_store_calls_do_not_stall_the_event_loop(store: ResponseStore) -> None:
    """Another worker holding the database (here: the store's lock) for a second delays the
    run's writes, not the loop: the other streams of the worker go on."""

    async def main() -> None:
        run = FakeRun(words=60, pause_s=0.01)
        held = threading.Event()

        def hold() -> None:
            with store._lock:
                held.set()
                time.sleep(1.0)

        runner = await start(store, run)
        threading.Thread(target=hold, daemon=True).start()
        held.wait(5)
        worst_s, last = 0.0, time.monotonic()
        assert runner.task is not None
        while not runner.task.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst_s, last = max(worst_s, now - last), now
        assert worst_s < 0.5, f"the event loop stalled {worst_s:.2f} s on a store call"
        got = store.get(RID)
        assert got is not None and got["status"] == "completed"

    asyncio.run(main())

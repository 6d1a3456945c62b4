"""``background: true``: a response that runs on after its request was answered ``queued``.

The worker that took the request runs it in a task (``_Runner``): it drains ``response_events``,
keeps every event in the store (for ``GET ...?stream=true`` from any worker) and saves the
response as its status moves (``queued`` -> ``in_progress`` -> terminal). A cancel may arrive at
any worker: it only sets a flag in the store, which the running worker looks at every
``CANCEL_POLL_S``; it then closes the event generator (which aborts the generation in the model
host) and saves the response as ``cancelled``, with the output produced so far. A run cut short
(cancelled, or stopped by the worker's shutdown) still ends its stored stream properly: open items
closed as ``incomplete`` and one terminal event (``sanic_serve.responses.partial``). The runner also
renews its lease in the store, so a response whose worker died is failed rather than left running.

Every store call goes through ``ResponseStore.call`` (the store's own thread): a write waiting on
another worker's lock must not stall this worker's event loop and every stream on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from sanic import Request
from sanic.response import HTTPResponse, json

from sanic_serve.errors import InvalidRequest
from sanic_serve.responses.items import PreparedContext
from sanic_serve.responses.partial import TERMINAL_EVENTS, PartialOutput
from sanic_serve.responses.request import ResponsesRequest
from sanic_serve.responses.run import new_response_id, response_events
from sanic_serve.responses.store import INTERRUPTED_MESSAGE, LEASE_S, ResponseStore

log = logging.getLogger("hfserve")

CANCEL_POLL_S = 0.2
FLUSH_S = 0.1  # events reach the store (and other workers' followers) within this
FINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})

# The background responses this worker runs, by id (their tasks are kept here, not garbage).
_running: dict[str, _Runner] = {}


class _Runner:
    def __init__(
        self,
        store: ResponseStore,
        req: ResponsesRequest,
        context: PreparedContext,
        events: AsyncGenerator[dict[str, Any], None],
        first: dict[str, Any],
    ) -> None:
        self.store, self.req, self.context, self.events = store, req, context, events
        self.response: dict[str, Any] = dict(first["response"])
        self.id = str(self.response["id"])
        self.seen: list[dict[str, Any]] = [first]  # every event so far (followers on this worker)
        self.pending: list[dict[str, Any]] = [first]  # not yet in the store
        self.partial = PartialOutput()  # the output as far as it got, for a run cut short
        self.partial.feed(first)
        self.changed = asyncio.Event()
        self.finished = False
        self.ending = False  # stopped or ended: finishing its store writes, not to be cancelled again
        self.interrupted = False  # stopped by the worker's shutdown, not by a cancel
        self.task: asyncio.Task[None] | None = None

    # -- running ---------------------------------------------------------------------------------
    async def run(self) -> None:
        watcher = asyncio.ensure_future(self._watch())
        final: dict[str, Any] | None = None
        status, error = "failed", {"code": "server_error", "message": "The response failed on the server."}
        try:
            async for event in self.events:
                self._record(event)
                if event["type"] == "response.in_progress":
                    await self._save({**event["response"], "status": "in_progress"})
                elif event["type"] in TERMINAL_EVENTS:
                    final = event["response"]
        except asyncio.CancelledError:
            if self.interrupted:
                error["message"] = INTERRUPTED_MESSAGE
            else:
                status = "cancelled"
        except Exception as exc:  # response_events reports its own failures; this is a fault of ours
            log.error("background response %s failed", self.id, exc_info=exc)
        finally:
            self.ending = True
            watcher.cancel()
            await self._finish(final, status, error)

    async def _finish(self, final: dict[str, Any] | None, status: str, error: dict[str, Any]) -> None:
        """Abort the generation, end the stream properly (a run cut short gets its open items
        closed as ``incomplete`` and its terminal event) and store it all."""
        try:
            await self.events.aclose()  # a cancelled run aborts its generation in the host here
        except Exception as exc:
            log.error("background response %s: closing its generation failed", self.id, exc_info=exc)
        if final is None:
            for event in self.partial.ending(self.response, status, None if status == "cancelled" else error):
                self._record(event)
                if event["type"] in TERMINAL_EVENTS:
                    final = event["response"]
        await self._flush()  # the events before the status: a replay that sees it final has them all
        if final is not None:
            await self._save(final)
        self.finished = True
        self.changed.set()
        _running.pop(self.id, None)

    async def _watch(self) -> None:
        """Flush events, renew the lease, and stop the run when a cancel was asked for (or its
        response is gone or was failed meanwhile). Store calls run on the store's thread: a slow
        write never stalls this worker's other streams."""
        last_poll = last_beat = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._flush()
            now = time.monotonic()
            if now - last_beat >= LEASE_S / 6:
                last_beat = now
                await self.store.call(self.store.heartbeat, self.id)
            if now - last_poll >= CANCEL_POLL_S:
                last_poll = now
                if await self.store.call(self.store.cancel_requested, self.id):
                    log.info("background response %s: cancelled", self.id)
                    if self.task is not None and not self.ending:
                        self.task.cancel()
                    return

    def _record(self, event: dict[str, Any]) -> None:
        self.seen.append(event)
        self.pending.append(event)
        self.partial.feed(event)
        self.changed.set()

    async def _flush(self) -> None:
        if not self.pending:
            return
        events, self.pending = self.pending, []
        try:
            await self.store.call(self.store.append_events, self.id, events)
        except Exception as exc:  # the run goes on; a replay will miss these events
            log.error("background response %s: could not store its events", self.id, exc_info=exc)

    async def _save(self, response: dict[str, Any]) -> None:
        self.response = response
        try:
            await self.store.call(
                self.store.save,
                response,
                self.context.input_items,
                previous_response_id=self.req.previous_response_id,
                create=False,  # deleted meanwhile: stays deleted
            )
        except Exception as exc:
            log.error("background response %s: could not save its status", self.id, exc_info=exc)

    # -- following -------------------------------------------------------------------------------
    async def follow(self, after: int) -> AsyncIterator[dict[str, Any]]:
        """The events after sequence number ``after``, as they come, until the run ends."""
        sent = 0
        while True:
            self.changed.clear()
            for event in self.seen[sent:]:
                if event["sequence_number"] > after:
                    yield event
            sent = len(self.seen)
            if self.finished:
                return
            await self.changed.wait()


def running(response_id: str) -> _Runner | None:
    """The run of this background response if this worker has it."""
    return _running.get(response_id)


async def start_background(
    request: Request, req: ResponsesRequest, context: PreparedContext
) -> HTTPResponse | None:
    """Answer ``queued`` at once (or stream, with ``stream: true``) and run the response in a task
    of this worker. What makes the request a 4xx is raised before anything is stored."""
    store: ResponseStore | None = getattr(request.app.ctx, "responses", None)
    if store is None:
        raise InvalidRequest(
            "This server keeps no stored responses, which background needs.", param="background"
        )
    events = response_events(
        req, context, request.app.ctx, response_id=new_response_id(), created_at=int(time.time())
    )
    try:
        first = await anext(events)  # response.created: the request could start
    except BaseException:
        await events.aclose()
        raise
    queued = {**first["response"], "status": "queued"}
    first = {**first, "response": queued}
    try:
        await store.call(
            store.save, queued, context.input_items, previous_response_id=req.previous_response_id
        )
    except BaseException:
        await events.aclose()  # nothing runs that no one could ever see
        raise
    runner = _Runner(store, req, context, events, first)
    _running[runner.id] = runner
    work: Any = lambda _request: runner.run()  # noqa: E731
    counter = getattr(request.app.ctx, "request_counter", None)
    if counter is not None:  # a graceful stop waits for background runs as for requests in flight
        work = counter.wrap(work)
    runner.task = asyncio.get_running_loop().create_task(work(None), name=f"background {runner.id}")
    if not req.stream:
        return json(queued, dumps=orjson.dumps)
    # Streamed: the client follows the run; leaving does not stop it (GET ?stream=true resumes).
    from sanic_serve.responses.route import SSE_HEADERS, sse

    response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
    assert response is not None
    async for event in runner.follow(-1):
        await response.send(sse(event))
    await response.eof()
    return None


async def stop_all() -> None:
    """The worker is stopping: end its runs now (saved as failed, their generation aborted) rather
    than leave them for the lease to expire."""
    for runner in list(_running.values()):
        # One already ending (cancelled, finished) is let finish its writes, not cut again.
        if runner.task is not None and not runner.task.done() and not runner.ending:
            runner.interrupted = True
            runner.task.cancel()
    tasks = [r.task for r in list(_running.values()) if r.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=5.0)

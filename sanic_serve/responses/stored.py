"""Stored responses over HTTP: ``GET`` / ``DELETE /v1/responses/{id}``, its ``input_items``, ``cancel``,
and ``GET /v1/responses/{id}?stream=true&starting_after=N`` (a background response's events, replayed
from the store, then followed live until the run ends).

Every worker answers for every stored response: they share the store. A background response runs
in the worker that took it; the others see its progress through the store. Store calls run on the
store's own thread (``ResponseStore.call``): a read waiting on a checkpoint never stalls the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from sanic_serve.config import ServerConfig
from sanic_serve.errors import InvalidRequest, NotFound
from sanic_serve.responses import background
from sanic_serve.responses.store import RUNNING_STATUSES, ResponseStore

log = logging.getLogger("hfserve")

bp = Blueprint("stored_responses")

MB = 1024 * 1024
CANCEL_WAIT_S = 10.0  # a cancel answers once the run has stopped, or after this with its status then
FOLLOW_POLL_S = 0.1  # a follower on another worker looks for new events this often
MAX_ITEMS_PAGE = 100


def open_store(config: ServerConfig) -> ResponseStore | None:
    """This worker's connection to the shared store (None when the server keeps none)."""
    if not config.responses_db:
        return None
    return ResponseStore(
        Path(config.responses_db), max_bytes=int(config.responses_max_mb * MB), ttl_s=config.responses_ttl_s
    )


def _store(request: Request) -> ResponseStore:
    store: ResponseStore | None = getattr(request.app.ctx, "responses", None)
    if store is None:
        raise NotFound("This server keeps no stored responses.", param="response_id")
    return store


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


def _flag(request: Request, name: str) -> bool:
    value = request.args.get(name)
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise InvalidRequest(f"`{name}` must be true or false, not {value!r}.", param=name)


def _int_arg(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an integer, not {value!r}.", param=name) from None
    if not low <= number <= high:
        raise InvalidRequest(f"`{name}` must be between {low} and {high}, not {number}.", param=name)
    return number


@bp.get("/v1/responses/<response_id:str>")
async def get_response(request: Request, response_id: str) -> HTTPResponse | None:
    store, response_id = _store(request), unquote(response_id)
    if _flag(request, "stream"):
        after = _int_arg(request, "starting_after", -1, -1, 2**62)
        await _stream(request, store, response_id, after)
        return None
    found = await store.call(store.get, response_id)
    if found is None:
        raise _not_found(response_id)
    return json(found, dumps=orjson.dumps)


@bp.delete("/v1/responses/<response_id:str>")
async def delete_response(request: Request, response_id: str) -> HTTPResponse:
    store, response_id = _store(request), unquote(response_id)
    # A background run still going stops on its own once its response is gone.
    if not await store.call(store.delete, response_id):
        raise _not_found(response_id)
    return json({"id": response_id, "object": "response", "deleted": True})


@bp.get("/v1/responses/<response_id:str>/input_items")
async def list_input_items(request: Request, response_id: str) -> HTTPResponse:
    store, response_id = _store(request), unquote(response_id)
    limit = _int_arg(request, "limit", 20, 1, MAX_ITEMS_PAGE)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"`order` must be 'asc' or 'desc', not {order!r}.", param="order")
    items = await store.call(store.input_items, response_id)
    if items is None:
        raise _not_found(response_id)
    if order == "desc":
        items.reverse()
    after = request.args.get("after")
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequest(
                f"No input item with id '{after}' in response '{response_id}'.", param="after"
            )
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return json(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        },
        dumps=orjson.dumps,
    )


@bp.post("/v1/responses/<response_id:str>/cancel")
async def cancel_response(request: Request, response_id: str) -> HTTPResponse:
    store, response_id = _store(request), unquote(response_id)
    found = await store.call(store.get, response_id)
    if found is None:
        raise _not_found(response_id)
    if not found.get("background"):
        raise InvalidRequest(
            "Only responses created with background: true can be cancelled.", param="response_id"
        )
    status = found.get("status")
    if status == "cancelled":
        return json(found, dumps=orjson.dumps)
    if status not in RUNNING_STATUSES:
        raise InvalidRequest(f"Cannot cancel a response that is already {status}.", param="response_id")
    await store.call(store.request_cancel, response_id)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while await store.call(store.status, response_id) in RUNNING_STATUSES and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    found = await store.call(store.get, response_id)
    if found is None:  # deleted meanwhile
        raise _not_found(response_id)
    return json(found, dumps=orjson.dumps)


async def _stream(request: Request, store: ResponseStore, response_id: str, after: int) -> None:
    found = await store.call(store.get, response_id)
    if found is None:
        raise _not_found(response_id)
    if not found.get("background"):
        raise InvalidRequest(
            "Only responses created with background: true can be streamed again; GET it without stream.",
            param="stream",
        )
    from sanic_serve.responses.route import SSE_HEADERS, sse

    response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
    assert response is not None
    async for event in _events(store, response_id, after):
        await response.send(sse(event))
    await response.eof()


async def _events(store: ResponseStore, response_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
    """Stored events after ``after``, then new ones as they come, until the run has ended."""
    local = background.running(response_id)
    if local is not None:  # this worker runs it: follow it live
        async for event in local.follow(after):
            yield event
        return
    while True:
        # The status is read before the events: a run that ended before this read has all its
        # events stored already, so none can be missed by stopping after this round.
        status = await store.call(store.status, response_id)
        for event in await store.call(store.events_after, response_id, after):
            after = event["sequence_number"]
            yield event
        if status is None or status not in RUNNING_STATUSES:
            return
        await asyncio.sleep(FOLLOW_POLL_S)

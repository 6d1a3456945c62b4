"""``POST /v1/responses``: stream and non-stream (background runs: ``sanic_serve.responses.background``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from sanic_serve.errors import APIError, ServerError
from sanic_serve.requests import parse_json_body
from sanic_serve.responses.events import TERMINAL_EVENTS
from sanic_serve.responses.items import PreparedContext, prepare_context
from sanic_serve.responses.request import ResponsesRequest, parse_responses_request
from sanic_serve.responses.run import response_events

Events = AsyncGenerator[dict[str, Any], None]

log = logging.getLogger(__name__)

bp = Blueprint("responses")

# Every Responses stream (this route's, a background run's, a stored one's replay) is sent so.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: dict[str, Any]) -> bytes:
    """One Responses stream event: named, as OpenAI sends them (no ``[DONE]`` at the end)."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


async def save(
    app_ctx: Any, req: ResponsesRequest, context: PreparedContext, response: dict[str, Any]
) -> None:
    """Keep the finished response and this request's input items (``store``, true by default)."""
    store = getattr(app_ctx, "responses", None)
    if not req.store or store is None:
        return
    try:
        # On the store's thread: a write waiting for another worker must not stall this loop.
        previous = req.previous_response_id
        await store.call(store.save, response, context.input_items, previous_response_id=previous)
    except Exception as exc:  # the answer still goes out; retrieval of this one will 404
        log.error("could not store response %s", response.get("id"), exc_info=exc)


@bp.post("/v1/responses", ctx_large_body=True)
async def create_response(request: Request) -> HTTPResponse | None:
    req = parse_responses_request(parse_json_body(request))
    app_ctx = request.app.ctx
    store = getattr(app_ctx, "responses", None)  # the chain is read on the store's thread
    context = await store.call(prepare_context, req, store) if store else prepare_context(req, None)
    if req.background:
        from sanic_serve.responses.background import start_background

        return await start_background(request, req, context)
    events = response_events(req, context, app_ctx)
    try:
        if req.stream:
            await _stream(request, req, context, events)
            return None
        return await _whole(request, req, context, events)
    finally:
        await events.aclose()  # however the request ended (client gone included), nothing runs on


async def _whole(
    request: Request, req: ResponsesRequest, context: PreparedContext, events: Events
) -> HTTPResponse:
    async for event in events:
        if event["type"] == "error":
            # Before any byte went out, a failure keeps its HTTP status, as chat's does.
            raise _as_api_error(event)
        if event["type"] in TERMINAL_EVENTS:
            response: dict[str, Any] = event["response"]
            await save(request.app.ctx, req, context, response)
            return json(response, dumps=orjson.dumps)
    raise ServerError("The response ended without a result.")


def _as_api_error(event: dict[str, Any]) -> APIError:
    from sanic_serve.errors import InvalidRequest, Overloaded

    code = event.get("code")
    if code == "server_overloaded":
        return Overloaded(event["message"])
    if code in (None, "generation_failed", "model_load_failed", "engine_unavailable", "server_error"):
        status = 503 if code == "engine_unavailable" else 500
        return ServerError(event["message"], code=code, status=status)
    return InvalidRequest(event["message"], param=event.get("param"), code=code)


async def _stream(request: Request, req: ResponsesRequest, context: PreparedContext, events: Events) -> None:
    # The first event comes once the request was found able to run: a 4xx before it keeps its status.
    first = await anext(events)
    response = await request.respond(
        content_type="text/event-stream",
        headers=SSE_HEADERS,
    )
    assert response is not None
    event: dict[str, Any] | None = first
    while event is not None:
        if event["type"] in TERMINAL_EVENTS:
            # Stored before the client hears of the end: a chain it starts at once, through any
            # worker, finds this response.
            await save(request.app.ctx, req, context, event["response"])
        await response.send(sse(event))
        event = await anext(events, None)
    await response.eof()

"""``POST /v1/messages`` (stream and non-stream) and ``POST /v1/messages/count_tokens``.

The request becomes an OpenAI chat request (``sanic_serve.messages.translate``) and runs through
chat's own ``prepare``: the same template, tool offer, forced-call grammar and sampling, so a
Messages reply is token for token the chat reply to the same conversation.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sanic import Blueprint, Request
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from model_host.ipc.model_kind import ModelKind
from sanic_serve.chat.request import ChatCompletionRequest
from sanic_serve.chat.route import prepare
from sanic_serve.choices import Choice, abort, merged
from sanic_serve.errors import APIError, InvalidRequest, internal_error
from sanic_serve.generation import Delta, read_prompt
from sanic_serve.messages.blocks import Blocks, Event, message_id, stop_reason
from sanic_serve.messages.errors import anthropic_body, anthropic_error, anthropic_error_response
from sanic_serve.messages.request import parse_messages_request
from sanic_serve.messages.translate import anthropic_names, image_param, to_chat_with_images
from sanic_serve.requests import parse_json_body

log = logging.getLogger(__name__)

bp = Blueprint("messages")

# While no token comes (the request queued, a long prefill), a ping every this many seconds keeps
# clients and proxies from timing the stream out. Before the first token nothing is sent at all
# for this long, so an early failure still gets its HTTP status.
PING_INTERVAL_S = 10.0
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _usage(choice: Choice) -> dict[str, Any]:
    """Anthropic's arithmetic: ``input_tokens`` are the prompt tokens not read from the prefix
    cache; the whole prompt is ``input_tokens + cache_read_input_tokens`` (what count_tokens says)."""
    cached = choice.gen.cached_tokens
    return {
        "input_tokens": choice.gen.prompt_tokens - cached,
        "output_tokens": choice.gen.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _stop(choice: Choice) -> tuple[str, str | None]:
    gen = choice.gen
    sequence = gen.stop_sequence if gen.finish_reason == "stop" else None
    return stop_reason(gen.finish_reason, sequence, len(choice.out.calls)), sequence


def _feed(choice: Choice, blocks: Blocks, delta: Delta) -> list[Event]:
    last = delta.finish_reason is not None
    parsed = choice.out.feed_last(delta.text) if last else choice.out.feed(delta.text)
    events = blocks.feed(parsed)
    return events + blocks.close() if last else events


def _message(msg_id: str, model: str, choice: Choice, content: list[dict[str, Any]]) -> dict[str, Any]:
    reason, sequence = _stop(choice) if choice.gen.finish_reason is not None else (None, None)
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": model,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage(choice),
    }


async def _prepare(
    request: Request, req: ChatCompletionRequest, image_params: dict[str, str]
) -> list[Choice]:
    try:
        if image_params:  # refused for a text model before any image is read
            bundle = await request.app.ctx.models.resolve(req.model)
            if bundle.kind is not ModelKind.VISION:
                raise InvalidRequest(
                    f"The model `{req.model}` takes no images; content blocks must be text.",
                    param=next(iter(image_params)),
                    code="unsupported_content_type",
                )
        return await prepare(request, req)
    except InvalidRequest as exc:
        raise anthropic_names(exc, image_params) from exc
    except APIError as exc:
        if exc.param is None or image_param(exc.param, image_params) == exc.param:
            raise
        raise anthropic_names(exc, image_params) from exc  # an image's 413


@bp.post("/v1/messages", ctx_large_body=True)
async def create_message(request: Request) -> HTTPResponse | None:
    req = parse_messages_request(parse_json_body(request))
    choices = await _prepare(request, *to_chat_with_images(req))
    try:
        if req.stream:
            await _stream(request, req.model, choices[0])
            return None
        blocks = Blocks()
        async for choice, delta in merged(choices):
            _feed(choice, blocks, delta)
        return json(_message(message_id(), req.model, choices[0], blocks.blocks), dumps=orjson.dumps)
    finally:
        abort(choices)  # however the response ended (client gone included), nothing runs on


@bp.post("/v1/messages/count_tokens", ctx_large_body=True)
async def count_tokens(request: Request) -> HTTPResponse:
    """The prompt exactly as ``/v1/messages`` would render it for the same body, counted; nothing
    is generated. With images the host's processor expands them (the model does not run), so the
    count is the prompt as the model reads it, as a reply's usage counts it."""
    req = parse_messages_request(parse_json_body(request), counting=True)
    choices = await _prepare(request, *to_chat_with_images(req))
    gen = choices[0].gen
    if gen.images and gen.prompt_text is not None:  # only the host's processor knows their tokens
        ids = await read_prompt(
            request.app.ctx.client, gen.bundle, gen.prompt_token_ids, gen.images, gen.prompt_text
        )
        return json({"input_tokens": len(ids)})
    return json({"input_tokens": gen.prompt_tokens})


async def _next_or_ping(
    deltas: AsyncIterator[tuple[Choice, Delta]],
) -> AsyncIterator[tuple[Choice, Delta] | None]:
    """The deltas, with a None each time PING_INTERVAL_S passes without one."""
    pending = asyncio.ensure_future(anext(deltas, None))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=PING_INTERVAL_S)
            if not done:
                yield None
                continue
            item = pending.result()
            if item is None:
                return
            yield item
            pending = asyncio.ensure_future(anext(deltas, None))
    finally:
        pending.cancel()


async def _stream(request: Request, model: str, choice: Choice) -> None:
    msg_id = message_id()
    blocks = Blocks()
    response = None
    try:
        async for item in _next_or_ping(merged([choice])):
            if response is None:  # the first delta, or the first ping: the stream opens
                response = await request.respond(content_type="text/event-stream", headers=_SSE_HEADERS)
                assert response is not None
                start = _message(msg_id, model, choice, [])
                start["usage"]["output_tokens"] = 0
                await response.send(
                    sse("message_start", {"type": "message_start", "message": start})
                    + sse("ping", {"type": "ping"})
                )
            if item is None:
                await response.send(sse("ping", {"type": "ping"}))
                continue
            events = _feed(choice, blocks, item[1])
            if events:
                await response.send(b"".join(sse(name, payload) for name, payload in events))
    except APIError as exc:
        if response is None:
            raise  # nothing sent yet: the error keeps its HTTP status
        await response.send(sse("error", anthropic_error(exc)))
        await response.eof()
        return
    assert response is not None
    reason, sequence = _stop(choice)
    usage = _usage(choice)
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": sequence},
        "usage": usage,
    }
    await response.send(sse("message_delta", delta) + sse("message_stop", {"type": "message_stop"}))
    await response.eof()


@bp.exception(APIError)
async def _api_error(request: Request, exc: APIError) -> HTTPResponse:
    return anthropic_error_response(exc)


@bp.exception(SanicException)
async def _sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
    status = getattr(exc, "status_code", 500) or 500
    if status >= 500:
        return _internal(request, exc, status)
    return json(anthropic_body(str(exc), status), status=status)


@bp.exception(Exception)
async def _unexpected(request: Request, exc: Exception) -> HTTPResponse:
    return _internal(request, exc, 500)


def _internal(request: Request, exc: Exception, status: int) -> HTTPResponse:
    """Plain words and a request id for the client; the exception, under that id, for the log."""
    ref = f"req_{uuid.uuid4().hex[:16]}"
    log.error("unhandled error on %s %s (request id %s)", request.method, request.path, ref, exc_info=exc)
    return json(anthropic_body(internal_error("Internal server error", ref).message, status), status=status)

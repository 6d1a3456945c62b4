"""``POST /v1/chat/completions``."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient
from model_host.ipc.messages import ImageInput
from model_host.ipc.model_kind import ModelKind
from sanic_serve.chat.prompt import render_request
from sanic_serve.chat.request import ChatCompletionRequest, parse_chat_request
from sanic_serve.chat.types import image_urls, refuse_media
from sanic_serve.choices import Choice, abort, fan_out, merged, usage
from sanic_serve.errors import APIError, InvalidRequest
from sanic_serve.generation import Delta
from sanic_serve.media import MediaPolicy, load_image
from sanic_serve.parsing.assembler import ChoiceAssembler, output_parser
from sanic_serve.parsing.call_grammar import forced_call_grammar
from sanic_serve.requests import admit, completion_budget, off_the_loop, parse_json_body, sampling_params
from sanic_serve.sse import DONE, SYSTEM_FINGERPRINT, ChunkFactory, event

bp = Blueprint("chat")


async def prepare(request: Request, req: ChatCompletionRequest) -> list[Choice]:
    client: HostClient = request.app.ctx.client
    bundle = await admit(request, req.model)
    refuse_media(req.messages, req.model, takes_images=bundle.kind is ModelKind.VISION)
    images = await load_images(request, req)
    prompt = await off_the_loop(request, render_request, bundle, req)
    prompt_ids, prompt_text, use = prompt.ids, prompt.text, prompt.use
    tools = use.rendered
    budget = completion_budget(bundle, len(prompt_ids), req.max_new_tokens)
    grammar = None
    forced = req.forced_tool()
    if forced is not None:
        if bundle.call_markup is None:
            raise InvalidRequest(
                f"The model `{bundle.id}` has no known tool-call format to enforce; start the server "
                "with --tool-parser.",
                param="function_call" if req.uses_functions else "tool_choice",
            )
        grammar = forced_call_grammar(
            bundle.call_markup, tools or [], forced or None, bundle.tokenizer.token_to_id
        )
    sampling = sampling_params(req, bundle, budget, grammar=grammar, banned_tokens=use.banned_tokens)
    return fan_out(
        client,
        bundle,
        prompt_ids,
        sampling,
        req.stop_strings,
        req.n or 1,
        assembler=lambda: ChoiceAssembler(
            output_parser(bundle, prompt_text, use.parsed),
            parallel_tool_calls=req.parallel_tool_calls is not False,
            functions_api=req.uses_functions,
            calls_allowed=use.calls_allowed,
        ),
        # A response template may name special tokens as its markers: it must see them.
        keep_special_tokens=bundle.reads_response_template,
        images=images,
        prompt_text=prompt_text if images else None,
    )


async def load_images(request: Request, req: ChatCompletionRequest) -> tuple[ImageInput, ...]:
    """The request's images, in the order the template shows them, read and checked under the
    server's media policy (``--max-images-per-request`` counts the whole conversation); the first
    refused one, in the request's order, is the 400 (or 413) that names it."""
    urls = image_urls(req.messages)
    if not urls:
        return ()
    policy: MediaPolicy = request.app.ctx.config.media
    policy.check_count(len(urls), "messages")
    loaded = await asyncio.gather(
        *(load_image(url, param, policy) for url, param in urls), return_exceptions=True
    )
    for result in loaded:
        if isinstance(result, BaseException):
            raise result
    return tuple(r for r in loaded if isinstance(r, ImageInput))


@bp.post("/v1/chat/completions", ctx_large_body=True)
async def chat_completions(request: Request) -> HTTPResponse | None:
    req = parse_chat_request(parse_json_body(request))
    choices = await prepare(request, req)
    try:
        return await _respond(request, req, choices)
    finally:
        abort(choices)  # however the response ended (client gone included), nothing runs on


async def _respond(
    request: Request, req: ChatCompletionRequest, choices: list[Choice]
) -> HTTPResponse | None:
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        chunks = ChunkFactory(completion_id, created, req.model)
        await _stream(request, choices, chunks, req.include_usage, req.n or 1)
        return None
    logprobs: dict[int, list[dict[str, Any]]] = {c.index: [] for c in choices}
    async for choice, delta in merged(choices):
        logprobs[choice.index] += delta.logprobs or []
        if delta.finish_reason is not None:
            choice.out.feed_last(delta.text)
        else:
            choice.out.feed(delta.text)
    return json(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": c.index,
                    "message": c.out.message(),
                    "logprobs": {"content": logprobs[c.index], "refusal": None} if req.logprobs else None,
                    "finish_reason": c.out.finish_reason(c.gen.finish_reason),
                }
                for c in choices
            ],
            "usage": usage(choices, req.n or 1),  # the prompt counts once, as OpenAI counts it
        },
        dumps=orjson.dumps,
    )


async def _stream(
    request: Request, choices: list[Choice], chunks: ChunkFactory, include_usage: bool, n: int
) -> None:
    deltas = merged(choices)
    # Wait for the first delta before sending headers, so a failure that happens before any
    # token (model load error, dead host) still gets its proper HTTP status.
    first = await anext(deltas)
    response = await request.respond(
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    assert response is not None
    for c in choices:
        await response.send(event(chunks.chunk({"role": "assistant", "content": ""}, index=c.index)))
    try:
        item: tuple[Choice, Delta] | None = first
        while item is not None:
            choice, delta = item
            last = delta.finish_reason is not None
            parsed = choice.out.feed_last(delta.text) if last else choice.out.feed(delta.text)
            payloads = choice.out.stream_deltas(parsed)
            if delta.logprobs and not payloads:  # text held back, but the tokens came
                payloads = [{}]
            # One write per delta: its content, tool-call and finish chunks go out together.
            out = [
                event(chunks.chunk(payload, index=choice.index, logprobs=delta.logprobs if i == 0 else None))
                for i, payload in enumerate(payloads)
            ]
            if delta.finish_reason is not None:
                reason = choice.out.finish_reason(delta.finish_reason)
                out.append(event(chunks.chunk({}, reason, index=choice.index)))
            if out:
                await response.send(b"".join(out))
            item = await anext(deltas, None)
    except APIError as exc:
        # Headers are gone already: report the error in-band, as OpenAI does.
        await response.send(event(exc.body()))
    if include_usage:
        await response.send(event(chunks.usage_chunk(usage(choices, n))))
    await response.send(DONE)
    await response.eof()

"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient, SamplingParams
from model_host.ipc.status import StatusField
from sanic_serve.chat_output import ChoiceAssembler
from sanic_serve.choices import Choice, merged, usage
from sanic_serve.config import ServerConfig
from sanic_serve.errors import APIError, InvalidRequest, Overloaded
from sanic_serve.generation import Delta, Generation
from sanic_serve.models import ModelResolver
from sanic_serve.prompt import completion_budget, render_chat
from sanic_serve.protocol import ChatCompletionRequest, parse_chat_request
from sanic_serve.sse import DONE, SYSTEM_FINGERPRINT, ChunkFactory, event

bp = Blueprint("chat")


def parse_json_body(request: Request) -> Any:
    if not request.body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc


async def prepare(request: Request, req: ChatCompletionRequest) -> list[Choice]:
    models: ModelResolver = request.app.ctx.models
    client: HostClient = request.app.ctx.client
    config: ServerConfig = request.app.ctx.config
    # Refuse at once when the host's queue is already full (the host enforces it too, exactly).
    if client.status.get(StatusField.WAITING) >= config.max_queue:
        raise Overloaded("The server is busy: too many waiting requests. Retry shortly.")
    bundle = await models.resolve(req.model)
    prompt_ids = render_chat(
        bundle, [m.for_template() for m in req.messages], req.offered_tools(), req.chat_template_kwargs
    )
    budget = completion_budget(bundle, len(prompt_ids), req.max_new_tokens)
    temperature = req.temperature if req.temperature is not None else bundle.default_temperature
    bias = req.bias_pairs()
    vocab = bundle.tokenizer.get_vocab_size(with_added_tokens=True)
    if any(token >= vocab for token, _ in bias):
        raise InvalidRequest(
            f"logit_bias names a token id outside the vocabulary of {vocab}.", param="logit_bias"
        )
    sampling = SamplingParams(
        max_new_tokens=budget,
        temperature=temperature,
        top_p=req.top_p if req.top_p is not None else bundle.default_top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=bias,
        stop_token_ids=() if req.ignore_eos else bundle.stop_token_ids,
    )
    parser = bundle.tool_parser if req.offered_tools() else None
    choices = []
    for index in range(req.n or 1):
        # n seeded choices: seed, seed + 1, ... so they differ and each is reproducible.
        seeded = replace(sampling, seed=req.seed + index) if req.seed is not None else sampling
        out = ChoiceAssembler(parser, parallel_tool_calls=req.parallel_tool_calls is not False)
        choices.append(Choice(index, Generation(client, bundle, prompt_ids, seeded, req.stop_strings), out))
    return choices


@bp.post("/v1/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    req = parse_chat_request(parse_json_body(request))
    choices = await prepare(request, req)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = ChunkFactory(completion_id, created, req.model)
        await _stream(request, choices, chunks, include_usage)
        return None
    async for choice, delta in merged(choices):
        choice.out.feed(delta.text)
    for choice in choices:
        choice.out.finish()
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
                    "logprobs": None,
                    "finish_reason": c.out.finish_reason(c.gen.finish_reason),
                }
                for c in choices
            ],
            "usage": usage(choices),
        },
        dumps=orjson.dumps,
    )


async def _stream(request: Request, choices: list[Choice], chunks: ChunkFactory, include_usage: bool) -> None:
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
            parsed = choice.out.feed(delta.text)
            if delta.finish_reason is not None:
                rest = choice.out.finish()
                parsed.content += rest.content
                parsed.calls += rest.calls
            for payload in choice.out.stream_deltas(parsed):
                await response.send(event(chunks.chunk(payload, index=choice.index)))
            if delta.finish_reason is not None:
                reason = choice.out.finish_reason(delta.finish_reason)
                await response.send(event(chunks.chunk({}, reason, index=choice.index)))
            item = await anext(deltas, None)
    except APIError as exc:
        # Headers are gone already: report the error in-band, as OpenAI does.
        await response.send(event(exc.body()))
    if include_usage:
        await response.send(event(chunks.usage_chunk(usage(choices))))
    await response.send(DONE)
    await response.eof()

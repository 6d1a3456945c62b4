"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient, SamplingParams
from model_host.ipc.status import StatusField
from sanic_serve.chat_output import ChoiceAssembler
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


async def prepare(request: Request, req: ChatCompletionRequest) -> Generation:
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
    return Generation(client, bundle, prompt_ids, sampling, req.stop_strings)


def usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


@bp.post("/v1/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    req = parse_chat_request(parse_json_body(request))
    gen = await prepare(request, req)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    parser = gen.bundle.tool_parser if req.offered_tools() else None
    out = ChoiceAssembler(parser, parallel_tool_calls=req.parallel_tool_calls is not False)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = ChunkFactory(completion_id, created, req.model)
        await _stream(request, gen, out, chunks, include_usage)
        return None
    async for delta in gen.deltas():
        out.feed(delta.text)
    out.finish()
    return json(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": out.message(),
                    "logprobs": None,
                    "finish_reason": out.finish_reason(gen.finish_reason),
                }
            ],
            "usage": usage(gen),
        },
        dumps=orjson.dumps,
    )


async def _stream(
    request: Request, gen: Generation, out: ChoiceAssembler, chunks: ChunkFactory, include_usage: bool
) -> None:
    deltas = gen.deltas()
    # Wait for the first delta before sending headers, so a failure that happens before any
    # token (model load error, dead host) still gets its proper HTTP status.
    first: Delta = await deltas.__anext__()
    response = await request.respond(
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    assert response is not None
    await response.send(event(chunks.chunk({"role": "assistant", "content": ""})))
    try:
        delta: Delta | None = first
        while delta is not None:
            parsed = out.feed(delta.text)
            if delta.finish_reason is not None:
                rest = out.finish()
                parsed.content += rest.content
                parsed.calls += rest.calls
            for payload in out.stream_deltas(parsed):
                await response.send(event(chunks.chunk(payload)))
            if delta.finish_reason is not None:
                await response.send(event(chunks.chunk({}, out.finish_reason(delta.finish_reason))))
            delta = await anext(deltas, None)
    except APIError as exc:
        # Headers are gone already: report the error in-band, as OpenAI does.
        await response.send(event(exc.body()))
    if include_usage:
        await response.send(event(chunks.usage_chunk(usage(gen))))
    await response.send(DONE)
    await response.eof()

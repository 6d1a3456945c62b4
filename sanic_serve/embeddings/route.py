"""``POST /v1/embeddings``: OpenAI's ``CreateEmbeddingRequest`` (see ``embeddings.protocol``)."""

from __future__ import annotations

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import FinishReason, HostClient
from model_host.ipc.model_kind import ModelKind
from sanic_serve.access_log import count_prompt_tokens
from sanic_serve.embeddings.protocol import embedding_response, parse_embedding_request, tokenize_inputs
from sanic_serve.errors import ServerError, from_host_error
from sanic_serve.requests import admit, off_the_loop, parse_json_body

bp = Blueprint("embeddings")


@bp.post("/v1/embeddings", ctx_large_body=True)
async def create_embeddings(request: Request) -> HTTPResponse:
    req = parse_embedding_request(parse_json_body(request))
    bundle = await admit(request, req.model, ModelKind.EMBEDDING)
    assert bundle.embedding is not None
    batch = await off_the_loop(request, tokenize_inputs, req, bundle.embedding, bundle.tokenizer, bundle.id)
    vectors = await _vectors(request.app.ctx.client, bundle.path, batch)
    tokens = sum(len(ids) for ids in batch)
    count_prompt_tokens(tokens)  # for the access log
    body = embedding_response(req, bundle.embedding, req.model, vectors, tokens)
    return json(body, dumps=orjson.dumps)


async def _vectors(client: HostClient, model_path: str, batch: list[list[int]]) -> list[bytes]:
    """One vector per input, as the host sends them (each frame names its input). Whatever way
    this ends (error, client gone), an unfinished request is aborted in the host."""
    stream = client.embed(model_path, batch)
    found: list[bytes | None] = [None] * len(batch)
    try:
        while not stream.finished:
            for frame in await stream.frames():
                if frame.error is not None:
                    raise from_host_error(frame.error)
                if frame.vector is not None and 0 <= frame.index < len(found):
                    found[frame.index] = frame.vector
                if frame.finish_reason is not FinishReason.NONE:
                    break
    finally:
        client.abort(stream)
    vectors = [v for v in found if v is not None]
    if len(vectors) != len(batch):  # the host finished without every vector: a bug, said plainly
        raise ServerError("The embedding request ended without every vector.", code="embedding_failed")
    return vectors

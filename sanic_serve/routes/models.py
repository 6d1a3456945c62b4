"""``GET /v1/models`` and ``GET /v1/models/{id}``: the default or pinned model plus loaded ones.
Each says, beside OpenAI's fields, which of this server's ``endpoints`` it serves (a speech model
the audio routes, an embedder ``/v1/embeddings``) and what it reads (``input_modalities``: a
vision-language model ``["text", "image"]``), read from its folder."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient
from model_host.ipc.model_kind import ModelKind, detect_kind
from sanic_serve.errors import ModelNotFound
from sanic_serve.models import ModelResolver

bp = Blueprint("models")

ENDPOINTS: dict[ModelKind, list[str]] = {
    ModelKind.CAUSAL: ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"],
    ModelKind.VISION: ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"],
    ModelKind.EMBEDDING: ["/v1/embeddings"],
    ModelKind.SEQ2SEQ: ["/v1/audio/transcriptions", "/v1/audio/translations"],
}

INPUT_MODALITIES: dict[ModelKind, list[str]] = {
    ModelKind.CAUSAL: ["text"],
    ModelKind.VISION: ["text", "image"],
    ModelKind.EMBEDDING: ["text"],
    ModelKind.SEQ2SEQ: ["audio"],
}


def _kind(models: ModelResolver, model_id: str, path: str | None) -> ModelKind:
    for bundle in models.known():
        if bundle.id == model_id:
            return bundle.kind
    # A model the host loaded for another worker: its folder says (a Hub id is served as causal).
    return detect_kind(path) if path else ModelKind.CAUSAL


def _served(request: Request) -> dict[str, dict[str, Any]]:
    models: ModelResolver = request.app.ctx.models
    client: HostClient = request.app.ctx.client
    created = {b.id: b.created for b in models.known()}
    paths: dict[str, str | None] = {}
    if models.default is not None:
        paths[models.default.id] = models.default.path
    for path in client.status.snapshot().models:
        paths.setdefault(models.id_for_path(path), path)
    kinds = {mid: _kind(models, mid, path) for mid, path in paths.items()}
    return {
        mid: {
            "id": mid,
            "object": "model",
            "created": created.get(mid, 0),
            "owned_by": "hfserve",
            "endpoints": ENDPOINTS[kind],
            "input_modalities": INPUT_MODALITIES[kind],
        }
        for mid, kind in kinds.items()
    }


@bp.get("/v1/models")
async def list_models(request: Request) -> HTTPResponse:
    return json({"object": "list", "data": list(_served(request).values())}, dumps=orjson.dumps)


@bp.get("/v1/models/<model_id:path>")
async def get_model(request: Request, model_id: str) -> HTTPResponse:
    model_id = unquote(model_id)
    found = _served(request).get(model_id)
    if found is None:
        raise ModelNotFound(model_id)
    return json(found, dumps=orjson.dumps)

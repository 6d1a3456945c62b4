"""``GET /v1/models`` and ``GET /v1/models/{id}``: the default or pinned model plus loaded ones."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient
from sanic_serve.errors import ModelNotFound
from sanic_serve.models import ModelResolver

bp = Blueprint("models")


def _served(request: Request) -> dict[str, dict[str, Any]]:
    models: ModelResolver = request.app.ctx.models
    client: HostClient = request.app.ctx.client
    created = {b.id: b.created for b in models.known()}
    ids: list[str] = []
    if models.default is not None:
        ids.append(models.default.id)
    for path in client.status.snapshot().models:
        mid = models.id_for_path(path)
        if mid not in ids:
            ids.append(mid)
    return {
        mid: {"id": mid, "object": "model", "created": created.get(mid, 0), "owned_by": "hfserve"}
        for mid in ids
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

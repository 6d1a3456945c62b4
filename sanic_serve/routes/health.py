"""``GET /health``: 200 while the model host is alive and answering, 503 otherwise."""

from __future__ import annotations

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient

bp = Blueprint("health")


@bp.get("/health")
async def health(request: Request) -> HTTPResponse:
    client: HostClient = request.app.ctx.client
    alive = client.host_alive()
    body = {
        "status": "ok" if alive else "unavailable",
        "worker": {"index": client.worker_index, "open_requests": client.open_requests},
        "host": client.status.snapshot().to_dict(),
    }
    return json(body, status=200 if alive else 503, dumps=orjson.dumps)

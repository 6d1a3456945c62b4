"""``GET /health``: 200 while the model host is alive and ready to serve; 503 while it loads, is down,
or the server drains. With API keys set, only a request with a key sees more than the status."""

from __future__ import annotations

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient
from sanic_serve.auth import carries_valid_key, key_checker
from sanic_serve.lifecycle.drain import draining

bp = Blueprint("health")


@bp.get("/health")
async def health(request: Request) -> HTTPResponse:
    client: HostClient = request.app.ctx.client
    snapshot = client.status.snapshot()
    alive = client.host_alive()
    # 200 only when requests can be served: the host is alive and has loaded its models, and the
    # server is not draining (a load balancer stops sending before the listener goes away).
    stopping = draining(request.app)
    ready = alive and snapshot.ready and not stopping
    status = "draining" if stopping else "ok" if ready else "loading" if alive else "unavailable"
    checker = key_checker(request.app)
    if checker is not None and not carries_valid_key(request, checker):
        # Public so that probes need no key; with keys set, a stranger learns whether to send
        # traffic and nothing about the machine (model folders under home paths, pids, totals).
        return json({"status": status}, status=200 if ready else 503)
    body = {
        "status": status,
        "worker": {"index": client.worker_index, "open_requests": client.open_requests},
        "host": snapshot.to_dict(),
    }
    return json(body, status=200 if ready else 503, dumps=orjson.dumps)

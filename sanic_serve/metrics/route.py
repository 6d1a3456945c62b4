"""``GET /metrics``: Prometheus' text format, one view of every worker and the model host."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw

from model_host.ipc import HostClient
from sanic_serve.config import ServerConfig
from sanic_serve.metrics import multiproc
from sanic_serve.metrics.host import HostCollector
from sanic_serve.models import ModelResolver

bp = Blueprint("metrics")
# The classic text format every Prometheus reads (our names are all valid in it); newer clients
# label their output 1.0.0, which Prometheus before 3.0 does not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(client: HostClient, config: ServerConfig, models: ModelResolver) -> bytes:
    # A registry per scrape, as prometheus-client's multiprocess mode asks: the values are read
    # from every process's files each time, never kept in this process.
    registry = CollectorRegistry()
    folder = os.environ.get(multiproc.ENV)
    if folder and os.path.isdir(folder):
        multiproc.forget_dead_processes(folder)
        MultiProcessCollector(registry, folder)
    alive = client.host_alive()
    registry.register(
        HostCollector(
            client.status, alive, config.metrics_vllm_names, models.id_for_path, config.default_model_id
        )
    )
    return generate_latest(registry)


@bp.get("/metrics")
async def metrics(request: Request) -> HTTPResponse:
    ctx = request.app.ctx
    body = render(ctx.client, ctx.config, ctx.models)
    return raw(body, headers={"Content-Type": CONTENT_TYPE})

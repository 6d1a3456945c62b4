"""``GET /metrics``: Prometheus' text format, one view of every worker and the model host."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw

from model_host.ipc import HostClient
from sanic_serve.config import ServerConfig
from sanic_serve.metrics import multiproc
from sanic_serve.metrics.host import HostCollector

bp = Blueprint("metrics")


def render(client: HostClient, config: ServerConfig) -> bytes:
    # A registry per scrape, as prometheus-client's multiprocess mode asks: the values are read
    # from every process's files each time, never kept in this process.
    registry = CollectorRegistry()
    folder = os.environ.get(multiproc.ENV)
    if folder and os.path.isdir(folder):
        multiproc.forget_dead_processes(folder)
        MultiProcessCollector(registry, folder)
    registry.register(HostCollector(client.status, client.host_alive(), config.metrics_vllm_names))
    return generate_latest(registry)


@bp.get("/metrics")
async def metrics(request: Request) -> HTTPResponse:
    body = render(request.app.ctx.client, request.app.ctx.config)
    return raw(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

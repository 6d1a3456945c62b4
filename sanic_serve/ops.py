"""What running as a service adds to the HTTP side, installed on the app in one call: API keys,
CORS, request ids with an access log, and Prometheus metrics (see ``docs/design.md``)."""

from __future__ import annotations

from pathlib import Path

from sanic import Sanic

from sanic_serve import access_log, auth, cors
from sanic_serve.access_log import configure_worker_logging
from sanic_serve.config import ServerConfig
from sanic_serve.metrics import multiproc, worker
from sanic_serve.metrics.route import bp as metrics_bp


def install(app: Sanic, config: ServerConfig) -> None:
    app.blueprint(metrics_bp)
    cors.install(app, config.cors_origins)
    auth.install(app, config.api_keys, config.metrics_auth)

    @app.main_process_start
    async def _metrics_dir(app: Sanic) -> None:
        # Before any worker or the model host starts: they inherit the folder's name.
        app.ctx.metrics_dir = multiproc.create_dir()

    @app.main_process_stop
    async def _remove_metrics_dir(app: Sanic) -> None:
        folder: Path | None = getattr(app.ctx, "metrics_dir", None)
        if folder is not None:
            multiproc.remove_dir(folder)

    @app.before_server_start
    async def _worker_side(app: Sanic) -> None:
        from sanic_serve.app import worker_index

        configure_worker_logging(config.log_level, worker_index())
        metrics = worker.WorkerMetrics(config.metrics_vllm_names)
        worker.install(metrics)
        access_log.install(app, [metrics])

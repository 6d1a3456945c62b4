"""The Sanic application factory and its process wiring.

Main process: ``main_process_start`` creates every multiprocessing object (pipes, rings, status) and
shares it through ``app.shared_ctx``; ``main_process_ready`` asks Sanic's worker manager to run the
one model-host process beside the HTTP workers, and a small supervisor restarts that host if it
dies. Worker processes: ``before_server_start`` attaches the worker to its own ring and pipe.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from multiprocessing import get_context

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient, create_channels
from model_host.ipc.channels import Channels, HostSide
from model_host.ipc.settings import HostSettings
from sanic_serve import ops
from sanic_serve.access_log import ObservedSanic
from sanic_serve.audio import route as audio
from sanic_serve.body import SMALL_BODY_LIMIT_BYTES, RequestTimedOut, TimedRequest
from sanic_serve.chat import route as chat
from sanic_serve.completions import route as completions
from sanic_serve.config import ServerConfig
from sanic_serve.embeddings import route as embeddings
from sanic_serve.errors import APIError, error_body, error_response, internal_error
from sanic_serve.lifecycle import HOST_PROCESS_NAME, install_lifecycle, start_main, stop_main
from sanic_serve.lifecycle.supervisor import server_index
from sanic_serve.messages import route as messages
from sanic_serve.messages.errors import anthropic_body, is_messages_path
from sanic_serve.models import ModelResolver
from sanic_serve.responses import background as background_responses
from sanic_serve.responses import route as responses
from sanic_serve.responses import stored as stored_responses
from sanic_serve.routes import health, loading, models, tokenize

log = logging.getLogger("hfserve")


def worker_index() -> int:
    """This worker's index, stable across its restarts (see ``server_index``)."""
    return server_index(os.environ.get("SANIC_WORKER_NAME", "")) or 0


def _set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle

        setproctitle(title)
    except ImportError:
        pass


def _share(app: Sanic, channels: Channels) -> None:
    ctx = app.shared_ctx
    ctx.request_readers = channels.request_readers
    ctx.request_writers = channels.request_writers
    ctx.rings = channels.rings
    ctx.doorbell_readers = channels.doorbell_readers
    ctx.doorbell_writers = channels.doorbell_writers
    ctx.status_fields = channels.status_fields
    ctx.status_models = channels.status_models


def _shared(app: Sanic) -> Channels:
    ctx = app.shared_ctx
    return Channels(
        ctx.request_readers,
        ctx.request_writers,
        ctx.rings,
        ctx.doorbell_readers,
        ctx.doorbell_writers,
        ctx.status_fields,
        ctx.status_models,
    )


def _internal_error(request: Request, exc: Exception, status: int = 500) -> HTTPResponse:
    """Plain words and a request id for the client; the exception, under that id, for the log."""
    ref = f"req_{uuid.uuid4().hex[:16]}"
    log.error("unhandled error on %s %s (request id %s)", request.method, request.path, ref, exc_info=exc)
    error = internal_error("Internal server error", ref)
    error.status = status
    return error_response(error)


HostEntry = Callable[[HostSide, HostSettings], None]


def create_app(config: ServerConfig, run_host: HostEntry | None = None) -> Sanic:
    """The app of the main process and of every worker. ``run_host`` is the model host's entry
    point, handed in by whoever starts the server (the HTTP side never imports the host)."""
    app = ObservedSanic("hfserve", configure_logging=True, request_class=TimedRequest)
    # Sanic's loggers have handlers of their own: passed on to the root logger as well, every line
    # would be printed twice.
    for name in ("sanic.root", "sanic.error", "sanic.access", "sanic.server", "sanic.websockets"):
        logging.getLogger(name).propagate = False
    # Routes that take large bodies say so (sanic_serve.body); this bounds the rest, and the body
    # Sanic drains after a handler that ignored it.
    app.config.REQUEST_MAX_SIZE = SMALL_BODY_LIMIT_BYTES
    # The head's deadline (sanic_serve.head_timeout); bodies have theirs in TimedRequest. Sanic
    # annotates an int and compares a number: fractions of a second work.
    app.config.REQUEST_TIMEOUT = config.request_timeout_s  # type: ignore[assignment]
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # generation may legitimately run long
    app.config.NOREQUEST_LOGGING = True
    app.ctx.config = config
    for bp in (chat.bp, completions.bp, embeddings.bp, responses.bp, models.bp, health.bp, loading.bp):
        app.blueprint(bp)
    app.blueprint(stored_responses.bp)
    app.blueprint(tokenize.bp)  # /tokenize, /detokenize (vLLM's), on the worker alone
    app.blueprint(messages.bp)  # Anthropic's /v1/messages, with its own error shape
    app.blueprint(audio.bp)  # /v1/audio/transcriptions and /translations (Whisper-family models)
    ops.install(app, config)  # API keys, CORS, request ids and access log, /metrics

    @app.main_process_start
    async def _create_channels(app: Sanic) -> None:
        _set_title("hfserve: main")
        channels = create_channels(get_context("spawn"), config.workers, config.ring_capacity_bytes)
        _share(app, channels)
        app.ctx.channels = channels

    @app.main_process_ready
    async def _start_host(app: Sanic) -> None:
        channels: Channels = app.ctx.channels
        assert run_host is not None, "the main process needs the model host's entry point"
        app.manager.manage(
            HOST_PROCESS_NAME,
            run_host,
            {"side": channels.host_side(), "settings": config.host_settings()},
            restartable=True,
        )
        start_main(app, config)  # supervisor, systemd notifications, drain on stop

    @app.main_process_stop
    async def _stop(app: Sanic) -> None:
        stop_main(app)
        app.ctx.channels.close()

    @app.before_server_start
    async def _attach(app: Sanic) -> None:
        index = worker_index()
        _set_title(f"hfserve: worker {index}")
        client = HostClient(_shared(app).worker_side(index))
        client.start(app.loop)
        app.ctx.client = client
        app.ctx.models = ModelResolver(config)
        app.ctx.responses = stored_responses.open_store(config)  # one connection per worker

    @app.after_server_stop
    async def _detach(app: Sanic) -> None:
        await background_responses.stop_all()  # saved as interrupted, their generations aborted
        await app.ctx.client.close()
        if getattr(app.ctx, "responses", None) is not None:
            app.ctx.responses.close()
        if getattr(app.ctx, "mcp", None) is not None:  # stops the --mcp-config stdio servers it ran
            await app.ctx.mcp.close()

    @app.exception(APIError)
    async def _api_error(request: Request, exc: APIError) -> HTTPResponse:
        return error_response(exc)

    @app.exception(SanicException)
    async def _sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
        status = getattr(exc, "status_code", 500) or 500
        if status >= 500:  # Sanic's own failures: their text is no business of the client's
            return _internal_error(request, exc, status)
        if status == 408:  # the headers did not arrive in time (Sanic's REQUEST_TIMEOUT)
            return error_response(RequestTimedOut(config.request_timeout_s))
        if is_messages_path(request.path):
            # A refusal made before routing (a body over the limit, judged on its Content-Length)
            # never reaches the Messages blueprint's handler: it is answered in Anthropic's shape here.
            return json(anthropic_body(str(exc), status), status=status)
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        return json(error_body(str(exc), "invalid_request_error", None, code), status=status)

    @app.exception(Exception)
    async def _unexpected(request: Request, exc: Exception) -> HTTPResponse:
        return _internal_error(request, exc)

    install_lifecycle(app, config)  # drain state, requests in flight, 503 while draining
    return app

"""Per-request identity and the access log: ``X-Request-Id`` and one log line per request.

Every request gets a record (its id, when it began, the tokens it used) in a context variable: the
handler, the generation code and every log call made on behalf of the request run in the task that
set it, so a logging filter can stamp each line with the request's id without the id being passed
around. The id is the client's ``X-Request-Id`` when it is a plain token, else a new one; either
way it goes back in the response's ``X-Request-Id``.

The access line is written when Sanic's ``handle_request`` returns (``ObservedSanic``), not from
response middleware: middleware runs when a stream's headers go out, long before its last token,
and never for a request cancelled by a client that went away.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from sanic import Request, Sanic
from sanic.response import BaseHTTPResponse

REQUEST_ID_HEADER = "X-Request-Id"
# A client's id is echoed and logged only when it cannot forge log lines or headers: printable
# ASCII without spaces, bounded in length. Anything else is replaced by a fresh id.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
NO_REQUEST = "-"

access_log = logging.getLogger("hfserve.access")


@dataclass(slots=True)
class RequestRecord:
    """What the access log and the metrics need to know about one request."""

    request_id: str
    method: str
    path: str
    started_s: float  # time.perf_counter() when the request reached the handler stage
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started_s


current_request: ContextVar[RequestRecord | None] = ContextVar("hfserve_request", default=None)


def count_prompt_tokens(tokens: int) -> None:
    """Add to the current request's prompt tokens (for routes that do not generate)."""
    record = current_request.get()
    if record is not None:
        record.prompt_tokens += tokens


def request_id_of(request: Request) -> str:
    """The id this request is known by (in its response header and its log lines)."""
    record: RequestRecord | None = getattr(request.ctx, "record", None)
    return record.request_id if record is not None else NO_REQUEST


def route_label(request: Request) -> str:
    """The matched route's pattern (``/v1/models/<model_id:path>``), never the raw path: a
    client sending random paths must not create a metric series or log field per path."""
    route = getattr(request, "route", None)
    if route is None:
        return "unmatched"
    return "/" + str(route.path).lstrip("/")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record: the id of the request being handled, else ``-``."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = current_request.get()
        record.request_id = current.request_id if current is not None else NO_REQUEST
        return True


def configure_worker_logging(level: str, worker: int) -> None:
    """A worker's log lines, its own and its libraries', with the worker and the request id. The
    main process configures only itself; spawned workers start with no handler at all."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s [worker {worker}] %(levelname)s %(name)s [request_id=%(request_id)s]: %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


def _begin(request: Request) -> RequestRecord:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
    record = RequestRecord(request_id, request.method, request.path, time.perf_counter())
    request.ctx.record = record
    return record


def _status_of(request: Request) -> int | None:
    stream = getattr(request, "stream", None)
    response: BaseHTTPResponse | None = getattr(stream, "response", None)
    return None if response is None else int(response.status)


class RequestObserver(Protocol):
    def request_began(self, request: Request) -> None: ...

    def request_ended(self, request: Request, record: RequestRecord, status: int | None) -> None: ...


class ObservedSanic(Sanic):
    """The app class: each request gets a record on the way in; the access line and each
    observer (the HTTP metrics) run on the way out, whatever way it ends. Sanic rewrites
    ``handle_request`` on its own class at start-up (dropping unused signal dispatches); the
    override calls it through ``super()`` at call time, so it runs the rewritten method."""

    async def handle_request(self, request: Request) -> None:  # type: ignore[override]
        observers: list[RequestObserver] = getattr(self.ctx, "request_observers", [])
        record = _begin(request)
        token = current_request.set(record)
        for observer in observers:
            observer.request_began(request)
        outcome = ""
        try:
            await super().handle_request(request)
        except BaseException:  # cancelled: the client went away, or the server is stopping
            outcome = " (cancelled)"
            raise
        finally:
            status = _status_of(request)
            for observer in observers:
                observer.request_ended(request, record, status)
            access_log.info(
                "%s %s route=%s status=%s duration_ms=%.1f prompt_tokens=%d completion_tokens=%d%s",
                record.method,
                record.path,
                route_label(request),
                status if status is not None else "-",
                record.elapsed_s() * 1000.0,
                record.prompt_tokens,
                record.completion_tokens,
                outcome,
            )
            current_request.reset(token)  # the connection's next request starts clean


def observe(app: Sanic, observer: RequestObserver) -> None:
    """Have ``observer`` told of every request of this worker, however it ends (a client gone
    included): the place to count requests in flight. Sanic forbids replacing ``handle_request``
    on an app instance; this is the hook instead."""
    observers: list[RequestObserver] = getattr(app.ctx, "request_observers", [])
    app.ctx.request_observers = [*observers, observer]


def install(app: Sanic, observers: list[RequestObserver]) -> None:
    """Observe this worker's requests (``app`` is an ``ObservedSanic``) and echo their ids."""
    for observer in observers:
        observe(app, observer)

    @app.on_response(priority=1000)
    async def _echo_request_id(request: Request, response: BaseHTTPResponse) -> None:
        response.headers[REQUEST_ID_HEADER] = request_id_of(request)

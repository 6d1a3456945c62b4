"""Request bodies read under a deadline and a per-route size limit.

Sanic reads a body after routing, in its handler stage, where only its response timeout applies
(24 h here, since generations may run long): a client that sent the headers and half a body would
hold the connection and its handler for that long. :class:`TimedRequest` reads every body under
``--request-timeout-s`` instead and answers a slow or stalled client with a 408; Sanic's own
``REQUEST_TIMEOUT`` covers the headers before it. Routes that take prompts say so
(``ctx_large_body=True``) and take up to ``max_request_bytes`` (16 MiB, or room for one image at
``--max-image-mb`` as a data URL when that is more); the others take small
JSON commands (1 MiB); audio uploads (``ctx_audio_body=True``) take ``--max-audio-mb``.
"""

from __future__ import annotations

import asyncio
import logging

from sanic import Request
from sanic.http import Http

from sanic_serve.audio.request import DEFAULT_MAX_AUDIO_MB
from sanic_serve.errors import APIError

log = logging.getLogger(__name__)

SMALL_BODY_LIMIT_BYTES = 1024 * 1024  # routes that declare no limit of their own
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class RequestTimedOut(APIError):
    status = 408

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"The request did not arrive within {timeout_s:g} s; the connection was closed.",
            code="request_timeout",
        )


# Room for a multipart form's other fields and boundaries beside an upload of the largest size.
FORM_OVERHEAD_BYTES = 1024 * 1024


def route_body_limit(request: Request, large_limit_bytes: int) -> int:
    route = request.route
    if route is not None and getattr(route.ctx, "audio_body", False):
        # Uploads have their own limit (--max-audio-mb, OpenAI's 25 MB by default); the form's parser
        # answers a file over it with a 413 naming `file`, Sanic a body far over it with its own 413.
        config = getattr(request.app.ctx, "config", None)
        max_audio_mb = float(getattr(config, "max_audio_mb", DEFAULT_MAX_AUDIO_MB))
        return int(max_audio_mb * 1024 * 1024) + FORM_OVERHEAD_BYTES
    large = route is not None and getattr(route.ctx, "large_body", False)
    return large_limit_bytes if large else SMALL_BODY_LIMIT_BYTES


class TimedRequest(Request):
    """Sanic calls ``receive_body`` before every handler that takes a body: it is the place
    Sanic documents for custom body handling."""

    async def receive_body(self) -> None:
        stream = self.stream
        if self.body or stream is None or not stream.request_body:
            return
        config = getattr(self.app.ctx, "config", None)
        timeout_s = float(getattr(config, "request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S))
        large_limit = getattr(config, "large_body_bytes", None)
        large_limit_bytes = int(large_limit()) if callable(large_limit) else SMALL_BODY_LIMIT_BYTES
        # Sanic checks this before reading (against Content-Length) and again as chunks arrive.
        stream.request_max_size = route_body_limit(self, large_limit_bytes)
        try:
            await asyncio.wait_for(super().receive_body(), timeout_s)
        except TimeoutError:
            # Once the 408 is out, the connection closes: Sanic would otherwise wait on to drain
            # the rest of a body that is not coming.
            if isinstance(stream, Http):
                stream.keep_alive = False
                stream.request_body = None
            log.info("%s %s: body not received within %g s", self.method, self.path, timeout_s)
            raise RequestTimedOut(timeout_s) from None

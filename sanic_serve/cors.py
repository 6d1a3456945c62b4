"""CORS for browser clients, off unless ``--cors-origin`` names origins (or ``*``).

An allowed origin is echoed in ``Access-Control-Allow-Origin`` (with ``Vary: Origin``, so a cache
never hands one origin's answer to another) on every response, errors and 401s included, so that
the page can read what went wrong. Preflights (``OPTIONS`` with ``Access-Control-Request-Method``)
are answered here, before the API key check: browsers send them without credentials. No
``Allow-Credentials``: the API key travels in a header the page sets itself, never in a cookie.
"""

from __future__ import annotations

from sanic import Request, Sanic
from sanic.response import BaseHTTPResponse, HTTPResponse, empty

from sanic_serve.access_log import REQUEST_ID_HEADER
from sanic_serve.errors import APIError, error_response

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE_S = 600
# Headers a browser page may read from a response besides the CORS-safelisted ones.
EXPOSED_HEADERS = f"{REQUEST_ID_HEADER}, Retry-After, WWW-Authenticate"


class CorsPolicy:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    def allows(self, origin: str) -> bool:
        return self.any or origin in self.origins


def install(app: Sanic, origins: tuple[str, ...]) -> None:
    """Answer preflights and mark responses for ``origins``; nothing at all without origins."""
    if not origins:
        return
    policy = CorsPolicy(origins)

    async def _preflight(request: Request) -> HTTPResponse | None:
        origin = request.headers.get("Origin")
        if (
            request.method != "OPTIONS"
            or not origin
            or "Access-Control-Request-Method" not in request.headers
        ):
            return None
        if not policy.allows(origin):
            return error_response(
                APIError(
                    f"Origin {origin!r} is not allowed here.", code="cors_origin_not_allowed", status=403
                )
            )
        headers = {
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        }
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:  # whatever the page wants to send (Authorization, Content-Type, OpenAI-*)
            headers["Access-Control-Allow-Headers"] = asked
        return empty(status=204, headers=headers)

    app.register_middleware(_preflight, "request", priority=1000)  # before the API key check

    @app.on_response(priority=1000)
    async def _allow(request: Request, response: BaseHTTPResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and policy.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"

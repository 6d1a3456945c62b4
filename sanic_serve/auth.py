"""API keys: ``Authorization: Bearer KEY`` on every route but an explicit public list.

The check is app-wide request middleware, so a route added later (by any blueprint) is guarded
without anyone remembering to; a test walks the app's route table to hold that. Unknown paths are
guarded too: without a key, a client learns nothing about which routes exist.

Keys are compared in constant time against every configured key (no early exit on the first
match, so the time taken says nothing about which key, if any, was close). Neither the header nor
a key is ever logged.
"""

from __future__ import annotations

import hmac
import re

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from sanic_serve.errors import APIError, error_response
from sanic_serve.messages.errors import anthropic_error_response, is_messages_path

# Open without a key: a load balancer's or systemd's health probe has none. /metrics is added
# unless --metrics-auth (Prometheus scrapes are usually unauthenticated on a local network).
PUBLIC_PATHS: frozenset[str] = frozenset({"/health"})
METRICS_PATH = "/metrics"

_BEARER = re.compile(r"Bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
# What a key may contain: the characters a bearer token can carry in a header (RFC 6750's b64token
# and then some), so a configured key can always be sent.
VALID_KEY = re.compile(r"[\x21-\x7e]{1,512}")


class InvalidAPIKey(APIError):
    """OpenAI's answer to a missing or wrong key, with the challenge RFC 6750 asks for."""

    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def public_paths(metrics_auth: bool) -> frozenset[str]:
    return PUBLIC_PATHS if metrics_auth else PUBLIC_PATHS | {METRICS_PATH}


class KeyChecker:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def accepts(self, presented: str) -> bool:
        given = presented.encode(errors="surrogateescape")
        matched = False
        for key in self._keys:  # every key, every time
            matched |= hmac.compare_digest(given, key)
        return matched


def check(request: Request, checker: KeyChecker) -> None:
    """Raise ``InvalidAPIKey`` unless the request carries one of the keys: as a bearer token, or
    in ``x-api-key`` as Anthropic's clients send it."""
    header = request.headers.get("Authorization")
    api_key = request.headers.get("x-api-key")
    if api_key and checker.accepts(api_key.strip()):
        return
    if api_key and not header:
        raise InvalidAPIKey("Incorrect API key provided.")
    if not header:
        raise InvalidAPIKey(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer KEY'."
        )
    found = _BEARER.fullmatch(header)
    if found is None or not checker.accepts(found.group(1)):
        # The presented key is not echoed back, unlike OpenAI's message: a client's log or a
        # proxy's error page is no place for a secret, even a wrong one.
        raise InvalidAPIKey("Incorrect API key provided.")


def carries_valid_key(request: Request, checker: KeyChecker) -> bool:
    try:
        check(request, checker)
    except InvalidAPIKey:
        return False
    return True


def key_checker(app: Sanic) -> KeyChecker | None:
    """The app's checker, for public routes that say more to a client with a key (None: no keys)."""
    checker: KeyChecker | None = getattr(app.ctx, "key_checker", None)
    return checker


def install(app: Sanic, keys: tuple[str, ...], metrics_auth: bool) -> None:
    """Guard every route of ``app`` with ``keys`` (nothing to do without keys)."""
    if not keys:
        return
    checker = KeyChecker(keys)
    app.ctx.key_checker = checker
    open_paths = public_paths(metrics_auth)

    # Early among request middleware, so no other middleware does work for a stranger; a CORS
    # preflight (which browsers send without credentials) is answered before this runs.
    async def _require_key(request: Request) -> HTTPResponse | None:
        if request.path in open_paths:
            return None
        try:
            check(request, checker)
        except InvalidAPIKey as exc:
            # Anthropic's routes answer in Anthropic's error shape, to its clients.
            return anthropic_error_response(exc) if is_messages_path(request.path) else error_response(exc)
        return None

    app.register_middleware(_require_key, "request", priority=900)

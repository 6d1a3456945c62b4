"""Anthropic's error shape, for the Messages routes only (the OpenAI routes keep OpenAI's).

``{"type": "error", "error": {"type": ..., "message": ...}}``, with the status Anthropic gives each
type. The server's own errors (``sanic_serve.errors``) are mapped here, so the chat machinery
raises what it always raises and only the wire shape changes.
"""

from __future__ import annotations

from typing import Any

import orjson
from sanic.response import JSONResponse, json

from sanic_serve.errors import APIError, Overloaded

# Anthropic's error types by HTTP status; 529 is its "overloaded" status.
_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
OVERLOADED_STATUS = 529
MESSAGES_PATH_PREFIX = "/v1/messages"


def error_type(status: int) -> str:
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_body(message: str, status: int) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def status_of(exc: APIError) -> int:
    """A full host queue is Anthropic's "overloaded" (529), not a per-client rate limit."""
    return OVERLOADED_STATUS if isinstance(exc, Overloaded) else exc.status


def anthropic_error(exc: APIError) -> dict[str, Any]:
    return anthropic_body(exc.message, status_of(exc))


def anthropic_error_response(exc: APIError) -> JSONResponse:
    status = status_of(exc)
    return json(anthropic_body(exc.message, status), status=status, headers=exc.headers, dumps=orjson.dumps)


def is_messages_path(path: str) -> bool:
    return path == MESSAGES_PATH_PREFIX or path.startswith(MESSAGES_PATH_PREFIX + "/")

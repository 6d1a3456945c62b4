"""OpenAI-shaped errors: every failure leaves the server as ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

import orjson
from sanic.response import JSONResponse, json

from model_host.ipc.messages import ErrorInfo, ErrorKind


class APIError(Exception):
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(APIError):
    status = 400


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or is not served here.",
            param="model",
            code="model_not_found",
        )


class Unavailable(APIError):
    status = 503
    type = "server_error"


class Overloaded(APIError):
    """Too many waiting requests: retry shortly (the ``Retry-After`` header says when)."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, code="server_overloaded", headers={"Retry-After": str(retry_after_s)})


class ServerError(APIError):
    status = 500
    type = "server_error"


def error_response(exc: APIError) -> JSONResponse:
    return json(exc.body(), status=exc.status, headers=exc.headers, dumps=orjson.dumps)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def internal_error(what: str, ref: str, code: str | None = None) -> ServerError:
    """A 5xx that says what failed in plain words and names the request, whose log line carries
    the traceback: the exception's own text never reaches a client."""
    return ServerError(f"{what} (request id {ref}).", code=code)


def from_host_error(
    info: ErrorInfo, ref: str = "unknown", model: str = "", prompt_param: str | None = None
) -> APIError:
    """Map an error value that crossed from the model host to the HTTP error it means. ``ref``
    names the request in the host's log (``request_ref``); ``prompt_param``, the field that holds
    the prompt (named by a prompt over the context)."""
    if info.kind is ErrorKind.MODEL_NOT_FOUND:
        return NotFound(info.message, param="model", code="model_not_found")
    if info.kind is ErrorKind.INVALID_REQUEST:
        return InvalidRequest(info.message)
    if info.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED:
        return InvalidRequest(info.message, param=prompt_param, code="context_length_exceeded")
    if info.kind is ErrorKind.OVERLOADED:
        return Overloaded(info.message)
    if info.kind is ErrorKind.ENGINE_DEAD:
        return Unavailable(info.message, code="engine_unavailable")
    if info.kind is ErrorKind.MODEL_LOAD_FAILED:
        return internal_error(f"The model `{model}` could not be loaded", ref, "model_load_failed")
    return internal_error("Generation failed", ref, "generation_failed")

"""``POST /load_model`` and ``POST /reset``: the model-management endpoints of ``transformers serve``,
in its shapes, so that ``transformers chat`` (which calls them) works against this server as is.

``/load_model`` streams the load as server-sent events: ``{"status": "loading", "model", "stage"}``
events (``progress: {"current", "total"}`` on the weights stage), ending in
``{"status": "ready", "model", "cached"}`` or ``{"status": "error", "model", "message"}``. Its stages
are the two places a model loads here: ``processor``, the worker resolving the model (folder,
tokenizer, chat template), and ``weights``, the host loading the weights, which it does on the first
request for them: a one-token request that generates nothing makes that happen, and is answered once
the weights are in and the token is prefilled. ``cached`` says the host had the weights already.
With ``"stream": false`` the answer is the ready object alone, or an OpenAI error (404 for an unknown
model, as everywhere).

``/reset`` unloads every model that is neither the default/pinned one nor in use by a request, and
answers ``{"status": "ok"}`` once the host has done it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient, RequestStream, SamplingParams
from sanic_serve.errors import APIError, InvalidRequest, ServerError, from_host_error
from sanic_serve.models import ModelBundle, ModelResolver
from sanic_serve.requests import parse_json_body
from sanic_serve.sse import event

log = logging.getLogger(__name__)

bp = Blueprint("loading")

# The warm-up request's prompt: token 0 is in every vocabulary, and one token is all it takes to
# run the model once.
_WARMUP_PROMPT = [0]


def _parse(request: Request) -> tuple[str, bool]:
    body = parse_json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required: the id or folder of the model to load.", param="model")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequest("Invalid value for 'stream': a boolean is expected.", param="stream")
    return model, stream


async def _finished(client: HostClient, stream: RequestStream) -> None:
    """Wait until ``stream`` ends; an error frame is raised as the ``APIError`` it means."""
    try:
        while not stream.finished:
            for frame in await stream.frames():
                if frame.error is not None:
                    raise from_host_error(frame.error)
    finally:
        client.abort(stream)  # a no-op once finished; otherwise the caller is gone


def _loading(model_id: str, stage: str, progress: tuple[int, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "loading", "model": model_id, "stage": stage}
    if progress is not None:
        out["progress"] = {"current": progress[0], "total": progress[1]}
    return out


async def _load_events(request: Request, model_id: str) -> AsyncIterator[dict[str, Any]]:
    """The load's events, the last one ``ready``; a failure raises ``APIError``."""
    client: HostClient = request.app.ctx.client
    models: ModelResolver = request.app.ctx.models
    bundle: ModelBundle | None = next((b for b in models.known() if b.id == model_id), None)
    if bundle is None:
        yield _loading(model_id, "processor")
        bundle = await models.resolve(model_id)
    if bundle.path in client.status.snapshot().models:
        yield {"status": "ready", "model": model_id, "cached": True}
        return
    yield _loading(model_id, "weights", (0, 1))
    warmup = SamplingParams(max_new_tokens=0, stop_token_ids=bundle.stop_token_ids)
    await _finished(client, client.submit(bundle.path, _WARMUP_PROMPT, warmup))
    yield _loading(model_id, "weights", (1, 1))
    yield {"status": "ready", "model": model_id, "cached": False}


def _for_client(exc: APIError, model_id: str) -> APIError:
    """Our own error messages go out as they are; a failure inside the host (its exception text)
    only to the log."""
    if isinstance(exc, ServerError):
        log.warning("loading %s failed: %s", model_id, exc.message)
        return ServerError(
            f"The model `{model_id}` could not be loaded; the server log says why.", code=exc.code
        )
    return exc


@bp.post("/load_model")
async def load_model(request: Request) -> HTTPResponse | None:
    model_id, streaming = _parse(request)
    if not streaming:
        try:
            events = [item async for item in _load_events(request, model_id)]
        except APIError as exc:
            raise _for_client(exc, model_id) from exc
        return json(events[-1])
    response = await request.respond(
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    assert response is not None
    try:
        async for item in _load_events(request, model_id):
            await response.send(event(item))
    except APIError as exc:
        failure = _for_client(exc, model_id)
        await response.send(event({"status": "error", "model": model_id, "message": failure.message}))
    except Exception:  # the headers are gone: the stream itself must say that it failed
        log.exception("loading %s failed", model_id)
        await response.send(
            event({"status": "error", "model": model_id, "message": "Internal server error."})
        )
    await response.eof()
    return None


@bp.post("/reset")
async def reset(request: Request) -> HTTPResponse:
    client: HostClient = request.app.ctx.client
    await _finished(client, client.unload_models())
    return json({"status": "ok"})

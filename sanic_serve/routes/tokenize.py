"""``POST /tokenize`` and ``POST /detokenize``, in vLLM's field names, for any model this worker
can resolve (chat or embedding). They run on the worker with the model's own tokenizer: no round
trip to the model host, and no admission check (they queue no work there).

``/tokenize`` takes a ``prompt`` string, or ``messages`` read as a chat request is: the rest of the
body goes through the chat route's own parser and renderer (``render_request``), so the ids are
exactly the ones ``/v1/chat/completions`` feeds the model for the same body (tools, tool choice,
``chat_template_kwargs``, ``add_generation_prompt`` and ``continue_final_message`` included). A
prompt gets the tokenizer's special tokens by default (as ``/v1/completions`` and
``/v1/embeddings`` do), a rendered chat none (its template writes them).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc.model_kind import GENERATIVE, ModelKind
from sanic_serve.chat.prompt import render_request
from sanic_serve.chat.request import parse_chat_request
from sanic_serve.chat.types import image_urls, refuse_media
from sanic_serve.errors import InvalidRequest
from sanic_serve.models import ModelBundle, ModelResolver
from sanic_serve.requests import off_the_loop, parse_json_body

bp = Blueprint("tokenize")


class _Fields(BaseModel):
    # vLLM accepts fields it does not know (clients send vendor extras); so do we, as no-ops.
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None  # None: the server's default model


class TokenizePrompt(_Fields):
    """vLLM's ``TokenizeCompletionRequest``."""

    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False


class TokenizeChatOptions(_Fields):
    """The fields of vLLM's ``TokenizeChatRequest`` that a chat request lacks; the others
    (``messages``, ``tools``, ``add_generation_prompt``, ...) are the chat request's own."""

    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool | None = False
    chat_template: StrictStr | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Fields):
    tokens: list[StrictInt]


# Taken out of a messages body before the chat parser reads the rest.
_TOKENIZE_ONLY = frozenset(TokenizeChatOptions.model_fields) - {"model"}

M = TypeVar("M", bound=BaseModel)


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first["loc"]))
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}", param=param) from None


def _json_object(request: Request) -> dict[str, Any]:
    body = parse_json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


async def _bundle(request: Request, model: str | None) -> ModelBundle:
    models: ModelResolver = request.app.ctx.models
    if model is not None:
        return await models.resolve(model)  # an unknown model: a 404 naming `model`
    if models.default is None:
        raise InvalidRequest("model is required: this server has no default model.", param="model")
    return models.default


def tokenize_body(bundle: ModelBundle, body: dict[str, Any]) -> dict[str, Any]:
    if "messages" in body:
        if "prompt" in body:
            raise InvalidRequest("Give prompt or messages, not both.", param="prompt")
        options = _parse(TokenizeChatOptions, body)
        if options.chat_template is not None:
            raise InvalidRequest(
                "A chat_template of the request's own is not supported: the model's template is used.",
                param="chat_template",
                code="unsupported_parameter",
            )
        if bundle.kind not in GENERATIVE:
            raise InvalidRequest(
                f"The model `{bundle.id}` has no chat template: tokenize a prompt instead.", param="messages"
            )
        chat_body = {k: v for k, v in body.items() if k not in _TOKENIZE_ONLY}
        req = parse_chat_request({**chat_body, "model": bundle.id})
        refuse_media(req.messages, bundle.id, takes_images=bundle.kind is ModelKind.VISION)
        images = image_urls(req.messages)
        if images:  # how many tokens an image becomes is the host's processor's to say
            raise InvalidRequest(
                "/tokenize counts text only: an image's tokens are counted when the model reads it.",
                param=images[0][1].removesuffix(".image_url"),
                code="unsupported_content_type",
            )
        prompt = render_request(bundle, req)
        ids = prompt.ids
        if options.add_special_tokens:  # vLLM's option: the tokenizer's own BOS/EOS on the rendered text
            ids = bundle.encode(prompt.text, add_special_tokens=True)
        return _tokens(bundle, ids, options.return_token_strs)
    if "prompt" not in body:
        raise InvalidRequest("Give prompt (a string) or messages (a conversation).", param="prompt")
    req_prompt = _parse(TokenizePrompt, body)
    ids = bundle.encode(req_prompt.prompt, add_special_tokens=req_prompt.add_special_tokens)
    return _tokens(bundle, ids, req_prompt.return_token_strs)


def _tokens(bundle: ModelBundle, ids: list[int], token_strs: bool | None) -> dict[str, Any]:
    return {
        "count": len(ids),
        "max_model_len": bundle.max_context,
        "tokens": ids,
        # The vocabulary's own strings (byte-level marks such as "Ġ" included), as vLLM gives them.
        "token_strs": [bundle.tokenizer.id_to_token(i) for i in ids] if token_strs else None,
    }


def _detokenize(bundle: ModelBundle, req: DetokenizeRequest) -> dict[str, Any]:
    vocab = bundle.tokenizer.get_vocab_size(with_added_tokens=True)
    for i, token in enumerate(req.tokens):
        if not 0 <= token < vocab:
            raise InvalidRequest(
                f"'tokens[{i}]' is {token}, outside the model's vocabulary [0, {vocab}).",
                param=f"tokens[{i}]",
                code="invalid_value",
            )
    # Special tokens kept: the text of a rendered chat's ids is the rendered prompt itself.
    return {"prompt": bundle.tokenizer.decode(req.tokens, skip_special_tokens=False)}


@bp.post("/tokenize", ctx_large_body=True)
async def tokenize(request: Request) -> HTTPResponse:
    body = _json_object(request)
    model = _parse(_Fields, {"model": body.get("model")}).model
    bundle = await _bundle(request, model)
    return json(await off_the_loop(request, tokenize_body, bundle, body), dumps=orjson.dumps)


@bp.post("/detokenize", ctx_large_body=True)
async def detokenize(request: Request) -> HTTPResponse:
    req = _parse(DetokenizeRequest, _json_object(request))
    bundle = await _bundle(request, req.model)
    return json(await off_the_loop(request, _detokenize, bundle, req), dumps=orjson.dumps)

"""``POST /tokenize`` and ``POST /detokenize``, in vLLM's field names, for any model this worker
can resolve (chat or embedding). They run on the worker with the model's own tokenizer: no round
trip to the model host, and no admission check (they queue no work there), except for messages
with images to a vision-language model: how many tokens an image becomes is the host's processor's
to say, so the host prepares the prompt (as for a generation, admitted by its queue; the model does
not run) and the answer is the ids the model would read.

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
from sanic_serve.chat.request import ChatCompletionRequest, parse_chat_request
from sanic_serve.chat.route import load_images
from sanic_serve.chat.types import image_urls, refuse_media
from sanic_serve.errors import InvalidRequest
from sanic_serve.generation import read_prompt
from sanic_serve.models import ModelBundle, ModelResolver
from sanic_serve.requests import admit, off_the_loop, parse_json_body

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


def _chat_options(bundle: ModelBundle, body: dict[str, Any]) -> TokenizeChatOptions:
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
    return options


def _chat_request(bundle: ModelBundle, body: dict[str, Any]) -> ChatCompletionRequest:
    """The messages body read as the chat route reads it; images only for a vision model."""
    chat_body = {k: v for k, v in body.items() if k not in _TOKENIZE_ONLY}
    req = parse_chat_request({**chat_body, "model": bundle.id})
    refuse_media(req.messages, bundle.id, takes_images=bundle.kind is ModelKind.VISION)
    return req


async def tokenize_with_images(
    request: Request, bundle: ModelBundle, body: dict[str, Any]
) -> dict[str, Any] | None:
    """A vision model's messages with images: their ids as the model reads them, each image's
    placeholder expanded by the host's processor (the model does not run; the host's queue
    admits the request as it admits a generation). None when the body holds no images."""
    if "messages" not in body or bundle.kind is not ModelKind.VISION:
        return None
    options = _chat_options(bundle, body)
    req = _chat_request(bundle, body)
    if not image_urls(req.messages):
        return None
    if options.add_special_tokens:
        raise InvalidRequest(
            "add_special_tokens is not supported with images: the processor reads the rendered chat as "
            "the model does, without the tokenizer's own special tokens.",
            param="add_special_tokens",
            code="unsupported_parameter",
        )
    await admit(request, bundle.id)
    images = await load_images(request, req)
    prompt = await off_the_loop(request, render_request, bundle, req)
    ids = await read_prompt(request.app.ctx.client, bundle, prompt.ids, images, prompt.text)
    return _tokens(bundle, ids, options.return_token_strs)


def tokenize_body(bundle: ModelBundle, body: dict[str, Any]) -> dict[str, Any]:
    if "messages" in body:
        options = _chat_options(bundle, body)
        req = _chat_request(bundle, body)
        if image_urls(req.messages):  # the route asks the host (tokenize_with_images)
            raise InvalidRequest("Messages with images are counted by the model host.", param="messages")
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
    counted = await tokenize_with_images(request, bundle, body)
    if counted is not None:
        return json(counted, dumps=orjson.dumps)
    return json(await off_the_loop(request, tokenize_body, bundle, body), dumps=orjson.dumps)


@bp.post("/detokenize", ctx_large_body=True)
async def detokenize(request: Request) -> HTTPResponse:
    req = _parse(DetokenizeRequest, _json_object(request))
    bundle = await _bundle(request, req.model)
    return json(await off_the_loop(request, _detokenize, bundle, req), dumps=orjson.dumps)

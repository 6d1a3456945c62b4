"""A validated Messages request (``sanic_serve.messages.request``) as the same request in OpenAI
chat's shape (``ChatCompletionRequest``), which the chat machinery renders, constrains and runs; and
the errors the chat path raises, back in the Messages request's field names.

What maps where: ``system`` -> a system message; a user turn's ``tool_result`` blocks -> ``tool``
messages (ahead of its text, as Anthropic orders them); an assistant's ``tool_use`` blocks ->
``tool_calls``; a final assistant turn -> a prefill the reply continues (``continue_final_message``);
``tool_choice`` ``any`` -> ``required``, ``tool`` -> a named call, ``disable_parallel_tool_use`` ->
``parallel_tool_calls: false``; ``thinking`` -> ``reasoning_effort``. ``thinking`` and
``redacted_thinking`` blocks replayed in the history are accepted and, as chat does with
``reasoning_content``, not rendered again.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from sanic_serve.chat.request import ChatCompletionRequest, parse_chat_request
from sanic_serve.errors import APIError, InvalidRequest
from sanic_serve.messages.request import (
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    TextBlock,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)


def _text(blocks: list[TextBlock] | str) -> str:
    return blocks if isinstance(blocks, str) else "".join(b.text for b in blocks)


def _refuse_media(block: BaseModel, where: str, model: str) -> None:
    if isinstance(block, ImageBlock | DocumentBlock):
        what = "images" if isinstance(block, ImageBlock) else "documents"
        raise InvalidRequest(
            f"{where}: the model `{model}` takes no {what}; content blocks must be text.", param=where
        )


# The image types Anthropic's base64 sources take.
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def image_url(block: ImageBlock, where: str) -> str:
    """An image block's source as chat's ``image_url`` takes it: a data URL for ``base64``, the URL
    for ``url``. Whether the model takes images, and the image itself, are checked by the chat path."""
    source = block.source
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if media_type not in IMAGE_MEDIA_TYPES:
            raise InvalidRequest(
                f"{where}.source.media_type: must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}.",
                param=f"{where}.source.media_type",
            )
        if not isinstance(data, str) or not data:
            raise InvalidRequest(f"{where}.source.data: Field required", param=f"{where}.source.data")
        return f"data:{media_type};base64,{data}"
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"{where}.source.url: Field required", param=f"{where}.source.url")
        return url
    if kind == "file":
        raise InvalidRequest(
            f"{where}.source: file sources need the Files API, which this server has not; send the image "
            "as base64 or by url.",
            param=f"{where}.source",
        )
    raise InvalidRequest(f"{where}.source.type: must be base64 or url.", param=f"{where}.source.type")


def _result_text(block: ToolResultBlock, where: str, model: str) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    for j, part in enumerate(block.content):
        if isinstance(part, ImageBlock):  # chat's tool messages carry text only
            raise InvalidRequest(
                f"{where}.content.{j}: images in tool results are not supported; send them in a user "
                "turn's image block.",
                param=f"{where}.content.{j}",
            )
        _refuse_media(part, f"{where}.content.{j}", model)
    return "".join(p.text for p in block.content if isinstance(p, TextBlock))


def chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation in OpenAI chat's shape; a 400 for what Anthropic would refuse."""
    return conversation(req)[0]


def conversation(req: MessagesRequest) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``chat_messages``, and where each image went: chat's part (``messages[2].content[1]``) ->
    the Messages request's block (``messages.1.content.0``), for the errors the chat path raises."""
    out: list[dict[str, Any]] = []
    image_params: dict[str, str] = {}
    if req.system:
        out.append({"role": "system", "content": _text(req.system)})
    previous_calls: set[str] = set()  # the tool_use ids of the assistant turn just before
    for i, message in enumerate(req.messages):
        content = message.content
        blocks = [TextBlock(type="text", text=content)] if isinstance(content, str) else list(content)
        text = ""
        parts: list[dict[str, Any]] = []  # text and images in order, when the turn has an image
        images: dict[int, str] = {}  # index in parts -> the block's path
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            where = f"messages.{i}.content.{j}"
            if isinstance(block, ImageBlock):
                if message.role != "user":
                    raise InvalidRequest(f"{where}: image blocks belong to user turns.", param=where)
                images[len(parts)] = where
                parts.append({"type": "image_url", "image_url": {"url": image_url(block, where)}})
                continue
            _refuse_media(block, where, req.model)
            if isinstance(block, TextBlock):
                text += block.text
                parts.append({"type": "text", "text": block.text})
            elif isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise InvalidRequest(f"{where}: tool_use blocks belong to assistant turns.", param=where)
                arguments = json.dumps(block.input, ensure_ascii=False)
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": arguments},
                    }
                )
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise InvalidRequest(f"{where}: tool_result blocks belong to user turns.", param=where)
                if block.tool_use_id not in previous_calls:
                    raise InvalidRequest(
                        f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.tool_use_id}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message.",
                        param=where,
                    )
                content = _result_text(block, where, req.model)
                results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        out += results
        if message.role == "assistant":
            out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
        elif images:
            for k, where in images.items():
                image_params[f"messages[{len(out)}].content[{k}]"] = where
            out.append({"role": "user", "content": parts})
        elif text or not results:
            out.append({"role": "user", "content": text})
        previous_calls = {c["id"] for c in calls}
    return out, image_params


def image_param(param: str | None, image_params: dict[str, str]) -> str | None:
    """A chat path's param naming an image part (``messages[2].content[1].image_url``) -> the
    Messages request's block (``messages.1.content.0.source``); other params unchanged."""
    for chat_part, where in image_params.items():
        if param == chat_part:
            return where
        if param is not None and param.startswith(chat_part + "."):
            return f"{where}.source"
    return param


def to_chat(req: MessagesRequest) -> ChatCompletionRequest:
    """The same request as OpenAI chat, for ``sanic_serve.chat.route.prepare``."""
    return to_chat_with_images(req)[0]


def to_chat_with_images(req: MessagesRequest) -> tuple[ChatCompletionRequest, dict[str, str]]:
    """``to_chat``, and where its image parts came from (see ``conversation``)."""
    messages, image_params = conversation(req)
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    for name in ("temperature", "top_p", "top_k"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in req.tools
        ]
        body["tool_choice"] = _chat_tool_choice(req.tool_choice)
        if req.tool_choice is not None and req.tool_choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if req.thinking is not None and req.thinking.type != "disabled":
        body["reasoning_effort"] = "high"
    output_format = req.output_config.format if req.output_config else req.output_format
    if output_format is not None:  # constrained decoding, as chat's response_format
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": output_format.schema_},
        }
    if req.messages[-1].role == "assistant":  # a prefill: the reply continues it
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    try:
        return parse_chat_request(body), image_params
    except InvalidRequest as exc:
        raise anthropic_names(exc, image_params) from exc


# Chat's field names in the 400s the shared code raises -> the Messages request's.
_RENAMES = (
    ("'stop'", "'stop_sequences'"),
    ("response_format", "output_format"),
    ("reasoning_effort", "thinking"),
    ("reasoning control", "thinking control"),
)


def anthropic_names(exc: APIError, image_params: dict[str, str] | None = None) -> APIError:
    """The same error (a 400, or an image's 413), in the Messages API's field names."""
    message = exc.message
    for chat_name, name in _RENAMES:
        message = message.replace(chat_name, name)
    param = image_param(exc.param, image_params or {})
    if param != exc.param and param is not None:  # an image's error: Anthropic names the block first
        message = f"{param}: {message.replace(exc.param or '', param) if exc.param else message}"
    out = APIError(message, param=param, code=exc.code, status=exc.status, headers=exc.headers)
    out.type = exc.type
    return out


def _chat_tool_choice(choice: ToolChoice | None) -> str | dict[str, Any]:
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "any":
        return "required"
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return "none"

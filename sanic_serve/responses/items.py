"""Input items -> the conversation a chat template renders.

Every item type the server emits is accepted back as input, since clients replay their history
verbatim: messages (with or without ``type``; ``input_text``, ``output_text`` replays),
``function_call``, ``function_call_output`` (a string or an array of parts), ``reasoning``,
``mcp_list_tools``, ``mcp_call``, ``mcp_approval_request``, ``mcp_approval_response`` and
``item_reference`` (looked up in the store).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from sanic_serve.errors import InvalidRequest
from sanic_serve.responses.request import ResponsesRequest, namespaced_name
from sanic_serve.responses.store import RUNNING_STATUSES


@dataclass
class PreparedContext:
    """What a response is generated from. ``items``: the whole context, oldest first (the stored
    chain's input and output items, then this request's); ``input_items``: this request's own
    items, each with an ``id``, as the store keeps them; ``instructions``: this request's only."""

    items: list[dict[str, Any]] = field(default_factory=list)
    input_items: list[dict[str, Any]] = field(default_factory=list)
    instructions: str | None = None


MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_MEDIA_PARTS = {"input_file": "files", "input_audio": "audio"}
IMAGE_DETAILS = frozenset({"auto", "low", "high", "original"})
_ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "mcp_list_tools": "mcpl",
    "mcp_call": "mcp",
    "mcp_approval_request": "mcpr",
    "mcp_approval_response": "mcpa",
}
DECLINED_TEXT = "The user declined to run this tool call."


class ItemStore(Protocol):
    """What context building needs of the response store (``ResponseStore``)."""

    def chain(self, response_id: str) -> list[Any] | None: ...

    def item(self, item_id: str) -> dict[str, Any] | None: ...


def new_item_id(kind: str) -> str:
    """A fresh id for an item of type ``kind`` (``msg_...``, ``fc_...``, ``mcp_...``): the one
    helper every item the server makes or receives without an id gets its id from."""
    return f"{_ID_PREFIX.get(kind, 'item')}_{uuid.uuid4().hex}"


def previous_not_found(response_id: str) -> InvalidRequest:
    return InvalidRequest(
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def prepare_context(req: ResponsesRequest, store: ItemStore | None) -> PreparedContext:
    """The stored chain (input and output items of every earlier response; their instructions
    left out), then this request's input items, checked and given ids."""
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        chain = store.chain(req.previous_response_id) if store is not None else None
        if chain is None:
            raise previous_not_found(req.previous_response_id)
        for turn in chain:
            if getattr(turn, "status", "completed") in RUNNING_STATUSES:
                # A background run still going: its output is not there yet, and a chain through it
                # would silently lose it.
                raise InvalidRequest(
                    f"Response '{turn.response_id}' of this chain is still {turn.status}: wait until it "
                    "has finished (poll GET /v1/responses/{id}) or cancel it before continuing from it.",
                    param="previous_response_id",
                )
            history += [*turn.input_items, *turn.output_items]
    inputs = normalize_input(req.input, history, store)
    _check_call_outputs(history + inputs, len(history))
    return PreparedContext(history + inputs, inputs, instructions_text(req.instructions))


def instructions_text(instructions: str | list[dict[str, Any]] | None) -> str | None:
    if instructions is None or isinstance(instructions, str):
        return instructions or None
    items = normalize_input(instructions, [], None, param="instructions")
    for i, item in enumerate(items):
        content = item.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if part.get("type") == "input_image":
                raise InvalidRequest(
                    "instructions take text only; send images in input.",
                    param=f"instructions[{i}].content[{j}]",
                )
    return "\n\n".join(text_of(i.get("content")) for i in items if i["type"] == "message") or None


def normalize_input(
    raw: str | list[dict[str, Any]],
    history: list[dict[str, Any]],
    store: ItemStore | None,
    param: str = "input",
) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [_message({"role": "user", "content": raw}, param)]
    known = {i["id"]: i for i in history if "id" in i}
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest("An input item must be an object.", param=where)
        kind = item.get("type")
        if not isinstance(kind, str | None):
            raise InvalidRequest("type must be a string.", param=f"{where}.type")
        if not isinstance(item.get("id"), str | None):
            raise InvalidRequest("id must be a string.", param=f"{where}.id")
        if kind == "item_reference":
            if not isinstance(item.get("id"), str):
                raise InvalidRequest("An item_reference needs id (a string).", param=f"{where}.id")
            found = known.get(item.get("id", "")) or (store.item(str(item.get("id"))) if store else None)
            if found is None:
                raise InvalidRequest(f"Item with id {item.get('id')!r} not found.", param=f"{where}.id")
            out.append(dict(found))
        elif kind in (None, "message"):
            out.append(_message(item, where))
        elif kind in _ID_PREFIX:
            out.append(_tool_item(item, where))
        else:
            raise InvalidRequest(
                f"Input items of type {kind!r} are not supported here.", param=f"{where}.type"
            )
        known[out[-1]["id"]] = out[-1]
    return out


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise InvalidRequest(f"Unknown message role {role!r}.", param=f"{where}.role")
    content = item.get("content")
    default = "output_text" if role == "assistant" else "input_text"
    parts: list[dict[str, Any]]
    if isinstance(content, str):
        parts = [{"type": default, "text": content}]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise InvalidRequest("A content part must be an object.", param=f"{where}.content[{j}]")
            kind = part.get("type")
            if not isinstance(kind, str):
                raise InvalidRequest("A content part needs a type.", param=f"{where}.content[{j}].type")
            if kind == "input_image":
                parts.append(_image_part(part, role, f"{where}.content[{j}]"))
                continue
            if kind in _MEDIA_PARTS:
                raise InvalidRequest(
                    f"This model takes no {_MEDIA_PARTS[kind]}: content parts must be text.",
                    param=f"{where}.content[{j}]",
                    code="unsupported_content_type",
                )
            if kind == "refusal" and isinstance(part.get("refusal"), str):
                parts.append(dict(part))
                continue
            if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise InvalidRequest("A content part must be text.", param=f"{where}.content[{j}]")
            parts.append(dict(part))
    else:
        raise InvalidRequest(
            "A message needs content: a string or a list of parts.", param=f"{where}.content"
        )
    if not isinstance(item.get("status"), str | None):
        raise InvalidRequest("status must be a string.", param=f"{where}.status")
    for part in parts:
        if part["type"] == "output_text":
            part.setdefault("annotations", [])
    return {
        "type": "message",
        "id": item.get("id") or new_item_id("message"),
        "role": role,
        "content": parts,
        "status": item.get("status") or "completed",
    }


def _image_part(part: dict[str, Any], role: str, where: str) -> dict[str, Any]:
    """An ``input_image`` part, checked for shape only: whether the model takes images, and the image
    itself, are checked when the response runs (``sanic_serve.responses.images``)."""
    if role == "assistant":
        raise InvalidRequest("input_image parts belong to user, system or developer messages.", param=where)
    if part.get("file_id") is not None:
        raise InvalidRequest(
            "file_id is not supported: this server has no Files API. Send image_url, a URL or a data URL "
            "(data:image/png;base64,...).",
            param=f"{where}.file_id",
            code="unsupported_parameter",
        )
    url = part.get("image_url")
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequest(
            "An input_image needs image_url: a URL or a data URL (a string).", param=f"{where}.image_url"
        )
    detail = part.get("detail")
    if detail is not None and detail not in IMAGE_DETAILS:
        raise InvalidRequest(
            f"detail must be one of {', '.join(sorted(IMAGE_DETAILS))}.", param=f"{where}.detail"
        )
    return {"type": "input_image", "image_url": url, "detail": detail or "auto"}


_REQUIRED = {
    "function_call": ("call_id", "name", "arguments"),
    "function_call_output": ("call_id",),
    "mcp_call": ("server_label", "name", "arguments"),
    "mcp_approval_request": ("server_label", "name", "arguments"),
    "mcp_approval_response": ("approval_request_id",),
    "mcp_list_tools": ("server_label",),
}


# Optional fields of each item type and the types they take (None is always allowed). What is
# read later (to_messages, the MCP tools) may then trust them: a wrong type is a 400 naming it.
_OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    "function_call": {"namespace": str, "status": str},
    "function_call_output": {"status": str},
    "reasoning": {"content": list, "summary": list, "encrypted_content": str, "status": str},
    "mcp_list_tools": {"tools": list, "error": (str, dict)},
    "mcp_call": {"output": str, "error": (str, dict), "approval_request_id": str, "status": str},
    "mcp_approval_request": {},
    "mcp_approval_response": {"reason": str},
}
# Lists of objects (item type, field), and the fields each entry must have as strings.
_OBJECT_LISTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("reasoning", "content"): (),
    ("reasoning", "summary"): (),
    ("function_call_output", "output"): (),
    ("mcp_list_tools", "tools"): ("name",),
}
_TYPE_WORDS: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}


def _tool_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item["type"]
    for name in _REQUIRED.get(kind, ()):
        if not isinstance(item.get(name), str):
            raise InvalidRequest(f"A {kind} item needs {name} (a string).", param=f"{where}.{name}")
    for name, types in _OPTIONAL.get(kind, {}).items():
        if item.get(name) is not None and not isinstance(item[name], types):
            shown = " or ".join(_TYPE_WORDS[t] for t in (types if isinstance(types, tuple) else (types,)))
            raise InvalidRequest(f"{name} must be {shown}.", param=f"{where}.{name}")
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str | list):
            raise InvalidRequest("output must be a string or a list of parts.", param=f"{where}.output")
    if kind == "mcp_approval_response" and not isinstance(item.get("approve"), bool):
        raise InvalidRequest("approve must be true or false.", param=f"{where}.approve")
    for (of_kind, name), fields in _OBJECT_LISTS.items():
        if of_kind == kind and isinstance(item.get(name), list):
            _check_objects(item[name], fields, f"{where}.{name}")
    if kind == "mcp_list_tools":
        _check_listed_tools(item.get("tools") or [], f"{where}.tools")
    out = dict(item)
    out["id"] = item.get("id") or new_item_id(kind)
    if kind in ("function_call", "function_call_output"):
        out.setdefault("status", "completed")
    return out


def _check_objects(values: list[Any], fields: tuple[str, ...], where: str) -> None:
    for j, value in enumerate(values):
        if not isinstance(value, dict):
            raise InvalidRequest("Each entry must be an object.", param=f"{where}[{j}]")
        for name in fields:
            if not isinstance(value.get(name), str):
                raise InvalidRequest(f"{name} must be a string.", param=f"{where}[{j}].{name}")


def _check_listed_tools(tools: list[dict[str, Any]], where: str) -> None:
    """A replayed listing's tools are offered to the model again: their schema must be one."""
    for j, tool in enumerate(tools):
        for name, types in (("input_schema", dict), ("annotations", dict), ("description", str)):
            if tool.get(name) is not None and not isinstance(tool[name], types):
                raise InvalidRequest(f"{name} has the wrong type.", param=f"{where}[{j}].{name}")


def _check_call_outputs(items: list[dict[str, Any]], first_input: int) -> None:
    """A function result answers a call of the conversation (as OpenAI checks)."""
    calls = {i["call_id"] for i in items if i.get("type") == "function_call"}
    for n, item in enumerate(items[first_input:]):
        if item.get("type") == "function_call_output" and item["call_id"] not in calls:
            raise InvalidRequest(
                f"No tool call found for function call output with call_id {item['call_id']!r}.",
                param=f"input[{n}].call_id",
            )


def text_of(content: Any) -> str:
    """The text of a message's content or a tool's output: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """The conversation as chat templates take it: assistant text, reasoning and calls of one turn
    in one assistant message, tool results as ``tool`` messages. MCP calls read as the function
    calls they were; listings and approvals are no text for the model, but a declined call is
    shown as a call whose result says so."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}
    declined = {
        i["approval_request_id"]
        for i in items
        if i.get("type") == "mcp_approval_response" and not i["approve"]
    }
    thought = ""
    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            msg: dict[str, Any] = {"role": role, "content": _chat_content(item["content"])}
            if role == "assistant" and thought:
                msg["reasoning_content"], thought = thought, ""
            messages.append(msg)
        elif kind == "reasoning":
            thought += text_of(item.get("content")) or text_of(item.get("summary"))
        elif kind == "function_call":
            name = namespaced_name(item.get("namespace"), item["name"])  # as the model called it
            names[item["call_id"]] = name
            thought = _call(messages, item["call_id"], name, item["arguments"], thought)
        elif kind == "function_call_output":
            result = text_of(item.get("output"))
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": result})
            if item["call_id"] in names:
                messages[-1]["name"] = names[item["call_id"]]
        elif kind == "mcp_call":
            thought = _call(messages, item["id"], item["name"], item["arguments"], thought)
            error = item.get("error")
            result = str(item.get("output") or "") if not error else mcp_error_text(error)
            messages.append(
                {"role": "tool", "tool_call_id": item["id"], "name": item["name"], "content": result or ""}
            )
        elif kind == "mcp_approval_request" and item["id"] in declined:
            thought = _call(messages, item["id"], item["name"], item["arguments"], thought)
            messages.append(
                {"role": "tool", "tool_call_id": item["id"], "name": item["name"], "content": DECLINED_TEXT}
            )
    return messages


def _chat_content(content: Any) -> str | list[dict[str, Any]]:
    """A message's content for the chat template: its text, or, when it holds images, chat's parts
    (``text`` and ``image_url``, in order), the shape the chat path renders for a vision model."""
    if not isinstance(content, list) or not any(
        isinstance(p, dict) and p.get("type") == "input_image" for p in content
    ):
        return text_of(content)
    parts: list[dict[str, Any]] = []
    for p in content:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "input_image":
            parts.append(
                {
                    "type": "image_url",
                    "image_url": {"url": p["image_url"], "detail": p.get("detail") or "auto"},
                }
            )
        elif isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
    return parts


def mcp_error_text(error: Any) -> str:
    """An ``mcp_call``'s error as the model reads it: ``Error: `` and the tool's own text (an
    execution error) or the message (a protocol or HTTP error), not the error object."""
    if isinstance(error, dict):
        content = error.get("content")
        text = text_of(content) if isinstance(content, list) else str(content or error.get("message") or "")
    else:
        text = str(error)
    text = text.strip() or "the tool call failed"
    return text if text.lower().startswith("error") else f"Error: {text}"


def _call(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str, thought: str) -> str:
    """Add a call to the turn's assistant message (a new one unless the last message is it)."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        if thought:
            messages[-1]["reasoning_content"] = thought
            return ""
    return thought

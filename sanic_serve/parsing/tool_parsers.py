"""Tool-call parsing of generated text, streaming and whole.

A parser is fed text deltas and returns the part that is plain content plus every tool call that
completed within them; markup never leaks into content. Parsers are chosen per model from its chat
template (or by name).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from sanic_serve.text import partial_suffix


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class Parsed:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    reasoning: str = ""  # filled in by the reasoning split, ahead of tool parsing


class ToolParser(Protocol):
    def feed(self, text: str) -> Parsed: ...

    def finish(self) -> Parsed: ...


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_from_json(raw: str) -> ToolCall | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return call_from_object(obj) if isinstance(obj, dict) else None


def call_from_object(obj: dict[str, Any]) -> ToolCall | None:
    """A call from ``{"name": ..., "arguments": {...}}`` (``parameters`` for Llama; arguments as
    an object or as its JSON text), or None when that is not what ``obj`` is."""
    if not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


class HermesToolParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen 2/2.5/3)."""

    START = "<tool_call>"
    END = "</tool_call>"

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> Parsed:
        self._buffer += text
        out = Parsed()
        while True:
            if not self._in_call:
                at = self._buffer.find(self.START)
                if at == -1:
                    keep = partial_suffix(self._buffer, [self.START])
                    out.content += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return out
                out.content += self._buffer[:at]
                self._buffer = self._buffer[at + len(self.START) :]
                self._in_call = True
            end = self._buffer.find(self.END)
            if end == -1:
                return out
            raw, self._buffer = self._buffer[:end], self._buffer[end + len(self.END) :]
            self._in_call = False
            call = _call_from_json(raw.strip())
            if call is not None:
                out.calls.append(call)
            else:  # not a call after all: show the model's text as it was
                out.content += self.START + raw + self.END

    def finish(self) -> Parsed:
        out = Parsed()
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            call = _call_from_json(rest.strip())  # a call cut short of its closing tag
            if call is not None:
                out.calls.append(call)
                return out
            rest = self.START + rest
        out.content = rest
        return out


class _JsonAtStartParser:
    """Models whose whole reply is the call when they call: content streams as it comes until the
    reply turns out to start with a call marker, then everything is kept for the end."""

    MARKERS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: str | None = None  # None: undecided; "text"; "call"

    def feed(self, text: str) -> Parsed:
        if self._mode == "text":
            return Parsed(text)
        self._buffer += text
        head = self._buffer.lstrip()
        if self._mode is None:
            if any(head.startswith(m) for m in self.MARKERS):
                self._mode = "call"
            elif not head or any(m.startswith(head) for m in self.MARKERS):
                return Parsed()  # too early to tell
            else:
                self._mode = "text"
                out, self._buffer = self._buffer, ""
                return Parsed(out)
        return Parsed()

    def finish(self) -> Parsed:
        rest, self._buffer = self._buffer, ""
        if self._mode == "call":
            calls = self._calls(rest.strip())
            if calls:
                return Parsed(calls=calls)
        return Parsed(rest)

    def _calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError


class Llama3JsonToolParser(_JsonAtStartParser):
    """Llama 3.x: ``{"name": ..., "parameters": {...}}`` (after ``<|python_tag|>`` when the
    tokenizer keeps it), several separated by ``;``."""

    MARKERS = ("<|python_tag|>", "{")

    def _calls(self, text: str) -> list[ToolCall]:
        text = text.removeprefix("<|python_tag|>").strip()
        calls = [_call_from_json(part.strip()) for part in text.split(";") if part.strip()]
        return [c for c in calls if c is not None] if all(calls) else []


class MistralToolParser(_JsonAtStartParser):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``; the marker is a special
    token that detokenization may already have dropped, leaving the bare JSON list."""

    MARKERS = ("[TOOL_CALLS]", "[{")

    def _calls(self, text: str) -> list[ToolCall]:
        try:
            items = json.loads(text.removeprefix("[TOOL_CALLS]").strip())
        except ValueError:
            return []
        if not isinstance(items, list):
            return []
        calls = [_call_from_json(json.dumps(item)) for item in items]
        return [c for c in calls if c is not None] if calls and all(calls) else []


PARSERS: dict[str, type[HermesToolParser] | type[_JsonAtStartParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}


def detect_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's markup calls for, if any."""
    if not chat_template:
        return None
    if HermesToolParser.START in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None

"""The reply's content blocks, built once as the stream's events; the non-stream message is the
same blocks, so a stream's accumulated message always equals the non-stream one.

A ``text`` block of whitespace alone (the newline a model writes before a call) is never opened:
whitespace is held until real text follows it, and dropped if a call or the end comes first.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sanic_serve.parsing.tool_parsers import Parsed, ToolCall

Event = tuple[str, dict[str, Any]]


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _input(call: ToolCall) -> dict[str, Any]:
    """The call's arguments as the object Anthropic's ``input`` is (the parsers keep JSON objects)."""
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Blocks:
    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self._open: str | None = None  # the type of the last block while it is still open
        self._held = ""  # whitespace not yet known to start a text block

    def feed(self, parsed: Parsed) -> list[Event]:
        events: list[Event] = []
        if parsed.reasoning:
            events += self._append("thinking", parsed.reasoning)
        if parsed.content:
            events += self._append("text", parsed.content)
        for call in parsed.calls:
            events += self._tool_use(call)
        return events

    def close(self) -> list[Event]:
        """The end of the reply: the open block's stop."""
        self._held = ""
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})]

    def _append(self, kind: str, text: str) -> list[Event]:
        field, delta_type = ("text", "text_delta") if kind == "text" else ("thinking", "thinking_delta")
        events: list[Event] = []
        if self._open != kind:
            if kind == "text" and not (self._held + text).strip():
                self._held += text
                return []
            held, self._held = self._held, ""
            events += self.close() if self._open is not None else []
            text = held + text if kind == "text" else text
            block: dict[str, Any] = {"type": "text", "text": ""}
            if kind == "thinking":
                # No signature can be verified here: an empty one, replayed back as any client sends it.
                block = {"type": "thinking", "thinking": "", "signature": ""}
            self.blocks.append(block)
            self._open = kind
            start = {
                "type": "content_block_start",
                "index": len(self.blocks) - 1,
                "content_block": dict(block),
            }
            events.append(("content_block_start", start))
        self.blocks[-1][field] += text
        delta = {"type": delta_type, field: text}
        events.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta},
            )
        )
        return events

    def _tool_use(self, call: ToolCall) -> list[Event]:
        events = self.close()
        self._held = ""
        value = _input(call)
        block = {"type": "tool_use", "id": tool_use_id(), "name": call.name, "input": value}
        self.blocks.append(block)
        index = len(self.blocks) - 1
        delta = {"type": "input_json_delta", "partial_json": json.dumps(value, ensure_ascii=False)}
        return events + [
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}},
            ),
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]


def stop_reason(generation_reason: str | None, stop_sequence: str | None, calls: int) -> str:
    if generation_reason == "length":
        return "max_tokens"
    if stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if calls else "end_turn"

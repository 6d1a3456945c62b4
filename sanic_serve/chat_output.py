"""Assembling one choice's output: text deltas become content and tool calls."""

from __future__ import annotations

from typing import Any

from sanic_serve.tool_parsers import PARSERS, Parsed, ToolCall, ToolParser


class ChoiceAssembler:
    """Feeds generated text through the tool-call parser (when tools were offered) and keeps
    what the final message needs."""

    def __init__(self, parser_name: str | None, parallel_tool_calls: bool = True) -> None:
        self._parser: ToolParser | None = PARSERS[parser_name]() if parser_name else None
        self._parallel = parallel_tool_calls
        self.content = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> Parsed:
        return self._keep(self._parser.feed(text) if self._parser else Parsed(text))

    def finish(self) -> Parsed:
        return self._keep(self._parser.finish() if self._parser else Parsed())

    def _keep(self, parsed: Parsed) -> Parsed:
        if not self._parallel and self.calls:
            parsed.calls = []  # parallel_tool_calls=false: the first call only
        elif not self._parallel:
            parsed.calls = parsed.calls[:1]
        self.content += parsed.content
        self.calls += parsed.calls
        return parsed

    def finish_reason(self, generation_reason: str | None) -> str | None:
        return "tool_calls" if self.calls and generation_reason == "stop" else generation_reason

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": self.content if (self.content or not self.calls) else None,
            "refusal": None,
        }
        if self.calls:
            msg["tool_calls"] = [c.to_dict() for c in self.calls]
        return msg

    def stream_deltas(self, parsed: Parsed) -> list[dict[str, Any]]:
        """OpenAI's streaming shape: content as it comes; each tool call as a first delta with
        its index, id, type, name and empty arguments, then one with the arguments."""
        deltas: list[dict[str, Any]] = []
        if parsed.content:
            deltas.append({"content": parsed.content})
        first_index = len(self.calls) - len(parsed.calls)
        for i, call in enumerate(parsed.calls, start=first_index):
            head = {
                "index": i,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            deltas.append({"tool_calls": [head]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
        return deltas

"""Assembling one choice's output: text deltas become content and tool calls."""

from __future__ import annotations

from typing import Any

from sanic_serve.reasoning import ReasoningParser, Split
from sanic_serve.tool_parsers import PARSERS, Parsed, ToolCall, ToolParser


class ChoiceAssembler:
    """Feeds generated text through the tool-call parser (when tools were offered) and keeps
    what the final message needs."""

    def __init__(
        self,
        parser_name: str | None,
        parallel_tool_calls: bool = True,
        reasoning: ReasoningParser | None = None,
    ) -> None:
        self._parser: ToolParser | None = PARSERS[parser_name]() if parser_name else None
        self._parallel = parallel_tool_calls
        self._reasoning = reasoning
        self.content = ""
        self.reasoning = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> Parsed:
        split = self._reasoning.feed(text) if self._reasoning else Split(content=text)
        return self._keep(self._parser.feed(split.content) if self._parser else Parsed(split.content), split)

    def finish(self) -> Parsed:
        split = self._reasoning.finish() if self._reasoning else Split()
        parsed = self._parser.feed(split.content) if self._parser else Parsed(split.content)
        if self._parser:
            rest = self._parser.finish()
            parsed.content += rest.content
            parsed.calls += rest.calls
        return self._keep(parsed, split)

    def feed_last(self, text: str) -> Parsed:
        """The last delta of the choice, and whatever the parsers still held back."""
        parsed = self.feed(text)
        rest = self.finish()
        parsed.content += rest.content
        parsed.calls += rest.calls
        parsed.reasoning += rest.reasoning
        return parsed

    def _keep(self, parsed: Parsed, split: Split) -> Parsed:
        parsed.reasoning = split.reasoning
        self.reasoning += split.reasoning
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
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.calls:
            msg["tool_calls"] = [c.to_dict() for c in self.calls]
        return msg

    def stream_deltas(self, parsed: Parsed) -> list[dict[str, Any]]:
        """OpenAI's streaming shape: content as it comes; each tool call as a first delta with
        its index, id, type, name and empty arguments, then one with the arguments."""
        deltas: list[dict[str, Any]] = []
        if parsed.reasoning:
            deltas.append({"reasoning_content": parsed.reasoning})
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

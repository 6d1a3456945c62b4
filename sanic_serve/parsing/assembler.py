"""Assembling one choice's output: text deltas become content, reasoning and tool calls."""

from __future__ import annotations

from typing import Any, Protocol

from sanic_serve.models import ModelBundle
from sanic_serve.parsing.reasoning import ReasoningParser, Split, prompt_opens_reasoning
from sanic_serve.parsing.response_template import TemplateParser
from sanic_serve.parsing.tool_parsers import PARSERS, Parsed, ToolCall, ToolParser


class OutputParser(Protocol):
    """Fed text deltas; returns the content, reasoning and completed calls within them."""

    def feed(self, text: str) -> Parsed: ...

    def finish(self) -> Parsed: ...


class MarkupOutput:
    """The reasoning split (``<think>``) first, then a tool-call markup parser on the rest."""

    def __init__(self, tools: ToolParser | None = None, reasoning: ReasoningParser | None = None) -> None:
        self._tools = tools
        self._reasoning = reasoning

    def feed(self, text: str) -> Parsed:
        split = self._reasoning.feed(text) if self._reasoning else Split(content=text)
        return self._parse(split, last=False)

    def finish(self) -> Parsed:
        return self._parse(self._reasoning.finish() if self._reasoning else Split(), last=True)

    def _parse(self, split: Split, last: bool) -> Parsed:
        parsed = self._tools.feed(split.content) if self._tools else Parsed(split.content)
        if last and self._tools:
            rest = self._tools.finish()
            parsed.content += rest.content
            parsed.calls += rest.calls
        parsed.reasoning = split.reasoning
        return parsed


def output_parser(bundle: ModelBundle, prompt_text: str, tools: list[dict[str, Any]] | None) -> OutputParser:
    """How a chat reply of this model is read: by the tokenizer's response template when it
    has one (and no --tool-parser overrides it), else by markers known from its chat template."""
    if bundle.reads_response_template and bundle.response_template is not None:
        return TemplateParser(bundle.response_template, prompt_text, tools)
    markup = PARSERS[bundle.tool_parser]() if tools and bundle.tool_parser in PARSERS else None
    reasoning = ReasoningParser(prompt_opens_reasoning(prompt_text)) if bundle.reasons else None
    return MarkupOutput(markup, reasoning)


class ChoiceAssembler:
    """Feeds generated text through the choice's output parser and keeps what the final message
    needs."""

    def __init__(
        self,
        parser: OutputParser | None = None,
        parallel_tool_calls: bool = True,
        functions_api: bool = False,
        calls_allowed: bool = True,
    ) -> None:
        self._parser: OutputParser = parser or MarkupOutput()
        # tool_choice "none": a call the model wrote anyway is dropped, never shown as content.
        self._calls_allowed = calls_allowed
        # The deprecated functions API: one call, reported as ``function_call``.
        self._functions_api = functions_api
        self._parallel = parallel_tool_calls and not functions_api
        self.content = ""
        self.reasoning = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> Parsed:
        return self._keep(self._parser.feed(text))

    def finish(self) -> Parsed:
        return self._keep(self._parser.finish())

    def feed_last(self, text: str) -> Parsed:
        """The last delta of the choice, and whatever the parsers still held back."""
        parsed = self.feed(text)
        rest = self.finish()
        parsed.content += rest.content
        parsed.calls += rest.calls
        parsed.reasoning += rest.reasoning
        return parsed

    def _keep(self, parsed: Parsed) -> Parsed:
        self.reasoning += parsed.reasoning
        if not self._calls_allowed:
            parsed.calls = []
        elif not self._parallel and self.calls:
            parsed.calls = []  # parallel_tool_calls=false: the first call only
        elif not self._parallel:
            parsed.calls = parsed.calls[:1]
        self.content += parsed.content
        self.calls += parsed.calls
        return parsed

    def finish_reason(self, generation_reason: str | None) -> str | None:
        if not self.calls or generation_reason != "stop":
            return generation_reason
        return "function_call" if self._functions_api else "tool_calls"

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": self.content if (self.content or not self.calls) else None,
            "refusal": None,
        }
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.calls and self._functions_api:
            msg["function_call"] = {"name": self.calls[0].name, "arguments": self.calls[0].arguments}
        elif self.calls:
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
            if self._functions_api:
                deltas.append({"function_call": {"name": call.name, "arguments": ""}})
                deltas.append({"function_call": {"arguments": call.arguments}})
                continue
            head = {
                "index": i,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            deltas.append({"tool_calls": [head]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
        return deltas

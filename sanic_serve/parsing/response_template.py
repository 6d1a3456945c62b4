"""Output parsing driven by the tokenizer's own ``response_template``.

Recent tokenizers ship a declarative description of their replies in ``tokenizer_config.json``
(``response_template``: which markers open and close the reasoning, the tool calls and the
content). transformers' ``ResponseParser`` runs such a template incrementally and is torch-free;
this module turns its region events into the same ``Parsed`` deltas as the markup parsers in
``tool_parsers``, so streaming, ``parallel_tool_calls`` and the final message work alike.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from transformers.utils.chat_parsing import ResponseParser
from transformers.utils.chat_parsing.response_templates import load_response_template

from sanic_serve.parsing.call_grammar import GEMMA_MARKUP, XML_MARKUP
from sanic_serve.parsing.tool_parsers import Parsed, ToolCall, call_from_object

log = logging.getLogger(__name__)

TOOL_CALLS = "tool_calls"
CONTENT = "content"
# Templates on the Hub name the reasoning field one of these (OpenAI-compatible servers report it
# as ``reasoning_content``).
REASONING_FIELDS = frozenset({"reasoning_content", "reasoning", "thinking"})
# What transformers' content parsers and transforms raise on a body they cannot read.
_PARSE_ERRORS = (ValueError, KeyError, TypeError)


# For families whose call format no markup parser reads and whose tokenizers may predate
# ``response_template``: the templates transformers' own server falls back to for them.
_QWEN3_5: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>\s*<function=(?P<name>[^>\n]+)>",
            "close_pattern": r"</function>\s*</tool_call>",
            "repeats": True,
            "content": "xml-inline",
            "content_args": {"tag_pattern": r"<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>"},
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}
_GEMMA4: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": ["<|turn>model\n", "<tool_response|>"],
    "fields": {
        "reasoning_content": {"open": "<|channel>thought\n", "close": "<channel|>", "content": "text"},
        "tool_calls": {
            "open_pattern": r"<\|tool_call>call:(?P<name>\w+)",
            "close": "<tool_call|>",
            "repeats": True,
            "content": "json",
            "content_args": {"unquoted_keys": True, "string_delims": [['<|"|>', '<|"|>']]},
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close": ["<turn|>", "<|tool_response>", "<eos>"], "content": "text"},
    },
}
FALLBACK_TEMPLATES: dict[str, dict[str, Any]] = {
    **dict.fromkeys(("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"), _QWEN3_5),
    **dict.fromkeys(("gemma4", "gemma4_text"), _GEMMA4),
}


def read_response_template(
    tok_config: dict[str, Any], model_id: str, model_type: str | None = None
) -> dict[str, Any] | None:
    """The tokenizer's response template, else the fallback for the model's family, if any. An
    invalid template is logged and ignored (the model still serves, with the markup parsers),
    never a failed load."""
    template = tok_config.get("response_template")
    if template is None:
        return FALLBACK_TEMPLATES.get(model_type or "")
    try:
        load_response_template(template)
    except (ValueError, TypeError) as exc:
        log.warning("model %s: ignoring its invalid response_template: %s", model_id, exc)
        return None
    return template if isinstance(template, dict) else None


def template_call_markup(template: dict[str, Any]) -> str | None:
    """The call markup (see sanic_serve.parsing.call_grammar) the template's tool calls are written in,
    if it is a known one: what ``tool_choice`` ``required``/named constrains generation to."""
    field = template.get("fields", {}).get(TOOL_CALLS)
    if not isinstance(field, dict):
        return None
    opener = str(field.get("open", field.get("open_pattern", "")))
    if field.get("content") == "xml-inline" and "<function=" in opener:
        return XML_MARKUP
    if field.get("content") == "json" and "tool_call>call:" in opener:
        return GEMMA_MARKUP
    if field.get("content", "text") != "json":
        return None
    if "<tool_call>" in opener:
        return "hermes"
    if "TOOL_CALLS" in opener:
        return "mistral"
    if "python_tag" in opener:
        return "llama3_json"
    return None


def _as_served(template: dict[str, Any], with_calls: bool) -> dict[str, Any]:
    """The template as this server runs it. JSON bodies that do not parse come back as their text
    instead of raising (a malformed call is then shown as content, and nothing before it in the
    same delta is lost). With no tools offered a reply has no calls (as with OpenAI): the call
    field goes, and call markup stays content."""
    fields: dict[str, Any] = {}
    for name, field in template["fields"].items():
        if name == TOOL_CALLS and not with_calls:
            continue
        if isinstance(field, dict) and field.get("content") == "json":
            field = {**field, "content_args": {**field.get("content_args", {}), "allow_non_json": True}}
        fields[name] = field
    return {**template, "fields": fields or template["fields"]}


class TemplateParser:
    """Parses one reply with a response template: content, reasoning and tool calls at once."""

    def __init__(
        self, template: dict[str, Any], prompt_text: str, tools: list[dict[str, Any]] | None
    ) -> None:
        self._spec = load_response_template(_as_served(template, with_calls=bool(tools)))
        self._tools: list[Any] | None = list(tools) if tools else None
        # The prompt is the prefix: a template that opens ``<think>`` in the generation prompt
        # leaves the parser inside the reasoning region, as the model is.
        self._parser = ResponseParser(self._spec, prefix=prompt_text, tools=self._tools)
        self._call_body = ""  # raw text of the call region being read
        self._started: set[str] = set()  # fields whose leading whitespace is behind us

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        saved = self._snapshot()
        try:
            self._apply(self._parser.feed(text), out)
        except _PARSE_ERRORS:
            # A region the template could not parse (say, a malformed call in python syntax).
            # The parser raised, so this delta's events are gone: go back to before it and feed
            # it again a character at a time, to lose nothing ahead of the bad region.
            self._parser = saved
            for char in text:
                self._feed_char(char, out)
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        saved = self._snapshot()
        try:
            self._apply(self._parser.finalize()[1], out)
        except _PARSE_ERRORS:  # the region the reply ended in did not parse: show it as text
            self._parser = saved
            self._show_call_text(out)
            out.content += self._unconsumed()
        return out

    def _feed_char(self, char: str, out: Parsed) -> None:
        try:
            self._apply(self._parser.feed(char), out)
        except _PARSE_ERRORS as exc:
            log.debug("response_template could not parse a region: %s", exc)
            rest = self._unconsumed()
            self._show_call_text(out)
            # The bad region is behind us: a fresh parser goes on from the text after it.
            self._parser = ResponseParser(self._spec, prefix="", tools=self._tools)
            if rest:
                self._apply(self._parser.feed(rest), out)

    def _snapshot(self) -> ResponseParser:
        # About 15 us a delta; the compiled template is shared, not copied.
        return copy.deepcopy(self._parser, {id(self._spec): self._spec})

    def _unconsumed(self) -> str:
        """Text the parser holds but has not consumed (a marker it is still deciding on, or what
        followed a region that failed to close). transformers exposes no accessor for it; should
        these attributes go, at most that marker's few characters are lost."""
        buffer = getattr(self._parser, "_buffer", "")
        position = getattr(self._parser, "_pos", len(buffer))
        return buffer[position:] if isinstance(buffer, str) and isinstance(position, int) else ""

    def _apply(self, events: list[dict[str, Any]], out: Parsed) -> None:
        for ev in events:
            name = ev.get("field")
            if ev["type"] == "region_open" and name == TOOL_CALLS:
                self._call_body = ""
            elif ev["type"] == "region_chunk":
                if name == TOOL_CALLS:
                    self._call_body += ev["text"]
                elif name == CONTENT and not ev["dirty"]:
                    out.content += self._lstrip_once(CONTENT, ev["text"])
                elif name in REASONING_FIELDS and not ev["dirty"]:
                    out.reasoning += self._lstrip_once("reasoning", ev["text"])
            elif ev["type"] == "region_close" and name == TOOL_CALLS:
                calls = _calls(ev["value"])
                if calls:
                    out.calls += calls
                    self._call_body = ""
                else:
                    self._show_call_text(out)

    def _show_call_text(self, out: Parsed) -> None:
        """Not a call after all: the model's text is shown as content, as it was."""
        out.content += self._call_body
        self._call_body = ""
        self._started.add(CONTENT)

    def _lstrip_once(self, field: str, text: str) -> str:
        """Whitespace between regions (after ``</think>``, before the answer) is layout, not
        text: a field's value starts at its first visible character, as the template's own
        (stripping) ``text`` parser gives it."""
        if field in self._started:
            return text
        text = text.lstrip()
        if text:
            self._started.add(field)
        return text


def _calls(value: Any) -> list[ToolCall]:
    """Tool calls from a closed region's value: one call or a list of them, each either OpenAI's
    ``{"type": "function", "function": {...}}`` or the bare ``{"name", "arguments"}``."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        fn = item.get("function", item) if isinstance(item, dict) else None
        call = call_from_object(fn) if isinstance(fn, dict) else None
        if call is None:
            return []
        calls.append(call)
    return calls

"""Output parsing driven by the tokenizer's own ``response_template``.

Recent tokenizers ship a declarative description of their replies in ``tokenizer_config.json``
(``response_template``: which markers open and close the reasoning, the tool calls and the
content). transformers' ``ResponseParser`` runs such a template incrementally and is torch-free;
this module turns its region events into the same ``Parsed`` deltas as the markup parsers in
``tool_parsers``, so streaming, ``parallel_tool_calls`` and the final message work alike.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.utils.chat_parsing import ResponseParser
from transformers.utils.chat_parsing.response_templates import load_response_template

from sanic_serve.tool_parsers import Parsed, ToolCall, call_from_object

log = logging.getLogger(__name__)

TOOL_CALLS = "tool_calls"
CONTENT = "content"
# Templates on the Hub name the reasoning field one of these (OpenAI-compatible servers report it
# as ``reasoning_content``).
REASONING_FIELDS = frozenset({"reasoning_content", "reasoning", "thinking"})


def read_response_template(tok_config: dict[str, Any], model_id: str) -> dict[str, Any] | None:
    """The tokenizer's response template, if it has a valid one. An invalid template is logged
    and ignored (the model still serves, with the markup parsers), never a failed load."""
    template = tok_config.get("response_template")
    if template is None:
        return None
    try:
        load_response_template(template)
    except (ValueError, TypeError) as exc:
        log.warning("model %s: ignoring its invalid response_template: %s", model_id, exc)
        return None
    return template if isinstance(template, dict) else None


def template_call_markup(template: dict[str, Any]) -> str | None:
    """The markup parser whose syntax the template's tool calls use, if they are JSON in a known
    markup: what ``tool_choice`` ``required``/named constrains generation to."""
    field = template.get("fields", {}).get(TOOL_CALLS)
    if not isinstance(field, dict) or field.get("content", "text") != "json":
        return None
    opener = str(field.get("open", field.get("open_pattern", "")))
    if "<tool_call>" in opener:
        return "hermes"
    if "TOOL_CALLS" in opener:
        return "mistral"
    if "python_tag" in opener:
        return "llama3_json"
    return None


def _without_tool_calls(template: dict[str, Any]) -> dict[str, Any]:
    """With no tools offered a reply has no calls (as with OpenAI): call markup stays content."""
    fields = {name: f for name, f in template["fields"].items() if name != TOOL_CALLS}
    return {**template, "fields": fields} if fields else template


class TemplateParser:
    """Parses one reply with a response template: content, reasoning and tool calls at once."""

    def __init__(
        self, template: dict[str, Any], prompt_text: str, tools: list[dict[str, Any]] | None
    ) -> None:
        self._spec = load_response_template(template if tools else _without_tool_calls(template))
        self._tools: list[Any] | None = list(tools) if tools else None
        # The prompt is the prefix: a template that opens ``<think>`` in the generation prompt
        # leaves the parser inside the reasoning region, as the model is.
        self._parser = ResponseParser(self._spec, prefix=prompt_text, tools=self._tools)
        self._call_body = ""  # raw text of the call region being read
        self._started: set[str] = set()  # fields whose leading whitespace is behind us

    def feed(self, text: str) -> Parsed:
        return self._run(lambda: self._parser.feed(text))

    def finish(self) -> Parsed:
        return self._run(lambda: self._parser.finalize()[1])

    def _run(self, step: Any) -> Parsed:
        out = Parsed()
        try:
            events = step()
        except (ValueError, KeyError, TypeError) as exc:
            # A region the template could not parse (a malformed call): its text is shown as
            # content, and parsing goes on after it with a fresh parser.
            log.debug("response_template could not parse a region: %s", exc)
            rest, body = self._unconsumed()
            self._call_body = body or self._call_body
            self._show_call_text(out)
            self._parser = ResponseParser(self._spec, prefix="", tools=self._tools)
            more = self._parser.feed(rest) if rest else []
            self._apply(more, out)
            return out
        self._apply(events, out)
        return out

    def _unconsumed(self) -> tuple[str, str]:
        """What the failed parser had not consumed yet, and the body of the region it failed to
        close. transformers exposes no accessor for them; should these attributes go, only the
        rest of that one delta is lost, nothing else."""
        buffer = getattr(self._parser, "_buffer", "")
        position = getattr(self._parser, "_pos", len(buffer))
        body = getattr(self._parser, "_body", "")
        rest = buffer[position:] if isinstance(buffer, str) and isinstance(position, int) else ""
        return rest, body if isinstance(body, str) else ""

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

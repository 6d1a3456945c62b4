"""``tool_choice: "none"`` (and ``function_call: "none"``): as with OpenAI, the model sees the
tools but does not call them.

The tools are rendered into the prompt as usual, and the token that opens a call in the model's
markup is banned from decoding (a logit of -inf: it can never be sampled, greedy or not), with the
markup's other marker tokens (its closing tag), so no stray marker reaches the text either. Where a
call has no single opening token to ban (Llama 3's calls may start as bare JSON, or a tokenizer
splits the marker), the tools are not rendered, so nothing invites a call. Either way the reply is
still read with the tools' parser, and anything that parses as a call is dropped rather than shown
as content: call markup never reaches ``content``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sanic_serve.models import ModelBundle
from sanic_serve.parsing.call_grammar import GEMMA_MARKUP, XML_MARKUP

# By call markup (see sanic_serve.parsing.call_grammar): the marker that opens a call, then the others.
_CALL_MARKERS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    XML_MARKUP: ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    GEMMA_MARKUP: ("<|tool_call>", "<tool_call|>"),
}


@dataclass(frozen=True)
class ToolUse:
    rendered: list[dict[str, Any]] | None  # tools for the chat template
    parsed: list[dict[str, Any]] | None  # tools the reply is read with
    banned_tokens: tuple[int, ...] = ()  # call markup, never to be sampled
    calls_allowed: bool = True


def call_marker_tokens(bundle: ModelBundle) -> tuple[int, ...]:
    """The ids of this model's call-markup tokens, opener first; empty unless the opener is one
    token (only then can a ban stop every call)."""
    markers = _CALL_MARKERS.get(bundle.call_markup or "", ())
    ids = [bundle.tokenizer.token_to_id(m) for m in markers]
    if not ids or ids[0] is None:
        return ()
    return tuple(i for i in ids if i is not None)


def tool_use(bundle: ModelBundle, tools: list[dict[str, Any]] | None, choice_none: bool) -> ToolUse:
    if not tools or not choice_none:
        return ToolUse(tools, tools)
    banned = call_marker_tokens(bundle)
    return ToolUse(tools if banned else None, tools, banned, calls_allowed=False)

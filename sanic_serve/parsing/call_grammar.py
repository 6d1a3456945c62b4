"""Grammars that force a tool call: how ``tool_choice`` ``required`` and a named function are
enforced. Under such a grammar (llguidance, applied per request in the host's batch) the model can
only answer with one call, in its own markup, of the named function or of any offered tool, with
arguments valid for that function's schema.

``token_id(text)`` gives the id of a markup string that the tokenizer keeps as one added token: the
grammar must name such a token by id, since the decoder sees it as a token, not as its text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

TokenId = Callable[[str], int | None]

# JSON in one layout, as ``json.dumps`` writes it and chat templates render calls (``tojson``):
# no whitespace but the single space after ``,`` and ``:``. With free whitespace between tokens a
# weak or unlucky model can spend its whole budget on blanks and never close the object.
JSON_SEPARATORS = (", ", ": ")
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark ``%json`` rule for ``schema`` in that layout (``x-guidance`` holds llguidance's
    options; the layout replaces any the schema brought along)."""
    return f"%json {json.dumps({**schema, 'x-guidance': _JSON_LAYOUT})}"


# Besides the JSON markups of the markup parsers ("hermes", "llama3_json", "mistral"):
XML_MARKUP = "qwen3_xml"  # <function=NAME><parameter=KEY>VALUE</parameter></function>
GEMMA_MARKUP = "gemma4"  # <|tool_call>call:NAME{key:<|"|>text<|"|>,n:1}<tool_call|>


def forced_call_grammar(
    markup: str, tools: list[dict[str, Any]], name: str | None, token_id: TokenId | None = None
) -> str:
    import llguidance

    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]

    def lit(text: str) -> str:
        tid = token_id(text) if token_id is not None else None
        return f"<[{tid}]>" if tid is not None else json.dumps(text)

    if markup == XML_MARKUP:
        lark = _xml_call(functions, lit)
    elif markup == GEMMA_MARKUP:
        lark = _gemma_call(functions, lit)
    else:
        lark = _json_call(markup, functions, lit)
    return str(llguidance.grammar_from("lark", lark))


def _json_call(markup: str, functions: list[dict[str, Any]], lit: Callable[[str], str]) -> str:
    """One ``{"name": ..., "arguments": {...}}`` object in the markup around it."""
    args_key = "parameters" if markup == "llama3_json" else "arguments"
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, args_key: f.get("parameters") or {"type": "object"}},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    call = json_rule(variants[0] if len(variants) == 1 else {"anyOf": variants})
    start = {
        "hermes": f'start: {lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}',
        "llama3_json": "start: call",
        "mistral": 'start: "[" call "]"',
    }[markup]
    return f"{start}\ncall: {call}\n"


def _one_of(start: str, functions: list[dict[str, Any]]) -> list[str]:
    """The grammar's start (one call between its markers) and its choice of function: rule
    ``f<i>`` is the call of ``functions[i]``."""
    return [f"start: {start}", "call: " + " | ".join(f"f{i}" for i in range(len(functions)))]


def _arguments(fn: dict[str, Any]) -> tuple[set[str], list[tuple[str, dict[str, Any]]]]:
    """A function's required argument names and all its arguments' schemas, in schema order."""
    schema = fn.get("parameters") or {}
    return set(schema.get("required", [])), list((schema.get("properties") or {}).items())


def _xml_call(functions: list[dict[str, Any]], lit: Callable[[str], str]) -> str:
    """Qwen 3.5 / Qwen3-Coder's call: one ``<parameter=KEY>`` block per argument, in schema order
    (optional ones may be left out), each value raw text for a string, JSON otherwise."""
    rules = _one_of(f'{lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}', functions)
    for i, fn in enumerate(functions):
        required, properties = _arguments(fn)
        params = []
        for j, (key, sub) in enumerate(properties):
            rule = f"f{i}p{j}"
            rules.append(
                f'{rule}: {json.dumps(f"<parameter={key}>")} "\\n" {_xml_value(sub)} "\\n</parameter>\\n"'
            )
            params.append(rule if key in required else f"{rule}?")
        head = json.dumps(f"<function={fn['name']}>")
        rules.append(f'f{i}: {head} "\\n" {" ".join(params)} "</function>"')
    return "\n".join(rules) + "\n"


def _xml_value(schema: dict[str, Any]) -> str:
    """A string argument is written raw (the reader types values by the schema); anything else is
    JSON, constrained by its schema."""
    text = _raw_string(schema)
    return text if text is not None else json_rule(schema)


def _raw_string(schema: dict[str, Any]) -> str | None:
    """The grammar of a string argument's text, unquoted, held to the schema's ``enum``,
    ``const``, ``pattern`` and lengths; None for an argument that is not a string."""
    options = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if options is not None and all(isinstance(o, str) for o in options):
        return "(" + " | ".join(json.dumps(o) for o in options) + ")"
    if schema.get("type") != "string":
        return None
    if "pattern" in schema:  # a full match is also a match anywhere, as JSON Schema asks
        pattern = schema["pattern"].removeprefix("^").removesuffix("$")
        return "/" + pattern.replace("/", "\\/") + "/"
    low, high = max(int(schema.get("minLength", 1)), 1), schema.get("maxLength")
    if high is not None and int(high) < 1:
        return '""'
    # One line with no markup in it, starting with a visible character (readers strip the
    # whitespace around a value): what they take back as exactly this text.
    more = f"{low - 1},{'' if high is None else int(high) - 1}"
    return f"/[^<\\s][^<\\n]{{{more}}}/"


def _gemma_call(functions: list[dict[str, Any]], lit: Callable[[str], str]) -> str:
    """Gemma 4's call: ``call:NAME{...}`` with bare keys, strings between ``<|"|>`` markers and
    other values as JSON; required arguments first, then any of the optional ones, in order."""
    quote = lit('<|"|>')
    rules = _one_of(f"{lit('<|tool_call>')} call {lit('<tool_call|>')}", functions)
    for i, fn in enumerate(functions):
        required, properties = _arguments(fn)
        needed: list[str] = []
        optional: list[str] = []
        for j, (key, sub) in enumerate(properties):
            rules.append(f"f{i}p{j}: {json.dumps(key + ':')} {_gemma_value(sub, quote)}")
            (needed if key in required else optional).append(f"f{i}p{j}")
        if needed:
            body = ' "," '.join(needed) + "".join(f' ("," {p})?' for p in optional)
        else:  # any subset of the optional ones: alternatives by the first one present
            firsts = [p + "".join(f' ("," {q})?' for q in optional[k + 1 :]) for k, p in enumerate(optional)]
            body = f"({' | '.join(firsts)})?" if firsts else ""
        rules.append(f'f{i}: {json.dumps("call:" + fn["name"] + "{")} {body} "}}"')
    return "\n".join(rules) + "\n"


def _gemma_value(schema: dict[str, Any], quote: str) -> str:
    text = _raw_string(schema)
    return f"{quote} {text} {quote}" if text is not None else json_rule(schema)

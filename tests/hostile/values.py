"""Hostile values: generic ones derived from a field's spec, and hand-made ones for the fields whose
structure matters (messages, tools, prompts, ...).

Values that JSON cannot carry from a Python object (``NaN``, invalid UTF-8, duplicate keys) are
written as ``Raw`` bytes and spliced into the body by ``encode``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.hostile.spec_fields import FieldSpec

HUGE_STRING_CHARS = 256 * 1024


@dataclass(frozen=True)
class Raw:
    """JSON text put into the body as is."""

    text: bytes


def encode(obj: Any) -> bytes:
    """``json.dumps`` that splices ``Raw`` values in verbatim."""
    raws: list[bytes] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    out = json.dumps(swap(obj), allow_nan=False).encode()
    for i, text in enumerate(raws):
        out = out.replace(f'"@@RAW{i}@@"'.encode(), text)
    return out


def deep(levels: int, leaf: Any = 1) -> Raw:
    """``levels`` nested objects around ``leaf`` (within orjson's 1024 limit when < 1000), as
    text: Python's own recursion would give out first."""
    return Raw(b'{"a": ' * levels + json.dumps(leaf).encode() + b"}" * levels)


def deep_schema(levels: int) -> Raw:
    """An object schema whose one property is an object schema, ``levels`` deep."""
    return Raw(b'{"type": "object", "properties": {"a": ' * levels + b'{"type": "object"}' + b"}}" * levels)


WRONG_TYPE_SAMPLES: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "integer": 7,
    "number": 0.5,
    "string": "hostile",
    "array": [1, "two", None],
    "object": {"hostile": {"nested": [1]}},
}

NUMBERS: list[tuple[str, Any]] = [
    ("minus-one", -1),
    ("zero", 0),
    ("neg-zero", -0.0),
    ("2^31", 2**31),
    ("2^53+1", 2**53 + 1),
    ("2^63", 2**63),
    ("2^64", 2**64),
    ("-2^63-1", -(2**63) - 1),
    ("1e30-int", 10**30),
    ("1e308", 1e308),
    ("-1e308", -1e308),
    ("denormal", 5e-324),
    ("NaN", Raw(b"NaN")),
    ("Infinity", Raw(b"Infinity")),
    ("-Infinity", Raw(b"-Infinity")),
    ("overflow-1e999", Raw(b"1e999")),
    ("str-NaN", "NaN"),
    ("str-number", "1"),
    ("str-inf", "-inf"),
]

STRINGS: list[tuple[str, Any]] = [
    ("empty", ""),
    ("space", " "),
    ("nul", "\x00"),
    ("lone-surrogate", "\ud800"),
    ("reversed-surrogates", "\udfff\ud800"),
    ("invalid-utf8", Raw(b'"\xff\xfe\xc3\x28"')),
    ("overlong-utf8", Raw(b'"\xc0\xaf"')),
    ("huge", "A" * HUGE_STRING_CHARS),
    ("combining", "e" + "\u0301" * 5000),
    ("rtl-emoji", "\u202e\U0001f600\u200d\U0001f4a9\ufeff"),
    ("newlines", "\n" * 10000),
    ("not-in-enum", "hostile-enum-value"),
]

ARRAYS: list[tuple[str, Any]] = [
    ("empty", []),
    ("nulls", [None]),
    ("nested", [[[[]]]]),
    ("long", ["x"] * 1000),
]

OBJECTS: list[tuple[str, Any]] = [
    ("empty", {}),
    ("empty-key", {"": None}),
    ("long-key", {"k" * 4096: 1}),
    ("many-keys", {f"k{i}": i for i in range(5000)}),
    ("deep-500", deep(500)),
    ("deep-1000", deep(1000)),
]


def generic_values(spec: FieldSpec, valid: Any) -> list[tuple[str, Any]]:
    """Mutations of one field derived from its spec: wrong types, edge numbers, hostile strings,
    wrapped and nested shapes."""
    out: list[tuple[str, Any]] = []
    for json_type, sample in WRONG_TYPE_SAMPLES.items():
        if not spec.allows(json_type):
            out.append((f"type-{json_type}", sample))
    if spec.numeric:
        for bound, delta in ((spec.minimum, -1), (spec.maximum, 1)):
            if bound is not None:
                value = bound + delta
                if float(value).is_integer():
                    value = int(bound) + delta  # the spec writes int64 bounds as floats
                out.append(("below-min" if delta < 0 else "above-max", value))
        if "integer" in spec.types and "number" not in spec.types:
            out.append(("fraction", 1.5))
        out += [(f"num-{label}", v) for label, v in NUMBERS]
    if spec.allows("string") or spec.enum:
        out += [(f"str-{label}", v) for label, v in STRINGS]
        if spec.max_length is not None:
            out.append(("str-over-max-length", "x" * (spec.max_length + 1)))
    if spec.allows("array"):
        out += [(f"arr-{label}", v) for label, v in ARRAYS]
        if spec.max_items is not None:
            out.append(("arr-over-max-items", ["x"] * (spec.max_items + 1)))
    if spec.allows("object"):
        out += [(f"obj-{label}", v) for label, v in OBJECTS]
    out += [("wrapped-in-list", [valid]), ("wrapped-in-object", {"value": valid})]
    return out


_USER = {"role": "user", "content": "Hello!"}
_CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
_ADD: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def _msg(**kw: Any) -> list[Any]:
    return [{**_USER, **kw}]


MESSAGES: list[tuple[str, Any]] = [
    ("role-unknown", _msg(role="wizard")),
    ("role-empty", _msg(role="")),
    ("role-upper", _msg(role="USER")),
    ("role-null", _msg(role=None)),
    ("role-int", _msg(role=5)),
    ("role-missing", [{"content": "Hello!"}]),
    ("content-missing", [{"role": "user"}]),
    ("content-int", _msg(content=5)),
    ("content-object", _msg(content={"text": "hi"})),
    ("content-parts-empty", _msg(content=[])),
    ("content-part-no-type", _msg(content=[{"text": "hi"}])),
    ("content-part-no-text", _msg(content=[{"type": "text"}])),
    ("content-part-text-int", _msg(content=[{"type": "text", "text": 5}])),
    ("content-part-unknown", _msg(content=[{"type": "hologram", "hologram": {}}])),
    (
        "content-part-image",
        _msg(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
    ),
    (
        "content-part-audio",
        _msg(content=[{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]),
    ),
    ("content-part-file", _msg(content=[{"type": "file", "file": {"file_id": "f"}}])),
    ("content-parts-nested", _msg(content=[[{"type": "text", "text": "hi"}]])),
    ("content-huge-parts", _msg(content=[{"type": "text", "text": "a"}] * 5000)),
    ("name-int", _msg(name=5)),
    ("name-huge", _msg(name="n" * 100000)),
    ("extra-keys", _msg(weight=1, audio={"id": "x"})),
    ("message-string", ["Hello!"]),
    ("message-list", [["user", "Hello!"]]),
    ("message-null", [None]),
    ("tool-no-call-id", [_USER, {"role": "tool", "content": "3"}]),
    ("tool-call-id-int", [_USER, {"role": "tool", "content": "3", "tool_call_id": 5}]),
    ("function-no-name", [_USER, {"role": "function", "content": "3"}]),
    ("assistant-calls-string", [_USER, {"role": "assistant", "tool_calls": "x"}]),
    ("assistant-calls-int", [_USER, {"role": "assistant", "tool_calls": [5]}]),
    ("assistant-call-fn-int", [_USER, {"role": "assistant", "tool_calls": [{"function": 5}]}]),
    ("assistant-call-name-int", [_USER, {"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}]),
    (
        "assistant-call-bad-args",
        [
            _USER,
            {
                "role": "assistant",
                "tool_calls": [{**_CALL, "function": {"name": "add", "arguments": "{not json"}}],
            },
        ],
    ),
    (
        "assistant-call-args-object",
        [
            _USER,
            {
                "role": "assistant",
                "tool_calls": [{**_CALL, "function": {"name": "add", "arguments": {"a": 1}}}],
            },
        ],
    ),
    ("assistant-call-empty", [_USER, {"role": "assistant", "tool_calls": [{}]}]),
    ("assistant-function-call-bad", [_USER, {"role": "assistant", "function_call": {"name": 5}}]),
    ("assistant-refusal", [_USER, {"role": "assistant", "content": None, "refusal": "no"}, _USER]),
    ("assistant-only", [{"role": "assistant", "content": ""}]),
    ("system-only-empty", [{"role": "system", "content": ""}]),
    ("many-messages", [_USER] * 3000),
    ("deep-content", _msg(content=[{"type": "text", "text": "hi", "extra": deep(400)}])),
]

TOOLS: list[tuple[str, Any]] = [
    ("no-function", [{"type": "function"}]),
    ("type-custom", [{"type": "custom", "custom": {"name": "c"}}]),
    ("type-unknown", [{"type": "hologram", "function": _ADD["function"]}]),
    ("name-empty", [{"type": "function", "function": {"name": ""}}]),
    ("name-bad-chars", [{"type": "function", "function": {"name": "a b/c"}}]),
    ("name-65", [{"type": "function", "function": {"name": "n" * 65}}]),
    ("params-int", [{"type": "function", "function": {"name": "f", "parameters": 5}}]),
    (
        "params-props-int",
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}],
    ),
    ("params-deep", [{"type": "function", "function": {"name": "f", "parameters": deep_schema(490)}}]),
    (
        "params-bad-ref",
        [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}],
    ),
    ("duplicate-names", [_ADD, _ADD]),
    ("many", [{"type": "function", "function": {"name": f"f{i}"}} for i in range(300)]),
    ("strict-string", [{"type": "function", "function": {**_ADD["function"], "strict": "yes"}}]),
]

TOOL_CHOICES: list[tuple[str, Any]] = [
    ("unknown-string", "any"),
    ("named-no-function", {"type": "function"}),
    ("named-missing", {"type": "function", "function": {"name": "missing"}}),
    ("named-name-int", {"type": "function", "function": {"name": 5}}),
    ("allowed-tools", {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}),
    ("custom", {"type": "custom", "custom": {"name": "c"}}),
    ("required-no-tools", "required"),
]


def _rf(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}


RESPONSE_FORMATS: list[tuple[str, Any]] = [
    ("type-unknown", {"type": "grammar", "grammar": "x"}),
    ("schema-missing", {"type": "json_schema"}),
    ("schema-int", _rf(5)),
    ("schema-bad-ref", _rf({"$ref": "#/nowhere"})),
    ("schema-bad-pattern", _rf({"type": "string", "pattern": "("})),
    ("schema-unsatisfiable", _rf({"type": "integer", "minimum": 5, "maximum": 1})),
    ("schema-empty-enum", _rf({"enum": []})),
    ("schema-unknown-type", _rf({"type": "hologram"})),
    ("schema-deep", _rf(deep_schema(490))),
    ("schema-name-int", {"type": "json_schema", "json_schema": {"name": 5, "schema": {}}}),
    ("text-with-schema", {"type": "text", "json_schema": 5}),
]

STOPS: list[tuple[str, Any]] = [
    ("empty-in-list", [""]),
    ("null-in-list", [None]),
    ("five", ["a", "b", "c", "d", "e"]),
    ("huge", ["s" * HUGE_STRING_CHARS]),
    ("nul", ["\x00"]),
]

LOGIT_BIASES: list[tuple[str, Any]] = [
    ("key-word", {"x": 1}),
    ("key-negative", {"-1": 1}),
    ("key-double-minus", {"--1": 1}),
    ("key-superscript", {"\u00b2": 1}),
    ("key-huge", {"9" * 30: 1}),
    ("key-outside-vocab", {"1000000": 1}),
    ("value-string", {"1": "x"}),
    ("value-big", {"1": 1000}),
    ("value-nan", {"1": Raw(b"NaN")}),
    ("many", {str(i): 1 for i in range(20000)}),
]

STREAM_OPTIONS: list[tuple[str, Any]] = [
    ("include-usage-string", {"include_usage": "yes"}),
    ("include-usage-null", {"include_usage": None}),
    ("unknown-key", {"continuous_usage_stats": True}),
]

PROMPTS: list[tuple[str, Any]] = [
    ("empty-string", ""),
    ("empty-in-list", ["a", ""]),
    ("empty-token-list", [[]]),
    ("mixed-list", [1, "a"]),
    ("mixed-nested", [[1], ["a"]]),
    ("token-negative", [-1]),
    ("token-2^63", [2**63]),
    ("token-outside-vocab", [10**6]),
    ("token-float", [1.5]),
    ("token-bool", [True]),
    ("tokens-100k", [1] * 100000),
    ("nested-3", [[[1]]]),
    ("many-prompts", ["a"] * 300),
]

TEMPLATE_KWARGS: list[tuple[str, Any]] = [
    ("reserved-messages", {"messages": []}),
    ("reserved-tools", {"tools": 5}),
    ("shadow-raise", {"raise_exception": 5}),
    ("shadow-bos", {"bos_token": {"x": 1}}),
    ("deep", deep(300)),
]

GENERATION_CONFIGS: list[tuple[str, Any]] = [
    ("json-garbage", "{not json"),
    ("json-array", "[1, 2]"),
    ("huge-max-new-tokens", {"max_new_tokens": 10**9}),
    ("negative-temperature", {"temperature": -1}),
    ("beams", {"num_beams": 4}),
    ("dunder", {"__class__": 1}),
    ("do-sample-string", {"do_sample": "x"}),
]

CHAT_SPECIFIC: dict[str, list[tuple[str, Any]]] = {
    "messages": MESSAGES,
    "tools": TOOLS,
    "functions": [
        (k, [t["function"] if isinstance(t, dict) and "function" in t else t for t in v]) for k, v in TOOLS
    ],
    "tool_choice": TOOL_CHOICES,
    "function_call": [("named-missing", {"name": "missing"}), ("name-int", {"name": 5})],
    "response_format": RESPONSE_FORMATS,
    "stop": STOPS,
    "logit_bias": LOGIT_BIASES,
    "stream_options": STREAM_OPTIONS,
    "chat_template_kwargs": TEMPLATE_KWARGS,
    "generation_config": GENERATION_CONFIGS,
}
COMPLETION_SPECIFIC: dict[str, list[tuple[str, Any]]] = {
    "prompt": PROMPTS,
    "stop": STOPS,
    "logit_bias": LOGIT_BIASES,
    "stream_options": STREAM_OPTIONS,
    "generation_config": GENERATION_CONFIGS,
}
ADD_TOOL = _ADD

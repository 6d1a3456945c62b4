"""The request fields of OpenAI's spec as the fuzzer sees them: each field's JSON types and bounds.

The vendored spec mixes OpenAPI 3.0 (``nullable``) and 3.1 spellings and nests types in ``$ref``,
``allOf`` and ``anyOf``/``oneOf``; this flattens one field into what a mutation needs to know to
produce a value of the wrong type or outside the range.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from tests.openapi import SPEC_PATH

JSON_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


@dataclass
class FieldSpec:
    name: str
    types: set[str] = field(default_factory=set)  # empty: the spec says nothing (any type)
    minimum: float | None = None
    maximum: float | None = None
    enum: list[Any] = field(default_factory=list)
    max_length: int | None = None
    max_items: int | None = None

    def allows(self, json_type: str) -> bool:
        if not self.types:
            return True
        return json_type in self.types or (json_type == "integer" and "number" in self.types)

    @property
    def numeric(self) -> bool:
        return bool(self.types & {"integer", "number"})


@functools.cache
def _schemas() -> dict[str, Any]:
    return dict(json.loads(SPEC_PATH.read_text())["components"]["schemas"])


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while "$ref" in node and seen < 32:
        node = _schemas()[node["$ref"].split("/")[-1]]
        seen += 1
    return node


def _collect(node: Any, out: FieldSpec, depth: int = 0) -> None:
    """Fold a (sub)schema's types and bounds into ``out``."""
    if not isinstance(node, dict) or depth > 8:
        return
    node = _resolve(node)
    kind = node.get("type")
    if isinstance(kind, str):
        out.types.add(kind)
    elif isinstance(kind, list):
        out.types.update(k for k in kind if isinstance(k, str))
    if node.get("nullable") is True:
        out.types.add("null")
    if "properties" in node and not kind:
        out.types.add("object")
    if "items" in node and not kind:
        out.types.add("array")
    for key, attr in (("minimum", "minimum"), ("maximum", "maximum")):
        if isinstance(node.get(key), int | float) and getattr(out, attr) is None:
            setattr(out, attr, node[key])
    if isinstance(node.get("maxLength"), int) and out.max_length is None:
        out.max_length = node["maxLength"]
    if isinstance(node.get("maxItems"), int) and out.max_items is None:
        out.max_items = node["maxItems"]
    if isinstance(node.get("enum"), list):
        out.enum += [v for v in node["enum"] if v not in out.enum]
    if "const" in node and node["const"] not in out.enum:
        out.enum.append(node["const"])
    for key in ("anyOf", "oneOf", "allOf"):
        for part in node.get(key, []):
            _collect(part, out, depth + 1)


def _properties(schema_name: str) -> dict[str, Any]:
    schema = _schemas()[schema_name]
    props: dict[str, Any] = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        if "$ref" in part:
            props.update(_properties(part["$ref"].split("/")[-1]))
        else:
            props.update(part.get("properties", {}))
    return props


def request_fields(schema_name: str) -> list[FieldSpec]:
    """Every top-level field of a request schema (``CreateChatCompletionRequest``, ...)."""
    out = []
    for name, node in sorted(_properties(schema_name).items()):
        spec = FieldSpec(name)
        _collect(node, spec)
        out.append(spec)
    return out


# Extensions hfserve honours beyond the spec (README "Extensions"): fuzzed the same way.
EXTENSIONS = [
    FieldSpec("top_k", {"integer", "null"}, minimum=-1),
    FieldSpec("min_p", {"number", "null"}, minimum=0, maximum=1),
    FieldSpec("repetition_penalty", {"number", "null"}, minimum=0, maximum=10),
    FieldSpec("ignore_eos", {"boolean"}),
    FieldSpec("generation_config", {"string", "object", "null"}),
]
CHAT_EXTENSIONS = [
    *EXTENSIONS,
    FieldSpec("continue_final_message", {"boolean"}),
    FieldSpec("add_generation_prompt", {"boolean"}),
    FieldSpec("chat_template_kwargs", {"object", "null"}),
]

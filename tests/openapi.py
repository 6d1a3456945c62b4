"""Validate responses against OpenAI's published OpenAPI spec, vendored in ``tests/data``."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

SPEC_PATH = Path(__file__).resolve().parent / "data" / "openai-openapi.json"


def _nullable_to_2020(node: Any) -> Any:
    """The spec marks optional nulls OpenAPI-3.0 style (``nullable: true``); JSON Schema 2020-12,
    which its 3.1 header promises, spells that as a ``null`` type."""
    if isinstance(node, list):
        return [_nullable_to_2020(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_2020(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _spec() -> dict[str, Any]:
    return dict(_nullable_to_2020(json.loads(SPEC_PATH.read_text())))


def validate(schema_name: str, instance: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` matches the named component."""
    root = dict(_spec())
    root["$ref"] = f"#/components/schemas/{schema_name}"
    jsonschema.Draft202012Validator(root).validate(instance)

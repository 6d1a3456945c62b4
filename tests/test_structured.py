"""Structured output: ``response_format`` enforced by constrained decoding, per request in the batch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer

from model_host.demo.build import ModelSpec, build_model
from tests.server import ServerProcess

MODEL = "hfserve-demo"
STR = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -50, "maximum": 50}


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required if required is not None else list(props),
        "additionalProperties": False,
    }


SCHEMAS: list[dict[str, Any]] = [
    obj({"name": STR}),
    obj({"age": INT}),
    obj({"ok": {"type": "boolean"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"name": STR, "age": INT, "admin": {"type": "boolean"}}),
    obj({"tags": {"type": "array", "items": STR, "minItems": 1, "maxItems": 3}}),
    obj({"scores": {"type": "array", "items": INT, "maxItems": 4}}),
    obj({"point": obj({"x": INT, "y": INT})}),
    obj(
        {
            "user": obj(
                {
                    "name": STR,
                    "address": obj({"city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
                }
            )
        }
    ),
    obj({"items": {"type": "array", "items": obj({"id": INT, "label": STR}), "maxItems": 2}}),
    obj({"level": {"type": "integer", "minimum": 1, "maximum": 5}}),
    obj({"ratio": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"status": {"enum": ["on", "off"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}}),
    obj({"name": STR, "nickname": STR}, required=["name"]),
    obj({"maybe": {"anyOf": [INT, {"type": "null"}]}}),
    obj(
        {"matrix": {"type": "array", "items": {"type": "array", "items": INT, "maxItems": 2}, "maxItems": 2}}
    ),
    obj({"kind": {"const": "fixed"}, "value": INT}),
    obj({"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}}),
    obj({"a": obj({"b": obj({"c": obj({"d": INT})})})}),
    obj(
        {
            "title": STR,
            "pages": {"type": "integer", "minimum": 1, "maximum": 999},
            "genre": {"enum": ["sf", "crime"]},
        }
    ),
]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("random-tiny")
    return build_model(folder, ModelSpec(hidden_size=64, intermediate_size=128, train_steps=0, seed=1))


def test_twenty_schemas_with_a_random_model(server: ServerProcess, random_model: Path) -> None:
    async def run() -> list[openai.types.chat.ChatCompletion]:
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        try:
            return list(
                await asyncio.gather(
                    *(
                        c.chat.completions.create(
                            model=str(random_model),
                            messages=[{"role": "user", "content": f"case {i}"}],
                            temperature=0.8,
                            seed=i,
                            max_tokens=400,
                            response_format={
                                "type": "json_schema",
                                "json_schema": {"name": f"s{i}", "schema": schema},
                            },
                        )
                        for i, schema in enumerate(SCHEMAS)
                    )
                )
            )
        finally:
            await c.close()

    for schema, resp in zip(SCHEMAS, asyncio.run(run()), strict=True):
        text = resp.choices[0].message.content or ""
        assert resp.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_unconstrained_neighbours(server: ServerProcess, random_model: Path) -> None:
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    # A random model writes strings of any length, so an object may not close within max_tokens:
    # a bias towards the tokens that end strings and objects makes it close soon. The constraint
    # alone still decides what is valid JSON.
    tokenizer = Tokenizer.from_file(str(random_model / "tokenizer.json"))
    ends = [tokenizer.token_to_id(t) for t in ('"', "}", '"}')]
    closing = {str(i): 5 for i in ends if i is not None}
    for i in range(3):
        resp = c.chat.completions.create(
            model=str(random_model),
            messages=[{"role": "user", "content": f"object {i}"}],
            temperature=0.8,
            seed=i,
            max_tokens=400,
            logit_bias=closing,
            response_format={"type": "json_object"},
        )
        assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
        assert isinstance(json.loads(resp.choices[0].message.content or ""), dict)
    # The constraint is per request: the same prompt without it is the usual greeting.
    free = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], temperature=0
    )
    assert free.choices[0].message.content == "Hello! How can I help you today?"


def test_unsupported_schema_is_400(server: ServerProcess) -> None:
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"if": {"type": "string"}}},
            },
        )
    assert exc.value.body["param"] == "response_format"  # type: ignore[index]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_choice_with_a_random_model(
    server: ServerProcess, random_model: Path, choice: Any
) -> None:
    from model_host.demo.corpus import ADD_TOOL, WEATHER_TOOL

    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    reply = c.chat.completions.create(
        model=str(random_model),
        messages=[{"role": "user", "content": "anything"}],
        tools=[WEATHER_TOOL, ADD_TOOL],
        tool_choice=choice,
        temperature=0.8,
        seed=2,
        max_tokens=400,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    if isinstance(choice, dict):
        assert call.function.name == "add"
    tool = {"get_weather": WEATHER_TOOL, "add": ADD_TOOL}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_logit_bias_bans_a_token(server: ServerProcess, demo_model: Path) -> None:
    first = (
        Tokenizer.from_file(str(demo_model / "tokenizer.json"))
        .encode("Hello", add_special_tokens=False)
        .ids[0]
    )
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    free = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], temperature=0, logprobs=True
    )
    assert free.choices[0].message.content == "Hello! How can I help you today?"
    banned = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello!"}],
        temperature=0,
        logprobs=True,
        logit_bias={str(first): -100},
    )
    assert not (banned.choices[0].message.content or "").startswith("Hello")
    first_tokens = [e.token for e in banned.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert "Hello" not in first_tokens


BOOL = {"type": "boolean"}
BOUNDED_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": obj({"city": {"type": "string", "maxLength": 8}, "units": {"enum": ["c", "f"]}}),
        },
    },
    {
        "type": "function",
        "function": {
            "name": "count",
            "parameters": obj({"n": {"type": "integer", "maximum": 99, "minimum": 0}, "ok": BOOL}),
        },
    },
]
BOUNDED_SCHEMA = obj(
    {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "n": INT,
    }
)


def test_constrained_json_has_no_room_for_padding(server: ServerProcess, random_model: Path) -> None:
    """JSON under a grammar is laid out one way, with no free whitespace: a random model pushed
    towards blanks (a logit_bias on every whitespace token), which would otherwise pad between
    JSON tokens for ever, always closes a bounded call or object within 120 tokens."""
    tokenizer = Tokenizer.from_file(str(random_model / "tokenizer.json"))
    blanks = [i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i]).isspace()]
    assert blanks

    async def run() -> list[openai.types.chat.ChatCompletion]:
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        common: dict[str, Any] = {"model": str(random_model), "temperature": 1.0, "max_tokens": 120}
        common["logit_bias"] = {str(i): 10 for i in blanks}
        calls = [
            c.chat.completions.create(
                messages=[{"role": "user", "content": f"call {seed}"}],
                tools=BOUNDED_TOOLS,  # type: ignore[arg-type]
                tool_choice="required",
                seed=seed,
                **common,
            )
            for seed in range(10)
        ]
        fmt = {"type": "json_schema", "json_schema": {"name": "bounded", "schema": BOUNDED_SCHEMA}}
        objects = [
            c.chat.completions.create(
                messages=[{"role": "user", "content": f"object {seed}"}],
                response_format=fmt,  # type: ignore[arg-type]
                seed=seed,
                **common,
            )
            for seed in range(10)
        ]
        try:
            return list(await asyncio.gather(*calls, *objects))
        finally:
            await c.close()

    replies = asyncio.run(run())
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}
    for reply in replies[:10]:
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])
    for reply in replies[10:]:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), BOUNDED_SCHEMA)


def test_call_grammars_fix_the_json_layout() -> None:
    from sanic_serve.parsing.call_grammar import forced_call_grammar

    params = obj({"n": INT, "xs": {"type": "array"}})
    for markup in ("hermes", "llama3_json", "mistral", "qwen3_xml", "gemma4"):
        grammar = forced_call_grammar(
            markup, [{"type": "function", "function": {"name": "f", "parameters": params}}], None
        )
        assert grammar.count("%json") == grammar.count('"whitespace_flexible": false') > 0, markup

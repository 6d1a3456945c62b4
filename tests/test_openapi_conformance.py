"""Every response and stream chunk of a broad request matrix matches OpenAI's published schemas."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

from model_host.demo.corpus import WEATHER_TOOL
from tests.openapi import validate
from tests.server import ServerProcess

MODEL = "hfserve-demo"
MATRIX: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0},
    {"messages": [{"role": "user", "content": "Tell me a joke"}], "stop": ["cat"], "temperature": 0},
    {"messages": [{"role": "user", "content": "Write a long story"}], "max_completion_tokens": 5},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "seed": 3,
        "temperature": 1.2,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logit_bias": {"5": -100},
        "user": "u-1",
        "metadata": {"k": "v"},
    },
    {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "temperature": 0,
    },
    {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "none",
        "temperature": 0,
        "max_tokens": 10,
    },
    {
        "messages": [{"role": "user", "content": "Tell me a joke"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 60,
    },
    {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "functions": [WEATHER_TOOL["function"]],
        "function_call": {"name": "get_weather"},
        "temperature": 0,
        "max_tokens": 60,
    },
    {
        "messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello!"}],
        "continue_final_message": True,
        "max_tokens": 8,
    },
    {"messages": [{"role": "user", "content": "zebra violin"}], "n": 3, "seed": 1, "max_tokens": 6},
    {
        "messages": [{"role": "user", "content": "Tell me a joke"}],
        "logprobs": True,
        "top_logprobs": 3,
        "temperature": 0,
    },
    {
        "messages": [{"role": "user", "content": "Hello!"}],
        "temperature": 0,
        "max_tokens": 40,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "g",
                "schema": {
                    "type": "object",
                    "properties": {"greeting": {"type": "string", "maxLength": 10}},
                    "required": ["greeting"],
                    "additionalProperties": False,
                },
            },
        },
    },
]


def _post(server: ServerProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=60)


def test_schema_check_can_fail() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate("CreateChatCompletionResponse", {"id": "x", "object": "chat.completion", "choices": []})


@pytest.mark.parametrize("body", MATRIX)
def test_non_stream_responses_match_schema(server: ServerProcess, body: dict[str, Any]) -> None:
    resp = _post(server, body)
    assert resp.status_code == 200, resp.text
    validate("CreateChatCompletionResponse", resp.json())


@pytest.mark.parametrize("body", MATRIX)
def test_stream_chunks_match_schema(server: ServerProcess, body: dict[str, Any]) -> None:
    resp = _post(server, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200, resp.text
    events = [e[len("data: ") :] for e in resp.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["total_tokens"] > 0
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 9},
        {"messages": [{"role": "user", "content": "hi"}], "n": 0},
        {"model": "nobody/nothing", "messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi " * 5000}]},
    ],
)
def test_error_responses_match_schema(server: ServerProcess, body: dict[str, Any]) -> None:
    resp = _post(server, body)
    assert resp.status_code in (400, 404)
    validate("ErrorResponse", resp.json())


def test_models_match_schema(server: ServerProcess) -> None:
    validate("ListModelsResponse", httpx.get(f"{server.base_url}/v1/models").json())
    validate("Model", httpx.get(f"{server.base_url}/v1/models/{MODEL}").json())


@pytest.mark.parametrize("endpoint", ["CreateChatCompletionRequest", "CreateCompletionRequest"])
def test_every_request_field_of_the_spec_is_handled(endpoint: str) -> None:
    """Each request field of the spec is honoured, a documented no-op, or refused."""
    from sanic_serve.chat.request import ChatCompletionRequest
    from sanic_serve.completions.request import CompletionRequest
    from sanic_serve.protocol import NO_OP_FIELDS, UNSUPPORTED_DEFAULTS
    from tests.openapi import SPEC_PATH

    schemas = json.loads(SPEC_PATH.read_text())["components"]["schemas"]

    def fields(name: str) -> set[str]:
        schema = schemas[name]
        out = set(schema.get("properties", {}))
        for part in schema.get("allOf", []):
            out |= fields(part["$ref"].split("/")[-1]) if "$ref" in part else set(part.get("properties", {}))
        return out

    spec = fields(endpoint)
    assert {"model", "n", "logprobs", "stream"} <= spec  # the walk above really found the fields
    if endpoint == "CreateChatCompletionRequest":
        handled = set(ChatCompletionRequest.model_fields) | NO_OP_FIELDS | set(UNSUPPORTED_DEFAULTS)
    else:
        handled = set(CompletionRequest.model_fields) | NO_OP_FIELDS  # all honoured
    assert spec - handled == set()

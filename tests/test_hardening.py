"""Request handling on the shared server: usage with ``n``, content parts no model here reads,
empty prompts, JSON-schema limits, and 5xx bodies that carry a request id instead of exception text."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from sanic_serve.chat.types import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, check_json_limits
from tests.server import ServerProcess, model_with_template
from tests.test_errors import assert_error

MODEL = "hfserve-demo"
HELLO = [{"role": "user", "content": "Hello!"}]


def post(server: ServerProcess, path: str, body: dict[str, Any], schema_text: str = "") -> httpx.Response:
    """``schema_text`` takes the place of the string "SCHEMA" in the body: JSON nested deeper than
    the client's own encoder goes."""
    raw = json.dumps(body).replace('"SCHEMA"', schema_text) if schema_text else json.dumps(body)
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{server.base_url}{path}", content=raw.encode(), headers=headers, timeout=120)


def chat(server: ServerProcess, schema_text: str = "", **body: Any) -> httpx.Response:
    return post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, **body}, schema_text)


# -- usage ---------------------------------------------------------------------------------------
def test_chat_usage_counts_the_prompt_once_for_n_choices(server: ServerProcess) -> None:
    one = chat(server, max_tokens=4).json()["usage"]
    three = chat(server, max_tokens=4, n=3, temperature=1.0, seed=1).json()
    assert len(three["choices"]) == 3
    assert three["usage"]["prompt_tokens"] == one["prompt_tokens"]
    completion = three["usage"]["completion_tokens"]
    assert three["usage"]["total_tokens"] == one["prompt_tokens"] + completion
    streamed = chat(server, max_tokens=4, n=2, stream=True, stream_options={"include_usage": True})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens"] == one["prompt_tokens"]


# -- content parts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("part", "word"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}, "images"),
        ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "files"),
    ],
)
def test_media_parts_are_refused_naming_the_part(
    server: ServerProcess, part: dict[str, Any], word: str
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
    ]
    err = assert_error(chat(server, messages=messages), 400, param="messages[1].content[1]")
    assert f"takes no {word}" in err["message"] and MODEL in err["message"]


def test_text_parts_still_work(server: ServerProcess) -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]
    messages = [{"role": "user", "content": parts}]
    reply = chat(server, messages=messages, temperature=0).json()
    assert reply["choices"][0]["message"]["content"] == "Hello! How can I help you today?"


# -- empty prompts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "param"),
    [("", "prompt"), ([""], "prompt[0]"), (["Hello", ""], "prompt[1]"), ([], "prompt"), ([[]], "prompt")],
)
def test_empty_completion_prompts_are_400(server: ServerProcess, prompt: Any, param: str) -> None:
    failed = server.host_status()["failed_total"]
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert_error(resp, 400, param=param)
    assert server.host_status()["failed_total"] == failed  # nothing reached the model host


def test_chat_rendering_to_no_tokens_is_400(server: ServerProcess, demo_model: Path, tmp_path: Path) -> None:
    bare = model_with_template(
        demo_model, tmp_path / "bare-template", lambda _: "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    body = {"model": str(bare), "messages": [{"role": "user", "content": ""}], "max_tokens": 2}
    failed = server.host_status()["failed_total"]
    assert_error(post(server, "/v1/chat/completions", body), 400, param="messages")
    assert server.host_status()["failed_total"] == failed
    body["messages"] = HELLO
    assert post(server, "/v1/chat/completions", body).status_code == 200


# -- JSON-schema limits --------------------------------------------------------------------------
def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def wide(size_bytes: int) -> dict[str, Any]:
    props = {f"p{i}": {"type": "string", "description": "x" * 1000} for i in range(size_bytes // 1000)}
    return {"type": "object", "properties": props}


def nested_text(depth: int) -> str:
    return '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth


@pytest.mark.parametrize(
    "schema", [nested_text(1000), json.dumps(wide(300_000))], ids=["1000-deep", "300-KB"]
)
def test_oversized_schemas_are_400_naming_the_field(server: ServerProcess, schema: str) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": "SCHEMA"}}
    resp = chat(server, schema, response_format=response_format)
    err = assert_error(resp, 400, param="response_format.json_schema.schema")
    assert "levels" in err["message"] or "KB" in err["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": "SCHEMA"}}
    assert_error(chat(server, schema, tools=[tool]), 400, param="tools[0].function.parameters")
    functions = [{"name": "f", "parameters": "SCHEMA"}]
    assert_error(chat(server, schema, functions=functions), 400, param="functions[0].parameters")


def test_schema_limits_unit() -> None:
    check_json_limits(nested(MAX_SCHEMA_DEPTH - 1))  # the innermost dict is one level more
    with pytest.raises(ValueError, match="levels"):
        check_json_limits(nested(MAX_SCHEMA_DEPTH))
    check_json_limits(wide(MAX_SCHEMA_BYTES - 20_000))
    with pytest.raises(ValueError, match="KB"):
        check_json_limits(wide(MAX_SCHEMA_BYTES + 1000))
    # A deep one is refused without recursion, far beyond Python's recursion limit.
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="levels"):
        check_json_limits(deep)


# -- 5xx bodies ----------------------------------------------------------------------------------
REF = re.compile(r"\(request id (req_\w+)\)\.$")


def assert_plain_5xx(server: ServerProcess, resp: httpx.Response, code: str, leaks: tuple[str, ...]) -> None:
    err = assert_error(resp, 500, code=code)
    found = REF.search(err["message"])
    assert found, err["message"]
    for leak in leaks:
        assert leak not in err["message"]
    # The same id names the failure, with its traceback, in the server's log.
    log = server.log_text()
    at = log.find(found.group(1))
    assert at >= 0, log[-3000:]
    assert "Traceback" in log[at:]


# A forward pass that raises is tested on the server of test_hardening_limits (remote code).
def test_model_load_failure_hides_paths_and_exception_text(
    server: ServerProcess, demo_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "bad-weights"
    shutil.copytree(demo_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    resp = post(server, "/v1/chat/completions", {"model": str(broken), "messages": HELLO})
    # The model's name is the folder the client asked for; nothing else of the failure shows.
    assert_plain_5xx(server, resp, "model_load_failed", ("safetensors", "Error", "header"))

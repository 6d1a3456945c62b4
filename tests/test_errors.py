"""Bad input gets the right status and an OpenAI error object, and the server keeps serving."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server import ServerProcess

MODEL = "hfserve-demo"
URL = "/v1/chat/completions"


def post(server: ServerProcess, body: Any = None, raw: bytes | None = None) -> httpx.Response:
    kwargs: dict[str, Any] = {"content": raw} if raw is not None else {"json": body}
    return httpx.post(f"{server.base_url}{URL}", timeout=60, **kwargs)


def assert_error(
    resp: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    expected_type = "invalid_request_error" if status < 500 else "server_error"
    assert err["type"] == expected_type
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return dict(err)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "stop": ["a", "b", "c", "d", "e"],
            },
            "stop",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21},
            "top_logprobs",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"if": {}}},
                },
            },
            "response_format",
        ),
    ],
)
def test_invalid_fields_are_400_naming_the_param(
    server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    assert_error(post(server, body), 400, param=param)


def test_malformed_json_and_wrong_shapes(server: ServerProcess) -> None:
    assert_error(post(server, raw=b'{"model": "x", "messages": ['), 400)
    assert_error(post(server, raw=b""), 400)
    assert_error(post(server, raw=b"[1, 2, 3]"), 400)
    assert_error(post(server, raw=b"\xff\xfe garbage"), 400)


def test_unknown_model_is_404(server: ServerProcess) -> None:
    body = {"model": "nobody/no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(server, body), 404, param="model", code="model_not_found")
    body["model"] = "/no/such/folder"
    assert_error(post(server, body), 404, param="model", code="model_not_found")


def test_context_length_exceeded(server: ServerProcess) -> None:
    long_text = "hello " * 5000
    body = {"model": MODEL, "messages": [{"role": "user", "content": long_text}]}
    assert_error(post(server, body), 400, code="context_length_exceeded")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}
    assert_error(post(server, body), 400, code="context_length_exceeded")


def test_routing_errors(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.base_url}/v1/nothing-here", timeout=10)
    assert_error(resp, 404)
    resp = httpx.get(f"{server.base_url}{URL}", timeout=10)
    assert_error(resp, 405)


def test_oversized_body_is_413(server: ServerProcess) -> None:
    # Over the generation routes' limit: room for one 20 MB image as a data URL (about 27.7 MB).
    resp = post(server, raw=b'{"x": "' + b"a" * (29 * 1024 * 1024) + b'"}')
    assert resp.status_code == 413
    assert "error" in resp.json()


def test_unknown_extra_fields_are_accepted(server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello!"}],
        "temperature": 0,
        "user": "someone",
        "metadata": {"a": "b"},
        "vendor_extra": {"x": 1},
    }
    resp = post(server, body)
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "Hello! How can I help you today?"


def test_openai_client_raises_typed_errors(server: ServerProcess) -> None:
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert exc.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="missing/model", messages=[{"role": "user", "content": "x"}])


def test_server_still_serves_after_bad_inputs(server: ServerProcess) -> None:
    for raw in (b"{", b"null", b'{"model": 1}', b'{"model": "hfserve-demo", "messages": [{}]}'):
        assert post(server, raw=raw).status_code == 400
    ok = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0})
    assert ok.status_code == 200
    assert server.health().status_code == 200


def test_model_that_fails_to_load_is_an_error_not_a_crash(
    server: ServerProcess, demo_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(demo_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    body = {"model": str(broken), "messages": [{"role": "user", "content": "Hello!"}]}
    err = assert_error(post(server, body), 500, code="model_load_failed")
    assert "could not be loaded (request id req_" in err["message"]
    body["stream"] = True
    assert_error(post(server, body), 500, code="model_load_failed")
    # The host survived: the default model still answers.
    ok = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0})
    assert ok.json()["choices"][0]["message"]["content"] == "Hello! How can I help you today?"
    assert server.host_status()["failed_total"] >= 2

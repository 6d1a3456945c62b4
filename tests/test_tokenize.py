"""``POST /tokenize`` and ``POST /detokenize`` (issue 17, item 3 and acceptance 4), in vLLM's field
names: end to end on the session's demo server, checked against the chat route itself (its
``usage.prompt_tokens``, and the same greedy reply generated from the ids through ``/v1/completions``)
and against transformers' own ``apply_chat_template``; the embedding model's prompts in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer

from sanic_serve.errors import InvalidRequest
from tests.openapi import validate
from tests.server import ServerProcess

MODEL = "hfserve-demo"
HELLO = [{"role": "user", "content": "Hello!"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# Chat bodies whose rendering differs in each of the ways a chat request can change it.
CHATS: dict[str, dict[str, Any]] = {
    "one turn": {"messages": HELLO},
    "system and turns": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you? ünïcödé ✓"},
        ]
    },
    "text parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Count to five"}]}]},
    "tools": {"messages": HELLO, "tools": [WEATHER]},
    "tool choice none": {"messages": HELLO, "tools": [WEATHER], "tool_choice": "none"},
    "tool result": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        "tools": [WEATHER],
    },
    "no generation prompt": {"messages": HELLO, "add_generation_prompt": False},
    "continued reply": {
        "messages": [*HELLO, {"role": "assistant", "content": "Hello! How"}],
        "continue_final_message": True,
        "add_generation_prompt": False,
    },
}


def post(srv: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{srv.base_url}{path}", json=body, timeout=120.0)


def tokenize(srv: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    resp = post(srv, "/tokenize", body)
    assert resp.status_code == 200, resp.text
    out = dict(resp.json())
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
    assert out["count"] == len(out["tokens"])
    return out


def detokenize(srv: ServerProcess, tokens: list[int], **extra: Any) -> str:
    resp = post(srv, "/detokenize", {"tokens": tokens, **extra})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == {"prompt"}
    return str(resp.json()["prompt"])


def plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: text parts joined (as the chat route joins them), no
    null content."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        out.append({**message, "content": content or ""})
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(demo_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model))


@pytest.fixture(scope="module")
def demo_tokenizer(demo_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model / "tokenizer.json"))


@pytest.mark.parametrize("name", list(CHATS))
def test_messages_give_the_ids_the_chat_route_reads(
    server: ServerProcess, hf_tokenizer: Any, demo_tokenizer: Tokenizer, name: str
) -> None:
    body = CHATS[name]
    out = tokenize(server, {"model": MODEL, **body})
    assert out["token_strs"] is None and out["max_model_len"] == 2048
    chat = post(server, "/v1/chat/completions", {"model": MODEL, **body, "max_tokens": 1, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == out["count"]
    # transformers' own rendering of the same conversation (tool choice "none" bans the call marker
    # and keeps the tools in the prompt, as tools alone do), tokenized by the model's tokenizer.json
    # (the server tokenizes with tokenizer.json; transformers' tokenizer object of the demo model
    # splits digits where tokenizer.json does not).
    rendered = hf_tokenizer.apply_chat_template(
        plain(body["messages"]),
        tools=body.get("tools"),
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        tokenize=False,
    )
    assert out["tokens"] == demo_tokenizer.encode(rendered, add_special_tokens=False).ids
    # /detokenize gives the rendered prompt back, and the rendered prompt tokenizes to the same ids.
    text = detokenize(server, out["tokens"])
    assert text == rendered
    assert tokenize(server, {"prompt": text, "add_special_tokens": False})["tokens"] == out["tokens"]


def test_the_ids_generate_the_chat_reply(server: ServerProcess) -> None:
    """The ids fed back as a raw prompt give the chat route's greedy reply, token for token."""
    ids = tokenize(server, {"model": MODEL, "messages": HELLO})["tokens"]
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "temperature": 0})
    text = post(
        server, "/v1/completions", {"model": MODEL, "prompt": ids, "temperature": 0, "max_tokens": 32}
    )
    assert chat.status_code == 200 and text.status_code == 200, (chat.text, text.text)
    reply = chat.json()["choices"][0]["message"]["content"]
    assert reply == "Hello! How can I help you today?"
    assert text.json()["choices"][0]["text"] == reply
    assert text.json()["usage"]["completion_tokens"] == chat.json()["usage"]["completion_tokens"]


def test_reasoning_and_template_kwargs_go_through_the_chat_parser(server: ServerProcess) -> None:
    """Fields of the chat request are the chat route's: the same 400 for the same mistake."""
    body = {"model": MODEL, "messages": HELLO, "reasoning_effort": "high"}
    tok = post(server, "/tokenize", body)
    chat = post(server, "/v1/chat/completions", body)
    assert tok.status_code == chat.status_code == 400, (tok.text, chat.text)
    assert tok.json() == chat.json()
    assert tok.json()["error"]["param"] == "reasoning_effort"


def test_prompt_token_strs_and_default_model(server: ServerProcess, demo_tokenizer: Tokenizer) -> None:
    prompt = "Hello there, ünïcödé ✓ <|im_end|>"
    out = tokenize(server, {"prompt": prompt, "return_token_strs": True})  # no model: the default one
    expected = demo_tokenizer.encode(prompt, add_special_tokens=True)
    assert out["tokens"] == expected.ids and out["token_strs"] == expected.tokens
    assert "<|im_end|>" in out["token_strs"]  # a special token in the text is read as one
    assert out["max_model_len"] == 2048
    assert tokenize(server, {"model": MODEL, "prompt": prompt})["tokens"] == expected.ids
    assert detokenize(server, out["tokens"], model=MODEL) == prompt
    assert tokenize(server, {"prompt": ""})["tokens"] == []
    assert detokenize(server, []) == ""


BAD_BODIES: list[tuple[str, Any, str | None]] = [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": HELLO}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "model": 3}, "model"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": "Hello"}, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"messages": HELLO, "return_token_strs": 1}, "return_token_strs"),
    ("/tokenize", {"messages": HELLO, "chat_template": "{{ messages }}"}, "chat_template"),
    ("/tokenize", {"messages": HELLO, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ("/tokenize", {"messages": HELLO, "continue_final_message": True}, "continue_final_message"),
    (
        "/tokenize",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]",
    ),
    ("/tokenize", ["prompt"], None),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {"tokens": [1, 2.5]}, "tokens[1]"),
    ("/detokenize", {"tokens": [1, True]}, "tokens[1]"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens[1]"),
    ("/detokenize", {"tokens": [0, 776]}, "tokens[1]"),  # the demo vocabulary has 776 tokens
    ("/detokenize", {"tokens": [0, 2**70]}, "tokens[1]"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_BODIES)
def test_bad_bodies_are_400s_naming_the_field(
    server: ServerProcess, path: str, body: Any, param: str | None
) -> None:
    resp = post(server, path, body)
    assert resp.status_code == 400, resp.text
    validate("ErrorResponse", resp.json())
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert "Traceback" not in err["message"] and "pydantic" not in err["message"]


def test_not_json_unknown_model_and_still_serving(server: ServerProcess) -> None:
    resp = httpx.post(f"{server.base_url}/tokenize", content=b"{not json", timeout=30.0)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        resp = post(server, path, {**body, "model": "no-such/model"})
        assert resp.status_code == 404, resp.text
        validate("ErrorResponse", resp.json())
        assert resp.json()["error"]["code"] == "model_not_found" and resp.json()["error"]["param"] == "model"
    assert tokenize(server, {"prompt": "Hello"})["count"] > 0


def test_embedding_model_prompts_are_the_embeddings_routes_ids() -> None:
    """An embedding model (no chat template) tokenizes prompts as /v1/embeddings does, special
    tokens and lowercasing included; messages are a 400."""
    from sanic_serve.embeddings.protocol import parse_embedding_request, tokenize_inputs
    from sanic_serve.models import load_bundle
    from sanic_serve.routes.tokenize import tokenize_body
    from tests.embedding_texts import FOLDER

    bundle = load_bundle(str(FOLDER), FOLDER)
    assert bundle.embedding is not None
    text = "The Quick brown fox, ünïcödé."
    embedded = tokenize_inputs(
        parse_embedding_request({"model": str(FOLDER), "input": text}),
        bundle.embedding,
        bundle.tokenizer,
        bundle.id,
    )[0]
    out = tokenize_body(bundle, {"prompt": text, "return_token_strs": True})
    assert out["tokens"] == embedded and out["count"] == len(embedded)
    assert (
        out["token_strs"][0] == "[CLS]" and out["token_strs"][-1] == "[SEP]" and "quick" in out["token_strs"]
    )
    assert out["max_model_len"] == 256
    bare = tokenize_body(bundle, {"prompt": text, "add_special_tokens": False})["tokens"]
    assert bare == embedded[1:-1]
    with pytest.raises(InvalidRequest) as refused:
        tokenize_body(bundle, {"messages": HELLO})
    assert refused.value.param == "messages"

"""``/v1/completions``: raw prompts (text, lists, token ids), n, echo, streaming, schema."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from tests.openapi import validate
from tests.server import ServerProcess

MODEL = "hfserve-demo"
HELLO = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
JOKE = "<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n"


def stream_completion(server: ServerProcess, **body: object) -> list[dict]:
    """POST a streamed completion of JOKE; returns the JSON events before ``[DONE]``."""
    raw = httpx.post(
        f"{server.base_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": JOKE, "temperature": 0, "max_tokens": 30, "stream": True, **body},
    ).text
    events = [e[len("data: ") :] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def test_text_prompt(server: ServerProcess) -> None:
    resp = client(server).completions.create(model=MODEL, prompt=HELLO, temperature=0, max_tokens=30)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "Hello! How can I help you today?"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 10


def test_default_max_tokens_is_16(server: ServerProcess) -> None:
    story = "<|im_start|>user\nWrite a long story<|im_end|>\n<|im_start|>assistant\n"
    resp = client(server).completions.create(model=MODEL, prompt=story, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 16


def test_token_ids_prompt_list_and_n(server: ServerProcess, demo_model: Path) -> None:
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    hello_ids = tok.encode(HELLO, add_special_tokens=False).ids
    resp = client(server).completions.create(model=MODEL, prompt=hello_ids, temperature=0, max_tokens=30)
    assert resp.choices[0].text == "Hello! How can I help you today?"
    both = client(server).completions.create(
        model=MODEL, prompt=[HELLO, JOKE], n=2, temperature=0, max_tokens=30
    )
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices][:2] == ["Hello! How can I help you today?"] * 2
    assert "mouse" in both.choices[2].text and both.choices[2].text == both.choices[3].text
    joke_len = len(tok.encode(JOKE, add_special_tokens=False).ids)
    assert both.usage is not None and both.usage.prompt_tokens == len(hello_ids) + joke_len


def test_echo_and_stream(server: ServerProcess) -> None:
    whole = client(server).completions.create(
        model=MODEL, prompt=JOKE, temperature=0, max_tokens=30, echo=True
    )
    assert whole.choices[0].text.startswith(JOKE) and "mouse" in whole.choices[0].text
    chunks = stream_completion(server, echo=True, stream_options={"include_usage": True})
    text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    assert text == whole.choices[0].text
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens  # type: ignore[union-attr]
    for ch in chunks:
        # The spec's schema is the whole response, whose finish_reason is always a string; the
        # chunks before the last carry null there, as OpenAI's own stream does.
        if ch["choices"] and ch["choices"][0]["finish_reason"] is not None:
            validate("CreateCompletionResponse", ch)
        elif ch["choices"]:
            assert set(ch["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    raw_whole = httpx.post(
        f"{server.base_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": [JOKE, HELLO], "n": 2, "temperature": 0, "max_tokens": 30},
    ).json()
    validate("CreateCompletionResponse", raw_whole)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": HELLO, "suffix": "x"}, "suffix"),
        ({"prompt": HELLO, "logprobs": 6}, "logprobs"),
        ({"prompt": HELLO, "logprobs": 2, "echo": True}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": HELLO, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_completion_requests(server: ServerProcess, body: dict[str, object], param: str) -> None:
    resp = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    validate("ErrorResponse", resp.json())


def test_legacy_logprobs(server: ServerProcess) -> None:
    whole = client(server).completions.create(
        model=MODEL, prompt=JOKE, temperature=0, max_tokens=30, logprobs=2
    )
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert "".join(lp.tokens) == whole.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    chunks = stream_completion(server, logprobs=2)
    tokens = [t for ch in chunks for t in (ch["choices"][0]["logprobs"] or {}).get("tokens", [])]
    offsets = [o for ch in chunks for o in (ch["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == lp.tokens and offsets == lp.text_offset

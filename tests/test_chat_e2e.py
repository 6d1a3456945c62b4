"""Chat completions end to end: real server, official OpenAI client (sync and async), raw HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.server import ServerProcess, model_with_template

MODEL = "hfserve-demo"
HELLO = [{"role": "user", "content": "Hello!"}]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def aclient(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_sync_non_stream_greeting(server: ServerProcess) -> None:
    resp = client(server).chat.completions.create(model=MODEL, messages=HELLO, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello! How can I help you today?"
    assert choice.finish_reason == "stop"
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert resp.usage is not None
    # 10 reply tokens: the 9 of the sentence and the end-of-turn token that stopped it.
    assert resp.usage.completion_tokens == 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens > 5


def test_sync_stream_matches_non_stream(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Tell me a joke"}]
    whole = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0)
    stream = client(server).chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert "mouse" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert len({c.id for c in chunks}) == 1


def test_async_stream_and_non_stream(server: ServerProcess) -> None:
    async def run() -> tuple[str, str]:
        c = aclient(server)
        whole = await c.chat.completions.create(model=MODEL, messages=HELLO, temperature=0)
        parts = []
        async for chunk in await c.chat.completions.create(
            model=MODEL, messages=HELLO, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        await c.close()
        return whole.choices[0].message.content or "", "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole == streamed == "Hello! How can I help you today?"


def test_max_tokens_gives_length(server: ServerProcess) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        resp = client(server).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story"}],
            temperature=0,
            **{field: 5},
        )
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None and resp.usage.completion_tokens == 5
        assert resp.choices[0].message.content.startswith("Once upon")  # type: ignore[union-attr]


def test_stop_string_cuts_before_it(server: ServerProcess) -> None:
    resp = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a joke"}],
        temperature=0,
        stop=["computer"],
    )
    assert resp.choices[0].message.content == "Why did the cat sit on the "
    assert resp.choices[0].finish_reason == "stop"
    stream = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a joke"}],
        temperature=0,
        stop="the com",
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Why did the cat sit on "


def test_text_parts_and_system_message(server: ServerProcess) -> None:
    resp = client(server).chat.completions.create(
        model=MODEL,
        temperature=0,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "How are "}, {"type": "text", "text": "you?"}],
            },
        ],
    )
    assert resp.choices[0].message.content == "I am fine, thank you. How are you?"


def test_seeded_sampling_is_reproducible(server: ServerProcess) -> None:
    def once(seed: int) -> str:
        resp = client(server).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story"}],
            temperature=2.0,
            top_p=1.0,
            seed=seed,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )
        return resp.choices[0].message.content or ""

    assert once(7) == once(7)
    assert len({once(s) for s in (1, 2, 3)}) > 1


def test_models_endpoints(server: ServerProcess) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data][0] == MODEL  # others tests may have loaded come after it
    assert client(server).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("no-such-model")


def test_health_reports_host(server: ServerProcess, demo_model: Path) -> None:
    resp = server.health()
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert body["host"]["pid"] > 0 and body["host"]["heartbeat_age_s"] < 2.0
    assert body["host"]["models"][0] == str(demo_model.resolve())  # the preloaded one comes first
    assert body["host"]["ready"] is True


def _sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n"), "SSE stream must end with a blank line"
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


def test_curl_streaming_is_well_formed_sse(server: ServerProcess) -> None:
    body = json.dumps({"model": MODEL, "messages": HELLO, "stream": True, "temperature": 0})
    if shutil.which("curl"):
        raw = subprocess.run(
            [
                "curl",
                "-sN",
                f"{server.base_url}/v1/chat/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    else:  # same bytes over raw HTTP
        raw = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        ).text
    events = _sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello! How can I help you today?"


def test_stream_headers(server: ServerProcess) -> None:
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "messages": HELLO, "stream": True},
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        resp.read()


def test_chat_template_kwargs_reach_the_template(
    server: ServerProcess, demo_model: Path, tmp_path: Path
) -> None:
    folder = model_with_template(
        demo_model, tmp_path / "with-variable", lambda t: t + "{{- extra_text or '' }}"
    )

    def prompt_tokens(kwargs: dict[str, object] | None) -> int:
        body = {"model": str(folder), "messages": HELLO, "max_tokens": 1, "chat_template_kwargs": kwargs}
        resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        return int(resp.json()["usage"]["prompt_tokens"])

    assert prompt_tokens({"extra_text": "one two three four"}) > prompt_tokens(None)
    # Variables the server sets itself are refused, naming the field.
    resp = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "messages": HELLO, "chat_template_kwargs": {"add_generation_prompt": 1}},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "chat_template_kwargs"


def test_one_token_requests_alone_and_together(server: ServerProcess) -> None:
    # Requests that finish at their first token leave the batch in the step that admitted them.
    async def run() -> list[openai.types.chat.ChatCompletion]:
        c = aclient(server)
        try:
            return list(
                await asyncio.gather(
                    *(c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1) for _ in range(6))
                )
            )
        finally:
            await c.close()

    for resp in asyncio.run(run()):
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None and resp.usage.completion_tokens == 1
        assert resp.choices[0].message.content == "Hello"
    stream = client(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, stream=True)
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"
    assert server.host_status()["epoch"] == 1  # the host never restarted


def test_n_choices_stream_and_non_stream(server: ServerProcess) -> None:
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "zebra violin quantum"}],
        n=3,
        seed=11,
        temperature=1.5,
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    whole = client(server).chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) == 3  # seeds 11, 12, 13: three different samples
    assert whole.usage is not None and whole.usage.completion_tokens == 3 * 12
    chunks = list(client(server).chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    streamed = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == texts  # the same seeds give the same texts
    assert finishes == {0: "length", 1: "length", 2: "length"}


# --- continue_final_message: the reply continues a prefilled assistant message ------------------


def test_continue_final_message(server: ServerProcess) -> None:
    prefill = [*HELLO, {"role": "assistant", "content": "Hello! How can"}]
    body = {"model": MODEL, "messages": prefill, "temperature": 0, "max_tokens": 20}
    url = f"{server.base_url}/v1/chat/completions"
    reply = httpx.post(url, json={**body, "continue_final_message": True}, timeout=60).json()
    whole = httpx.post(
        url,
        json={"model": MODEL, "messages": HELLO, "temperature": 0},
        timeout=60,
    ).json()
    # the greeting the model gives anyway, picked up where the prefill left off
    assert (
        "Hello! How can" + reply["choices"][0]["message"]["content"]
        == whole["choices"][0]["message"]["content"]
    )
    for bad in (
        {**body, "continue_final_message": True, "add_generation_prompt": True},
        {**body, "messages": HELLO, "continue_final_message": True},
    ):
        resp = httpx.post(url, json=bad, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "continue_final_message"

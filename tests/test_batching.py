"""Continuous batching through the real server: fidelity, seeds, aborts, queue limits."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
from transformers.utils.chat_template_utils import render_jinja_template

from tests.server import ServerProcess, stream_chat_text

MODEL = "hfserve-demo"
WORDS = "apple river stone cloud music paper green quiet window bright tiger ocean".split()


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    fixed = ["Hello!", "Tell me a joke", "Write a long story", "Count to five", "Who are you?"]
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(fixed[i % len(fixed)])
        else:  # mixed lengths, from a few words to a few hundred
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 9, 40, 150]))))
    return out


def _lone_generate(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """What a lone ``model.generate()`` gives for each prompt, decoded like the server does."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    template = (model_dir / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for p in prompts:
        (text,), _ = render_jinja_template(
            [[{"role": "user", "content": p}]], chat_template=template, add_generation_prompt=True
        )
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tok.decode(gen[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return out


def test_concurrent_greedy_equals_lone_generate(server: ServerProcess, demo_model: Path) -> None:
    prompts = _prompts(32, seed=3)
    expected = _lone_generate(demo_model, prompts, 40)

    async def run() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)

        async def one(i: int, prompt: str) -> str:
            if i >= 16:  # the second half arrives while the first is mid-generation
                await asyncio.sleep(0.05 * (i - 15))
            return await stream_chat_text(c, prompt, model=MODEL, temperature=0, max_tokens=40)

        try:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        finally:
            await c.close()

    got = asyncio.run(run())
    for prompt, want, have in zip(prompts, expected, got, strict=True):
        assert have == want, prompt[:40]


def _seeded(server: ServerProcess, seed: int) -> str:
    resp = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        timeout=120,
        json={
            "model": MODEL,
            # Far from the training corpus, so the next-token distribution is wide.
            "messages": [{"role": "user", "content": "zebra violin quantum marmalade"}],
            "temperature": 2.0,
            "top_k": 200,
            "seed": seed,
            "max_tokens": 30,
            "ignore_eos": True,
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


def test_seed_gives_same_text_alone_and_in_busy_batch(server: ServerProcess) -> None:
    alone = _seeded(server, 1234)

    async def busy() -> tuple[str, list[str]]:
        async with httpx.AsyncClient(timeout=120) as h:

            async def noise(i: int) -> str:
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"noise {i} " * (i + 1)}],
                    "temperature": 1.0,
                    "max_tokens": 60,
                    "ignore_eos": True,
                }
                r = await h.post(f"{server.base_url}/v1/chat/completions", json=body)
                return str(r.json()["choices"][0]["message"]["content"])

            tasks = [asyncio.create_task(noise(i)) for i in range(12)]
            await asyncio.sleep(0.1)
            same = await asyncio.to_thread(_seeded, server, 1234)
            return same, list(await asyncio.gather(*tasks))

    in_batch, _ = asyncio.run(busy())
    assert in_batch == alone
    assert len({_seeded(server, s) for s in (1, 2, 3)}) == 3


async def _read_stream(h: httpx.AsyncClient, url: str, chunks: list[int], i: int) -> None:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 1900,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a long story"}],
    }
    async with h.stream("POST", url, json=body) as resp:
        async for _ in resp.aiter_raw():
            chunks[i] += 1


def test_hundred_cut_streams_leave_nothing_running(server: ServerProcess) -> None:
    before = server.host_status()

    async def run() -> list[int]:
        chunks = [0] * 100
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=120, limits=limits) as h:
            url = f"{server.base_url}/v1/chat/completions"
            tasks = [asyncio.create_task(_read_stream(h, url, chunks, i)) for i in range(100)]
            # The cut waits until the host holds all 100 (a request cut before it reached the host
            # is not aborted there), then a moment more so that the running ones stream. It is a
            # timer, not a chunk's arrival: past its text the demo model streams only end-of-text
            # tokens (``ignore_eos``), which send no deltas.
            await asyncio.to_thread(
                server.wait_for, lambda s: s["running"] + s["waiting"] == 100, timeout_s=60
            )
            await asyncio.sleep(0.5)
            for task in tasks:
                task.cancel()  # closes the connection mid-stream
            await asyncio.gather(*tasks, return_exceptions=True)
        return chunks

    chunks = asyncio.run(run())
    # More than a batch (64 rows): some streams were cut mid-way, the others while waiting.
    assert any(n > 0 for n in chunks), chunks
    status = server.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0, timeout_s=30)
    # Every stream was cut long before its 1900 tokens: each one was aborted in the host.
    assert status["aborted_total"] - before["aborted_total"] == 100, status
    assert status["finished_total"] == before["finished_total"], status
    started = time.monotonic()
    reply = openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="x", max_retries=0
    ).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], temperature=0)
    assert reply.choices[0].message.content == "Hello! How can I help you today?"
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def small_server(cache_dir: Path, demo_model: Path) -> Any:
    args = ("--max-batch-size", "2", "--max-queue", "3", "--stream-interval-ms", "150")
    with ServerProcess.start(cache_dir, workers=2, args=args) as srv:
        yield srv


def test_over_max_queue_gets_429_at_once(small_server: ServerProcess) -> None:
    url = f"{small_server.base_url}/v1/chat/completions"

    async def one(h: httpx.AsyncClient, i: int) -> tuple[int, float, dict[str, Any], str | None]:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"request {i}"}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "temperature": 0,
        }
        started = time.monotonic()
        r = await h.post(url, json=body)
        return r.status_code, time.monotonic() - started, r.json(), r.headers.get("retry-after")

    async def run() -> list[tuple[int, float, dict[str, Any], str | None]]:
        async with httpx.AsyncClient(timeout=300) as h:
            return list(await asyncio.gather(*(one(h, i) for i in range(12))))

    results = asyncio.run(run())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 12
    assert len(ok) >= 5  # 2 running + 3 waiting were admitted
    assert refused, "nothing was refused over the queue limit"
    first_done = min(r[1] for r in ok)
    for _, elapsed, body, retry_after in refused:
        assert retry_after is not None and int(retry_after) >= 1
        assert body["error"]["code"] == "server_overloaded"
        assert elapsed < first_done  # refused before any admitted request could finish
    for _, _, body, _ in ok:
        assert body["usage"]["completion_tokens"] == 1500
        assert body["choices"][0]["finish_reason"] == "length"
    status = small_server.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert status["running"] == 0


def test_stream_interval_sends_the_same_tokens_in_fewer_chunks(small_server: ServerProcess) -> None:
    """With ``--stream-interval-ms``, a stream's tokens come several to a chunk: the same text and
    logprobs as the answer in one piece, a logprob entry per token, and the usage counts them all."""
    client = openai.OpenAI(base_url=f"{small_server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story"}],
        max_tokens=120,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    pieces = [
        c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
    ]
    entries = [e for p in pieces for e in p.logprobs.content]  # type: ignore[union-attr]
    assert "".join(p.delta.content or "" for p in pieces) == whole.choices[0].message.content
    assert [e.token for e in entries] == [e.token for e in whole.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(entries) == 120
    # The demo model makes a token in a few ms, so 150 ms hold many; the first and last go at once.
    assert len(pieces) <= len(entries) / 4, [len(p.logprobs.content) for p in pieces]  # type: ignore[union-attr]

"""Prefix caching: a prompt that starts like an earlier request is prefilled only from where it
differs, and the reply is the same as without the cache."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from model_host.prefix_cache import PrefixCache
from tests.server import ServerProcess

MODEL = "hfserve-demo"
SYSTEM = "You are a helpful assistant. " + " ".join(["Answer briefly and kindly."] * 30)


def kv(tokens: int, heads: int = 2, dim: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of KV whose values tell the positions apart."""
    pos = torch.arange(tokens, dtype=torch.float32)[None, None, :, None].expand(1, heads, tokens, dim)
    return [(pos.clone(), -pos.clone()) for _ in range(2)]


def test_longest_prefix_is_found_and_cut() -> None:
    cache = PrefixCache(capacity_bytes=1 << 20, min_tokens=4)
    cache.store("m", list(range(10)), kv(10))
    found = cache.match("m", [*range(8), 99, 100])
    assert found is not None
    n, layers = found
    assert n == 8 and layers[0][0].shape[2] == 8 and layers[0][0][0, 0, -1, 0] == 7
    # the whole prompt cached: its last token is still prefilled, for the next token's logits
    assert cache.match("m", list(range(10)))[0] == 9  # type: ignore[index]
    assert cache.match("m", [5, *range(9)]) is None  # differs from the first token
    assert cache.match("other", list(range(10))) is None  # another model's KV is never used
    assert cache.match("m", [0, 1, 2, 77, 78, 79]) is None  # too short a match to bother


def test_a_conversation_keeps_one_entry_and_the_budget_holds() -> None:
    cache = PrefixCache(capacity_bytes=1 << 20, min_tokens=4)
    cache.store("m", list(range(10)), kv(10))
    cache.store("m", list(range(20)), kv(20))  # the next turn extends the first
    assert len(cache) == 1
    cache.store("m", list(range(15)), kv(15))  # already inside the stored one
    assert len(cache) == 1 and cache.match("m", list(range(30)))[0] == 20  # type: ignore[index]

    one_entry = sum(k.numel() * 4 * 2 for k, _ in kv(10))
    small = PrefixCache(capacity_bytes=2 * one_entry, min_tokens=4)
    for first in (100, 200, 300):
        small.store("m", list(range(first, first + 10)), kv(10))
    assert len(small) == 2 and small.nbytes <= 2 * one_entry
    assert small.match("m", list(range(100, 110))) is None  # the oldest went first
    assert small.match("m", list(range(300, 312))) is not None


def test_conversations_sharing_a_system_prompt_each_find_their_own_turns() -> None:
    # Eight conversations start with the same system prompt (the same first tokens, the same
    # index head): each keeps an entry, and each next turn resumes from its own conversation.
    cache = PrefixCache(capacity_bytes=1 << 22, min_tokens=4)
    system = list(range(100, 140))
    turns = [[*system, 1000 + i, *range(2000 + 10 * i, 2006 + 10 * i)] for i in range(8)]
    for turn in turns:
        cache.store("m", turn, kv(len(turn)))
    assert len(cache) == 8
    for turn in turns:
        found = cache.match("m", [*turn, 7, 8, 9])
        assert found is not None and found[0] == len(turn)
    # a conversation's next turn replaces its own entry, and only its own
    cache.store("m", [*turns[3], 7, 8, 9], kv(len(turns[3]) + 3))
    assert len(cache) == 8
    assert cache.match("m", [*turns[3], 7, 8, 9, 10])[0] == len(turns[3]) + 3  # type: ignore[index]
    assert cache.match("m", [*turns[4], 7])[0] == len(turns[4])  # type: ignore[index]


# --- through the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    """The same model with the prefix cache off: the replies to expect."""
    with ServerProcess.start(cache_dir, workers=1, args=("--prefix-cache-mb", "0")) as srv:
        yield srv


def host(server: ServerProcess) -> dict[str, Any]:
    return server.host_status()


def chat(server: ServerProcess, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 30}
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_next_turn_reuses_the_conversation(server: ServerProcess, plain: ServerProcess) -> None:
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}]
    reply = chat(server, first)
    answer = reply["choices"][0]["message"]["content"]
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me a joke"}]
    before = host(server)
    cached = chat(server, second)
    after = host(server)
    # everything up to the first turn's reply was computed already
    assert after["cached_tokens_total"] - before["cached_tokens_total"] >= reply["usage"]["prompt_tokens"]
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == cached["usage"]["prompt_tokens"]
    # the reply's usage says so, as OpenAI's does
    details = cached["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == after["cached_tokens_total"] - before["cached_tokens_total"]
    fresh = chat(plain, second)
    assert host(plain)["cached_tokens_total"] == 0
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]


@pytest.mark.parametrize("echo_logprobs", [False, True])
def test_a_repeated_long_prompt_is_not_prefilled_again(server: ServerProcess, echo_logprobs: bool) -> None:
    # Longer than one step's prefill budget (256 tokens on CPU): without the cache it is chunked.
    prompt = SYSTEM + " " + " ".join(["The quick brown fox jumps over the lazy dog."] * 25)
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 12}
    url = f"{server.base_url}/v1/completions"
    first = httpx.post(url, json=body, timeout=120).json()
    assert first["usage"]["prompt_tokens"] > 256
    before = host(server)
    extra = {"echo": True, "logprobs": 1} if echo_logprobs else {}
    again = httpx.post(url, json={**body, **extra}, timeout=120).json()
    reused = host(server)["cached_tokens_total"] - before["cached_tokens_total"]
    if echo_logprobs:  # every prompt position's logits are needed: nothing is reused
        assert reused == 0
        assert again["choices"][0]["text"] == prompt + first["choices"][0]["text"]
    else:
        assert reused == first["usage"]["prompt_tokens"] - 1
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == reused
        assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_prompts_sharing_a_prefix_arrive_together(server: ServerProcess, plain: ServerProcess) -> None:
    # Each resumes from the cached system prompt on its own and joins the running batch.
    questions = ["Hello!", "Tell me a joke", "Who are you?", "Count to five", "What is 4 plus 5?"]
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions
    ]
    chat(server, conversations[0])  # the system prompt is in the cache now
    expected = [chat(plain, c)["choices"][0]["message"]["content"] for c in conversations]

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(messages: list[dict[str, str]]) -> str:
                body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 30}
                resp = await client.post(f"{server.base_url}/v1/chat/completions", json=body)
                return str(resp.json()["choices"][0]["message"]["content"])

            return list(await asyncio.gather(*(one(c) for c in conversations)))

    before = host(server)["cached_tokens_total"]
    got = asyncio.run(together())
    assert (
        host(server)["cached_tokens_total"] - before >= len(questions) * 100
    )  # the system prompt, each time
    assert got == expected

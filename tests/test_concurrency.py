"""Many concurrent streams over several workers: none lost, none mixed up."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import openai

from tests.server import ServerProcess, stream_chat_text

MODEL = "hfserve-demo"
PROMPTS = [
    "Hello!",
    "Hi",
    "Good morning",
    "How are you?",
    "Who are you?",
    "What is your name?",
    "Tell me a joke",
    "What color is the sky?",
    "Count to five",
    "Say something nice",
    "What is hfserve?",
    "Thank you",
    "Goodbye",
    "Write a long story",
    "Explain gravity",
    "random words: zebra violin",
]


def test_64_concurrent_streams_match_lone_greedy_results(server: ServerProcess) -> None:
    async def run() -> tuple[dict[str, str], list[tuple[str, str]], Counter[int]]:
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        lone = {}
        for p in PROMPTS:  # one at a time: the reference
            r = await c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": p}],
                temperature=0,
                max_tokens=48,
            )
            lone[p] = r.choices[0].message.content or ""

        async def stream(prompt: str) -> tuple[str, str]:
            return prompt, await stream_chat_text(c, prompt, model=MODEL, temperature=0, max_tokens=48)

        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
        results = await asyncio.gather(*(stream(p) for p in prompts))
        await c.close()
        # Which worker answers: each reports its index on /health (a new connection each time).
        workers = Counter(
            httpx.get(f"{server.base_url}/health", headers={"Connection": "close"}).json()["worker"]["index"]
            for _ in range(40)
        )
        return lone, results, workers

    lone, results, workers = asyncio.run(run())
    assert len(results) == 64
    for prompt, text in results:
        assert text == lone[prompt], prompt
    assert lone["Hello!"] == "Hello! How can I help you today?"
    # The kernel spreads connections over the workers sharing the port.
    assert len(workers) >= 2

"""Transcriptions and chat through a running server, for ``audio_bench.py``: the clips at a given
concurrency (each transcript checked against the expected text), a process keeping transcriptions
in flight, and chat streams' TTFT and inter-token latency with and without that load."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import httpx

from benchmarks.sse_client import stream_chat
from cli.bench import RequestResult, percentiles, summarize

DEMO = "hfserve-demo"
CONCURRENCY = 8
CHAT_PROMPTS = [f"Tell me about the number {i}." for i in range(CONCURRENCY)]


def mismatches(texts: list[str], expected: list[str]) -> list[dict[str, Any]]:
    return [
        {"clip": i, "got": got, "expected": want}
        for i, (got, want) in enumerate(zip(texts, expected, strict=True))
        if got.strip() != want
    ]


# -- transcriptions through a server ---------------------------------------------------------------
async def _transcribe(client: Any, model: str, i: int, wav: bytes) -> str:
    result = await client.audio.transcriptions.create(model=model, file=(f"{i}.wav", wav), language="en")
    return str(result.text)


async def transcribe_all(
    base_url: str, model: str, clips: list[bytes], concurrency: int, audio_s: float, expected: list[str]
) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", timeout=900, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[str, float]:
        async with gate:
            started = time.perf_counter()
            text = await _transcribe(client, model, i, clips[i])
            return text, time.perf_counter() - started

    started = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(len(clips))))
    wall_s = time.perf_counter() - started
    await client.close()
    texts = [t for t, _ in done]
    return {
        "concurrency": min(concurrency, len(clips)),
        "wall_s": wall_s,
        "audio_s_per_s": audio_s / wall_s,
        "latency_ms": percentiles([lat for _, lat in done]),
        "texts": texts,
        "mismatches": mismatches(texts, expected),
    }


def server_level(
    base_url: str, model: str, clips: list[bytes], audio_s: float, expected: list[str], concurrency: int
) -> dict[str, Any]:
    return asyncio.run(transcribe_all(base_url, model, clips, concurrency, audio_s, expected))


def _transcription_load(base_url: str, model: str, clips: list[bytes], stop: Any, out: Any) -> None:
    """Another process keeping ``CONCURRENCY`` transcriptions in flight until ``stop``, so that
    the chat client's chunk times are not taken between this load's responses."""
    from openai import AsyncOpenAI

    async def run() -> tuple[list[tuple[int, str]], float]:
        started = time.perf_counter()
        client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", timeout=900, max_retries=0)
        heard: list[tuple[int, str]] = []

        async def lane(k: int) -> None:
            i = k
            while not stop.is_set():
                heard.append((i % len(clips), await _transcribe(client, model, i, clips[i % len(clips)])))
                i += CONCURRENCY

        await asyncio.gather(*(lane(k) for k in range(CONCURRENCY)))
        return heard, time.perf_counter() - started

    out.put(asyncio.run(run()))


# -- chat ------------------------------------------------------------------------------------------
async def _chat(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[RequestResult, str]:
    body = {
        "model": DEMO,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = await stream_chat(client, url, body)
    return stream.request_result(), stream.text


def chat_rounds(base_url: str, rounds: int, tokens: int) -> dict[str, Any]:
    """``rounds`` times, 8 streams started together; the replies of the first round."""

    async def run() -> tuple[list[RequestResult], list[list[str]], float]:
        url = base_url + "/v1/chat/completions"
        results, texts = [], []
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
            started = time.perf_counter()
            for _ in range(rounds):
                done = await asyncio.gather(*(_chat(client, url, p, tokens) for p in CHAT_PROMPTS))
                results += [r for r, _ in done]
                texts.append([t for _, t in done])
            return results, texts, time.perf_counter() - started

    results, texts, wall_s = asyncio.run(run())
    summary = summarize(results, wall_s, CONCURRENCY, float("inf"))
    summary["texts"] = texts
    return summary


def chat_beside_transcriptions(
    base_url: str,
    model: str,
    clips: list[bytes],
    expected: list[str],
    audio: list[float],
    rounds: int,
    tokens: int,
) -> dict[str, Any]:
    alone = chat_rounds(base_url, rounds, tokens)
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    loader = ctx.Process(target=_transcription_load, args=(base_url, model, clips, stop, out), daemon=True)
    loader.start()
    heard: list[tuple[int, str]] = []
    load_s = 0.0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # all 8 transcriptions in the host before the chat starts
            host = httpx.get(base_url + "/health", timeout=5).json().get("host", {})
            if host.get("running", 0) + host.get("waiting", 0) >= CONCURRENCY:
                break
            time.sleep(0.1)
        started = time.perf_counter()
        together = chat_rounds(base_url, rounds, tokens)
        chat_s = time.perf_counter() - started
    finally:
        stop.set()
        heard, load_s = out.get(timeout=600)
        loader.join(60)
        if loader.is_alive():
            loader.kill()
    wrong = [{"clip": i, "got": t, "expected": expected[i]} for i, t in heard if t != expected[i]]
    reply_mismatches = [
        {"round": r, "stream": s, "got": got, "alone": alone["texts"][0][s]}
        for r, replies in enumerate(together["texts"] + alone["texts"])
        for s, got in enumerate(replies)
        if got != alone["texts"][0][s]
    ]
    return {
        "streams": CONCURRENCY,
        "output_tokens": tokens,
        "rounds": rounds,
        "chat_alone": alone,
        "chat_with_transcriptions": together,
        "chat_s_with_load": chat_s,
        "transcriptions_done_during_load": len(heard),
        "load_audio_s_per_s": sum(audio[i] for i, _ in heard) / load_s if load_s else 0.0,
        "transcript_mismatches": wrong,
        "chat_reply_mismatches": reply_mismatches,
    }

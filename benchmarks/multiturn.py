"""The multi-turn benchmark: conversations that share one long system prompt, run turn after turn,
all at once, streaming. What it shows is the prefix cache: a later turn's prompt is the earlier
turn's prompt and reply plus a short new message, so a server that keeps the conversation's KV
prefills only the new part, and its time to first token falls far below the first turn's."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from benchmarks.sse_client import stream_chat


async def _turn(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[float | None, str, str | None, dict[str, Any]]:
    """One streamed reply: (seconds to its first content, its text, an error or None, its usage)."""
    try:
        stream = await stream_chat(client, url, body)
    except httpx.HTTPError as exc:
        return None, "", f"{type(exc).__name__}: {exc}", {}
    if stream.error is not None:
        return None, "", stream.error, stream.usage
    return stream.ttft_s, stream.text, None, stream.usage


async def _conversations(
    base_url: str,
    model: str,
    system_prompt: str,
    user_turns: list[list[str]],
    max_tokens: int,
    ignore_eos: bool,
) -> tuple[list[list[float]], list[str], list[int], list[int]]:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=len(user_turns) + 4)
    ttfts: list[list[float]] = [[] for _ in user_turns[0]]  # per turn index, every conversation's
    errors: list[str] = []
    prompt_tokens = [0 for _ in user_turns[0]]  # per turn index, summed over conversations
    cached_tokens = [0 for _ in user_turns[0]]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def converse(turns: list[str]) -> None:
            messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}]
            for i, text in enumerate(turns):
                messages.append({"role": "user", "content": text})
                body: dict[str, Any] = {
                    "model": model,
                    "messages": messages,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                if ignore_eos:
                    body["ignore_eos"] = True
                ttft, reply, error, usage = await _turn(client, url, body)
                if error is not None or ttft is None:
                    errors.append(error or "no reply")
                    return
                ttfts[i].append(ttft)
                prompt_tokens[i] += int(usage.get("prompt_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                cached_tokens[i] += int(details.get("cached_tokens") or 0)
                messages.append({"role": "assistant", "content": reply})

        await asyncio.gather(*(converse(turns) for turns in user_turns))
    return ttfts, errors, prompt_tokens, cached_tokens


def run_multiturn(
    base_url: str,
    model: str,
    system_prompt: str,
    user_turns: list[list[str]],
    max_tokens: int,
    ignore_eos: bool = True,
) -> dict[str, Any]:
    """Run one conversation per entry of ``user_turns`` (its user messages, turn by turn), all at
    once; TTFT p50 of the first turn and of the later ones (milliseconds)."""
    started = time.perf_counter()
    ttfts, errors, prompt_tokens, cached_tokens = asyncio.run(
        _conversations(base_url, model, system_prompt, user_turns, max_tokens, ignore_eos)
    )
    later = [t for per_turn in ttfts[1:] for t in per_turn]
    return {
        "conversations": len(user_turns),
        "turns": len(user_turns[0]),
        "max_tokens": max_tokens,
        "seconds": time.perf_counter() - started,
        "errors": sorted(set(errors))[:5],
        "failed": len(errors),
        "ttft_ms_by_turn": [statistics.median(t) * 1000 if t else None for t in ttfts],
        # Servers that report no usage (or no cached tokens) leave these at 0.
        "prompt_tokens_by_turn": prompt_tokens,
        "cached_tokens_by_turn": cached_tokens,
        "turn1_ttft_p50_ms": statistics.median(ttfts[0]) * 1000 if ttfts[0] else None,
        "later_ttft_p50_ms": statistics.median(later) * 1000 if later else None,
    }

"""Server-sent events for chat completion chunks, built as plain dicts and serialized with orjson
on the hot path (no per-chunk pydantic models)."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
# Names the serving backend, as OpenAI's field does; changes when generation code changes.
SYSTEM_FINGERPRINT = "fp_hfserve_0_1"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChunkFactory:
    """Builds ``chat.completion.chunk`` payloads that share one id, timestamp and model."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self._base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        index: int = 0,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        lp = None if logprobs is None else {"content": logprobs, "refusal": None}
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        return {**self._base, "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base, "choices": [], "usage": usage}

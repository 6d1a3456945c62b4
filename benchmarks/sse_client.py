"""One streamed ``/v1/chat/completions`` request, read the way the benchmarks measure it: the time
each content delta arrives (for time to first token and inter-token latency), the reply's text and
the usage chunk. The benchmarks build their own request bodies; this only sends and reads one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from cli.bench import RequestResult


@dataclass
class ChatStream:
    """What one streamed reply gave; times are ``time.perf_counter()`` readings."""

    started_s: float
    end_s: float
    stamps_s: list[float] = field(default_factory=list)  # one per content delta, as it arrived
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # a non-200 status or an error chunk in the stream

    @property
    def ttft_s(self) -> float:
        """Seconds to the first content; a reply with none counts its whole time."""
        return (self.stamps_s[0] if self.stamps_s else self.end_s) - self.started_s

    def request_result(self) -> RequestResult:
        """The reply as ``hfserve bench`` records one; without a usage chunk it counts as failed."""
        if self.error is not None:
            return RequestResult(False, error=self.error)
        usage = self.usage
        return RequestResult(
            ok=bool(usage),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
            ttft_s=self.ttft_s,
            e2e_s=self.end_s - self.started_s,
            itl_s=[b - a for a, b in zip(self.stamps_s, self.stamps_s[1:], strict=False)],
            error="" if usage else "no usage",
        )


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> ChatStream:
    """POST ``body`` (which should ask for ``stream`` and, for token counts, ``include_usage``) and
    read its ``data:`` lines to the end. Transport errors (``httpx.HTTPError``) propagate."""
    started = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return ChatStream(started, time.perf_counter(), error=error)
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                return ChatStream(started, time.perf_counter(), error=str(chunk["error"]))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if content := (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
                    parts.append(content)
    return ChatStream(started, time.perf_counter(), stamps, "".join(parts), usage)

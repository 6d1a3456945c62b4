"""Benchmark speech to text on whisper-base, and chat latency beside it, in one run.

    python benchmarks/audio_bench.py [--quick] [--out-dir benchmarks]

On OpenAI's whisper-base (float32, CPU; ``model_host.whisper_build`` rebuilds it offline from two
PyPI packages) and English espeak-ng clips (two test sentences each, ~5 s; cached in hfserve's cache
folder), in one run:
1. in-process ``model.generate()`` (greedy, ``language="en"``) on the worker's own log-mel features
   of each clip, one clip at a time, then in batches of 8: audio seconds per wall second, and the
   greedy text each clip should get;
2. ``hfserve start --workers 2`` (the demo model; whisper-base loaded on demand by its folder, as
   the tests start it): the clips through the OpenAI SDK's ``audio.transcriptions.create`` with 1
   and 8 in flight, each transcript checked against (1);
3. ``transformers serve`` on the same folder (offline, no continuous batching: its transcription
   route refuses that mode) with 1 and 8 in flight, the same check;
4. on the hfserve server: 8 greedy chat streams to the demo model at a time (``ignore_eos``), alone
   and while another process keeps 8 transcriptions in flight; TTFT and inter-token latency (ITL)
   from streamed chunk times, and each reply checked against its reply without the load.
Writes ``audio_results.json`` and replaces (or appends) the "Speech to text" section of
``RESULTS.md`` in the output folder. ``--quick`` (4 one-sentence clips, one short chat round) is a
smoke check of the whole pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.audio_report import markdown, write_section  # noqa: E402
from benchmarks.run_benchmarks import free_port, start_server, stop_server  # noqa: E402
from cli.bench import RequestResult, percentiles, summarize  # noqa: E402
from model_host.ipc.system import cache_dir  # noqa: E402
from tests.speech_helpers import SENTENCES, Reference, espeak  # noqa: E402

DEMO = "hfserve-demo"
CONCURRENCY = 8
SAMPLE_RATE_HZ = 16_000
CHAT_PROMPTS = [f"Tell me about the number {i}." for i in range(CONCURRENCY)]


@dataclass(frozen=True)
class Plan:
    """How much one run measures (the full run, or ``--quick``)."""

    clips: int = 8
    sentences_per_clip: int = 2
    chat_tokens: int = 64
    chat_rounds: int = 3


QUICK = Plan(clips=4, sentences_per_clip=1, chat_tokens=16, chat_rounds=1)


# -- clips -----------------------------------------------------------------------------------------
def clip_texts(plan: Plan) -> list[str]:
    """Clip i says sentences i, i+1, ... (wrapping), so every clip differs."""
    n = len(SENTENCES)
    return [
        " ".join(SENTENCES[(i + k) % n] for k in range(plan.sentences_per_clip)) for i in range(plan.clips)
    ]


def make_clips(texts: list[str]) -> list[bytes]:
    """espeak-ng WAVs of ``texts``, cached by text (espeak-ng is deterministic for one version)."""
    folder = cache_dir() / "audio-bench-clips"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for text in texts:
        path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.wav"
        out.append(path.read_bytes() if path.is_file() else espeak(text, "en", path))
    return out


def duration_s(wav: bytes) -> float:
    from sanic_serve.audio.decode import decode_audio

    return len(decode_audio(wav, max_duration_s=60)) / SAMPLE_RATE_HZ


# -- in process ------------------------------------------------------------------------------------
def reference(folder: Path, clips: list[bytes], audio_s: float) -> dict[str, Any]:
    """``generate()`` on the worker's features of each clip: one at a time, then batches of 8.
    Feature time is measured apart (the server's requests pay it in the worker)."""
    import torch

    ref = Reference(folder)
    started = time.perf_counter()
    features = [ref.features(wav) for wav in clips]
    features_s = time.perf_counter() - started
    assert all(f.shape[0] == 1 for f, _ in features), "a clip longer than one 30 s window"
    model, decode = ref.model, ref.processor.batch_decode

    def run(at: int, count: int) -> list[str]:
        feats = torch.cat([f for f, _ in features[at : at + count]])
        mask = torch.cat([m for _, m in features[at : at + count]])
        with torch.inference_mode():
            ids = model.generate(feats, attention_mask=mask, language="en")
        return [str(t).strip() for t in decode(ids.tolist(), skip_special_tokens=True)]

    run(0, 1)  # warm-up (first-call allocations), not counted
    encoder = model.get_encoder()

    def encode_s(count: int) -> float:
        feats = torch.cat([f for f, _ in features[:count]])
        started = time.perf_counter()
        with torch.inference_mode():
            encoder(feats)
        return time.perf_counter() - started

    # The encoder alone (what every clip pays for its whole 30 s window, however short the clip):
    # the rest of generate()'s time is the decoder's prompt and steps.
    encoder_one_s = statistics.median(encode_s(1) for _ in range(3))
    encoder_batch_s = encode_s(min(CONCURRENCY, len(clips)))
    started = time.perf_counter()
    alone = [run(i, 1)[0] for i in range(len(clips))]
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    batched = [t for at in range(0, len(clips), CONCURRENCY) for t in run(at, CONCURRENCY)]
    batched_s = time.perf_counter() - started
    return {
        "features_s": features_s,
        "one_by_one": {
            "wall_s": alone_s,
            "audio_s_per_s": audio_s / alone_s,
            "encoder_pass_s": encoder_one_s,
            "encoder_share": encoder_one_s * len(clips) / alone_s,
        },
        "batched": {
            "batch": min(CONCURRENCY, len(clips)),
            "wall_s": batched_s,
            "audio_s_per_s": audio_s / batched_s,
            "encoder_pass_s": encoder_batch_s,
            "encoder_share": encoder_batch_s * -(-len(clips) // CONCURRENCY) / batched_s,
            "mismatches": mismatches(batched, alone),
        },
        "texts": alone,
    }


def before_and_after(before: dict[str, Any], after: dict[str, Any], audio_s: float) -> dict[str, Any]:
    """The reference measured before the servers and again after them: a shared machine drifts by
    tens of percent within minutes, so the mean of the two is what the servers are compared with."""
    out = dict(before, after_mismatches=mismatches(after["texts"], before["texts"]))
    for key in ("one_by_one", "batched"):
        runs = [before[key]["wall_s"], after[key]["wall_s"]]
        out[key] = dict(before[key], wall_s=statistics.fmean(runs), wall_s_runs=runs)
        out[key]["audio_s_per_s"] = audio_s / out[key]["wall_s"]
        out[key]["audio_s_per_s_runs"] = [audio_s / w for w in runs]
    return out


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


def server_levels(
    base_url: str, model: str, clips: list[bytes], audio_s: float, expected: list[str]
) -> dict[str, Any]:
    asyncio.run(transcribe_all(base_url, model, clips[:1], 1, audio_s, expected[:1]))  # load, warm-up
    return {
        f"c{c}": asyncio.run(transcribe_all(base_url, model, clips, c, audio_s, expected))
        for c in (1, CONCURRENCY)
    }


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
    started = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            return RequestResult(False, error=f"HTTP {resp.status_code}"), ""
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if content := (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
                    parts.append(content)
    end = time.perf_counter()
    result = RequestResult(
        ok=bool(usage),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=int(usage.get("completion_tokens", 0)),
        ttft_s=(stamps[0] if stamps else end) - started,
        e2e_s=end - started,
        itl_s=[b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        error="" if usage else "no usage",
    )
    return result, "".join(parts)


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
    base_url: str, model: str, clips: list[bytes], plan: Plan, expected: list[str], audio: list[float]
) -> dict[str, Any]:
    alone = chat_rounds(base_url, plan.chat_rounds, plan.chat_tokens)
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
        together = chat_rounds(base_url, plan.chat_rounds, plan.chat_tokens)
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
        "output_tokens": plan.chat_tokens,
        "rounds": plan.chat_rounds,
        "chat_alone": alone,
        "chat_with_transcriptions": together,
        "chat_s_with_load": chat_s,
        "transcriptions_done_during_load": len(heard),
        "load_audio_s_per_s": sum(audio[i] for i, _ in heard) / load_s if load_s else 0.0,
        "transcript_mismatches": wrong,
        "chat_reply_mismatches": reply_mismatches,
    }


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks that stop the servers


def _script(name: str) -> str:
    import shutil

    here = os.path.dirname(sys.executable)  # this environment's scripts, activated or not
    return shutil.which(name, path=here) or shutil.which(name) or name


def peer_levels(
    folder: Path, clips: list[bytes], audio_s: float, expected: list[str], logs: Path
) -> dict[str, Any]:
    """``transformers serve`` on the same folder, or why it could not be measured."""
    port = free_port()
    cmd = [_script("transformers"), "serve", "--port", str(port), "--device", "cpu"]
    try:
        proc = start_server(cmd, port, logs / "transformers-serve.log", "/health")
    except (RuntimeError, TimeoutError) as exc:
        tail = (logs / "transformers-serve.log").read_text(errors="replace")[-400:]
        return {"error": f"{exc}: {tail}"}
    try:
        # It keeps the leading space of Whisper's text; compared without it.
        runs = server_levels(f"http://127.0.0.1:{port}", str(folder), clips, audio_s, expected)
    except Exception as exc:  # the peer's failure is a finding to report, not a crash of the run
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    finally:
        stop_server(proc)
    return runs


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--quick", action="store_true", help="4 one-sentence clips, one short chat round")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    plan = QUICK if args.quick else Plan()
    command = "python benchmarks/audio_bench.py" + (" --quick" if args.quick else "")
    started = time.monotonic()
    from model_host.whisper_build import whisper_base

    folder = whisper_base()
    clips = make_clips(clip_texts(plan))
    audio = [duration_s(wav) for wav in clips]
    audio_s = sum(audio)
    logs = Path(tempfile.mkdtemp(prefix="hfserve-audio-bench-"))

    ref = reference(folder, clips, audio_s)
    expected = ref["texts"]
    print(f"generate(): {ref['one_by_one']['audio_s_per_s']:.2f} audio s/s one by one, "
          f"{ref['batched']['audio_s_per_s']:.2f} batched", flush=True)  # fmt: skip

    port = free_port()
    cmd = [_script("hfserve"), "start", "--workers", "2", "--port", str(port)]
    proc = start_server(cmd, port, logs / "hfserve.log", "/health")
    try:
        base = f"http://127.0.0.1:{port}"
        hf = server_levels(base, str(folder), clips, audio_s, expected)
        print(f"hfserve: {hf['c1']['audio_s_per_s']:.2f} audio s/s at c=1, "
              f"{hf['c8']['audio_s_per_s']:.2f} at c=8", flush=True)  # fmt: skip
        chat_rounds(base, 1, 8)  # warm-up
        mixed = chat_beside_transcriptions(base, str(folder), clips, plan, expected, audio)
    finally:
        stop_server(proc)
    itl = [mixed[k]["itl_ms"]["p99"] for k in ("chat_alone", "chat_with_transcriptions")]
    print(f"chat ITL p99: {itl[0]:.0f} ms alone, {itl[1]:.0f} ms with transcriptions", flush=True)
    peer = peer_levels(folder, clips, audio_s, expected, logs)
    ref = before_and_after(ref, reference(folder, clips, audio_s), audio_s)

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "plan": asdict(plan),
        "clips": {
            "count": len(clips),
            "sentences_per_clip": plan.sentences_per_clip,
            "audio_s": audio_s,
            "min_s": min(audio),
            "max_s": max(audio),
            "durations_s": audio,
        },
        "reference": ref,
        "hfserve": hf,
        "mixed": mixed,
        "transformers_serve": peer,
        "minutes": (time.monotonic() - started) / 60,
    }
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "audio_results.json").write_text(json.dumps(results, indent=2))
    section = markdown(results)
    write_section(out / "RESULTS.md", section)
    print(section)


if __name__ == "__main__":
    main()

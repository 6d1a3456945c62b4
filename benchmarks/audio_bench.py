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
   route refuses that mode) with 1 and 8 in flight, the same check (both servers run at once, idle
   in turn, their runs interleaved so that the machine's drift favours neither);
4. on the hfserve server: 8 greedy chat streams to the demo model at a time (``ignore_eos``), alone
   and while another process keeps 8 transcriptions in flight; TTFT and inter-token latency (ITL)
   from streamed chunk times, and each reply checked against its reply without the load.
Writes ``audio_results.json`` and replaces (or appends) the "Speech to text" section of
``RESULTS.md`` in the output folder. ``--quick`` (4 one-sentence clips, one short chat round) is a
smoke check of the whole pipeline. The reference runs before the servers and again after them.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.audio_report import markdown, write_section  # noqa: E402
from benchmarks.audio_serving import (  # noqa: E402
    CONCURRENCY,
    chat_beside_transcriptions,
    chat_rounds,
    guarded,
    mismatches,
    server_level,
)
from benchmarks.run_benchmarks import free_port, start_server, stop_server  # noqa: E402
from model_host.ipc.system import cache_dir  # noqa: E402
from tests.speech_helpers import SENTENCES, Reference, espeak  # noqa: E402

SAMPLE_RATE_HZ = 16_000


@dataclass(frozen=True)
class Plan:
    """How much one run measures (the full run, or ``--quick``)."""

    clips: int = 8
    sentences_per_clip: int = 2
    chat_tokens: int = 32
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
def reference(folder: Path, clips: list[bytes], audio_s: float, split: bool = True) -> dict[str, Any]:
    """``generate()`` on the worker's features of each clip: one at a time, then batches of 8.
    Feature time is measured apart (the server's requests pay it in the worker). With ``split``,
    the encoder is also timed alone, to say how generate()'s time divides."""
    import torch

    ref = Reference(folder)
    started = time.perf_counter()
    features = [ref.features(wav) for wav in clips]
    features_s = time.perf_counter() - started
    assert all(f.shape[0] == 1 for f, _ in features), "a clip longer than one 30 s window"
    model, decode = ref.model, ref.processor.batch_decode

    positions = [0]  # decoder positions of the batches run (their longest row, prompt included)

    def run(at: int, count: int) -> list[str]:
        feats = torch.cat([f for f, _ in features[at : at + count]])
        mask = torch.cat([m for _, m in features[at : at + count]])
        with torch.inference_mode():
            ids = model.generate(feats, attention_mask=mask, language="en")
        positions[0] += ids.shape[1]
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
    encoder_one_s = statistics.median(encode_s(1) for _ in range(3)) if split else 0.0
    encoder_batch_s = encode_s(min(CONCURRENCY, len(clips))) if split else 0.0
    started = time.perf_counter()
    alone = [run(i, 1)[0] for i in range(len(clips))]
    alone_s = time.perf_counter() - started
    positions[0] = 0
    batches = -(-len(clips) // CONCURRENCY)
    started = time.perf_counter()
    batched = [t for at in range(0, len(clips), CONCURRENCY) for t in run(at, CONCURRENCY)]
    batched_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "encoder_layers": int(model.config.encoder_layers),
        "features_s": features_s,
        "one_by_one": {"wall_s": alone_s, "audio_s_per_s": audio_s / alone_s},
        "batched": {
            "batch": min(CONCURRENCY, len(clips)),
            "wall_s": batched_s,
            "audio_s_per_s": audio_s / batched_s,
            "mismatches": mismatches(batched, alone),
        },
        "texts": alone,
    }
    if split:
        out["one_by_one"].update(
            encoder_pass_s=encoder_one_s, encoder_share=encoder_one_s * len(clips) / alone_s
        )
        out["batched"].update(
            encoder_pass_s=encoder_batch_s,
            encoder_share=encoder_batch_s * batches / batched_s,
            decoder_positions=positions[0],
            # the rest of the batched run over its decoder positions: about one decoder step of the batch
            decoder_step_s=(batched_s - encoder_batch_s * batches) / positions[0],
        )
    return out


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


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks that stop the servers


def _script(name: str) -> str:
    import shutil

    here = os.path.dirname(sys.executable)  # this environment's scripts, activated or not
    return shutil.which(name, path=here) or shutil.which(name) or name


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

    # Both servers up at once (the idle one costs next to nothing) and their runs interleaved
    # (hfserve c=1, peer c=1, peer c=8, hfserve c=8), so that a drift of the shared machine's speed
    # favours neither; the in-process reference runs before and after them.
    hf_port, peer_port = free_port(), free_port()
    hf_cmd = [_script("hfserve"), "start", "--workers", "2", "--port", str(hf_port)]
    peer_cmd = [_script("transformers"), "serve", "--port", str(peer_port), "--device", "cpu"]
    procs = [start_server(hf_cmd, hf_port, logs / "hfserve.log", "/health")]
    peer: dict[str, Any] = {}
    try:
        try:
            procs.append(start_server(peer_cmd, peer_port, logs / "transformers-serve.log", "/health"))
        except (RuntimeError, TimeoutError) as exc:
            tail = (logs / "transformers-serve.log").read_text(errors="replace")[-400:]
            peer["error"] = f"{exc}: {tail}"
        hf_base, peer_base = f"http://127.0.0.1:{hf_port}", f"http://127.0.0.1:{peer_port}"
        model = str(folder)
        level = functools.partial(server_level, model=model, clips=clips, audio_s=audio_s, expected=expected)
        server_level(hf_base, model, clips[:1], audio_s, expected[:1], 1)  # loads the model; warm-up
        guarded(peer, "warm-up", lambda: server_level(peer_base, model, clips[:1], audio_s, expected[:1], 1))
        peer.pop("warm-up", None)
        hf = {"c1": level(hf_base, concurrency=1)}
        guarded(peer, "c1", lambda: level(peer_base, concurrency=1))
        guarded(peer, "c8", lambda: level(peer_base, concurrency=CONCURRENCY))
        hf["c8"] = level(hf_base, concurrency=CONCURRENCY)
        for name, runs in (("hfserve", hf), ("transformers serve", peer)):
            if "error" in runs:
                print(f"{name}: {runs['error']}", flush=True)
                continue
            c1, c8 = runs["c1"]["audio_s_per_s"], runs["c8"]["audio_s_per_s"]
            print(f"{name}: {c1:.2f} audio s/s at c=1, {c8:.2f} at c=8", flush=True)
        chat_rounds(hf_base, 1, 8)  # warm-up
        mixed = chat_beside_transcriptions(
            hf_base, model, clips, expected, audio, plan.chat_rounds, plan.chat_tokens
        )
    finally:
        for proc in procs:
            stop_server(proc)
    itl = [mixed[k]["itl_ms"]["p99"] for k in ("chat_alone", "chat_with_transcriptions")]
    print(f"chat ITL p99: {itl[0]:.0f} ms alone, {itl[1]:.0f} ms with transcriptions", flush=True)
    ref = before_and_after(ref, reference(folder, clips, audio_s, split=False), audio_s)

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

"""Benchmark speech to text on whisper-base, and chat latency beside it, in one run.

    python benchmarks/audio_bench.py [--quick] [--out-dir benchmarks]

On OpenAI's whisper-base (float32, CPU; ``model_host.whisper_build`` rebuilds it offline from two
PyPI packages) and English espeak-ng clips (two test sentences each, ~5 s; cached in hfserve's cache
folder), in one run:
1. in-process ``model.generate()`` (greedy, ``language="en"``) on the worker's own log-mel features
   of each clip: how its time divides between the encoder and the decoder, measured first;
2. ``hfserve start --workers 2`` (the demo model; whisper-base loaded on demand by its folder, as
   the tests start it) and ``transformers serve`` (offline, no continuous batching: its
   transcription route refuses that mode), both up at once, whisper-base through the OpenAI SDK's
   ``audio.transcriptions.create``;
3. one at a time: clip by clip, ``generate()``, hfserve and transformers serve in turn (the order
   rotating); all at once: ``generate()`` in batches of 8 and each server with 8 in flight, in
   turn, the order reversed every other round. Audio seconds per wall second; every transcript
   checked against one-at-a-time ``generate()``'s;
4. on the hfserve server: 8 greedy chat streams to the demo model at a time (``ignore_eos``), alone
   and while another process keeps 8 transcriptions in flight; TTFT and inter-token latency (ITL)
   from streamed chunk times, and each reply checked against its reply without the load.
Writes ``audio_results.json`` and replaces (or appends) the "Speech to text" section of
``RESULTS.md`` in the output folder. ``--quick`` (4 one-sentence clips, one short chat round) is a
smoke check of the whole pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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
    mismatches,
    server_level,
)
from benchmarks.run_benchmarks import free_port, start_server, stop_server  # noqa: E402
from cli.bench import percentiles  # noqa: E402
from model_host.ipc.system import cache_dir  # noqa: E402
from tests.speech_helpers import SENTENCES, Reference, espeak  # noqa: E402

SAMPLE_RATE_HZ = 16_000
PEER = "transformers serve"


@dataclass(frozen=True)
class Plan:
    """How much one run measures (the full run, or ``--quick``)."""

    clips: int = 8
    sentences_per_clip: int = 2
    chat_tokens: int = 32
    chat_rounds: int = 3
    rounds: int = 2  # of the all-at-once runs


QUICK = Plan(clips=4, sentences_per_clip=1, chat_tokens=16, chat_rounds=1, rounds=1)


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
class InProcess:
    """whisper-base in this process on the worker's own features of each clip (their time is
    measured apart: the server's requests pay it in the worker), greedy ``generate()``."""

    def __init__(self, folder: Path, clips: list[bytes]) -> None:
        ref = Reference(folder)
        started = time.perf_counter()
        self.features = [ref.features(wav) for wav in clips]
        self.features_s = time.perf_counter() - started
        assert all(f.shape[0] == 1 for f, _ in self.features), "a clip longer than one 30 s window"
        self.model, self._decode = ref.model, ref.processor.batch_decode
        self.positions = 0  # decoder positions run (each batch's longest row)

    def run(self, indices: list[int]) -> list[str]:
        import torch

        feats = torch.cat([self.features[i][0] for i in indices])
        mask = torch.cat([self.features[i][1] for i in indices])
        with torch.inference_mode():
            ids = self.model.generate(feats, attention_mask=mask, language="en")
        self.positions += ids.shape[1]
        return [str(t).strip() for t in self._decode(ids.tolist(), skip_special_tokens=True)]

    def batches(self) -> list[str]:
        n = len(self.features)
        return [
            t for at in range(0, n, CONCURRENCY) for t in self.run(list(range(at, min(n, at + CONCURRENCY))))
        ]

    def split(self) -> dict[str, Any]:
        """How ``generate()``'s time divides, measured before any server starts: the encoder alone
        (what every clip pays for its whole 30 s window, however short) against whole runs."""
        import torch

        self.run([0])  # warm-up (first-call allocations), not counted
        encoder, n = self.model.get_encoder(), len(self.features)

        def timed(fn: Callable[[], Any]) -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                fn()
            return time.perf_counter() - started

        batch = list(range(min(CONCURRENCY, n)))
        feats = torch.cat([self.features[i][0] for i in batch])
        times: dict[str, list[float]] = {"enc1": [], "gen1": [], "enc8": [], "gen8": []}
        for _ in range(3):  # interleaved, medians: the machine's speed moves within seconds
            times["enc1"].append(timed(lambda: encoder(self.features[0][0])))
            times["gen1"].append(timed(lambda: self.run([0])))
            times["enc8"].append(timed(lambda: encoder(feats)))
            self.positions = 0
            times["gen8"].append(timed(lambda: self.run(batch)))
        enc1, gen1, enc8, gen8 = (statistics.median(times[k]) for k in ("enc1", "gen1", "enc8", "gen8"))
        return {
            "encoder_layers": int(self.model.config.encoder_layers),
            "features_s_per_clip": self.features_s / n,
            "times_s": times,
            "encoder_pass_one_s": enc1,
            "generate_one_s": gen1,
            "encoder_share_one": enc1 / gen1,
            "batch": len(batch),
            "encoder_pass_batch_s": enc8,
            "generate_batch_s": gen8,
            "encoder_share_batched": enc8 / gen8,
            "decoder_positions": self.positions,
            # the rest of the batched run over its decoder positions: about one decoder step of the batch
            "decoder_step_s": (gen8 - enc8) / self.positions,
        }


# -- interleaved runs ------------------------------------------------------------------------------
def _add(runs: dict[str, dict[str, Any]], name: str, seconds: float) -> None:
    runs.setdefault(name, {"wall_s": 0.0, "wall_s_runs": []})
    runs[name]["wall_s"] += seconds
    runs[name]["wall_s_runs"].append(seconds)


def one_at_a_time(
    runners: dict[str, Callable[[int], str]], n: int, errors: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Clip by clip, each runner in turn (the order rotating by clip), so that a drift of the
    shared machine's speed, which moves by several times within minutes here, favours none."""
    runs: dict[str, dict[str, Any]] = {}
    texts: dict[str, list[str]] = {name: [] for name in runners}
    for i in range(n):
        names = [name for name in runners if name not in errors]
        for name in names[i % len(names) :] + names[: i % len(names)]:
            started = time.perf_counter()
            try:
                texts[name].append(runners[name](i))
            except Exception as exc:  # the peer's failure is a finding to report, not a crash
                errors[name] = f"{type(exc).__name__}: {str(exc)[:400]}"
                continue
            _add(runs, name, time.perf_counter() - started)
    for name, run in runs.items():
        run.update(texts=texts[name], latency_ms=percentiles(run["wall_s_runs"]), concurrency=1)
    return {name: run for name, run in runs.items() if name not in errors}


def together(
    runners: dict[str, Callable[[], list[str]]], rounds: int, errors: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """All clips at once (``generate()`` in batches of 8, the servers 8 in flight), ``rounds``
    times, the runners' order reversed every other round."""
    runs: dict[str, dict[str, Any]] = {}
    texts: dict[str, list[str]] = {}
    for r in range(rounds):
        names = [name for name in runners if name not in errors]
        for name in names if r % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            try:
                texts.setdefault(name, runners[name]())
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc)[:400]}"
                continue
            _add(runs, name, time.perf_counter() - started)
    for name, run in runs.items():
        run.update(texts=texts[name], concurrency=CONCURRENCY)
    return {name: run for name, run in runs.items() if name not in errors}


def transcriber(base_url: str, model: str, clips: list[bytes]) -> Callable[[int], str]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=900, max_retries=0)

    def one(i: int) -> str:
        return str(
            client.audio.transcriptions.create(model=model, file=(f"{i}.wav", clips[i]), language="en").text
        )

    return one


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

    local = InProcess(folder, clips)
    split = local.split()
    print(f"generate(): encoder {split['encoder_share_one']:.0%} of one clip's run", flush=True)

    # Both servers up at once (an idle one costs next to nothing) and every measurement interleaved
    # with the others (see one_at_a_time): the shared machine's speed moves too much for runs made
    # minutes apart to be compared.
    hf_port, peer_port = free_port(), free_port()
    hf_cmd = [_script("hfserve"), "start", "--workers", "2", "--port", str(hf_port)]
    peer_cmd = [_script("transformers"), "serve", "--port", str(peer_port), "--device", "cpu"]
    procs = [start_server(hf_cmd, hf_port, logs / "hfserve.log", "/health")]
    errors: dict[str, str] = {}
    try:
        try:
            procs.append(start_server(peer_cmd, peer_port, logs / "transformers-serve.log", "/health"))
        except (RuntimeError, TimeoutError) as exc:
            tail = (logs / "transformers-serve.log").read_text(errors="replace")[-400:]
            errors[PEER] = f"{exc}: {tail}"
        hf_base, peer_base = f"http://127.0.0.1:{hf_port}", f"http://127.0.0.1:{peer_port}"
        model = str(folder)
        singles = {
            "generate": lambda i: local.run([i])[0],
            "hfserve": transcriber(hf_base, model, clips),
            PEER: transcriber(peer_base, model, clips),
        }
        for name in ("hfserve", PEER):  # load the model; warm-up
            if name not in errors:
                one_at_a_time({name: singles[name]}, 1, errors)
        c1 = one_at_a_time(singles, len(clips), errors)
        expected = c1["generate"]["texts"]

        def served(base: str) -> Callable[[], list[str]]:
            return lambda: server_level(base, model, clips, audio_s, expected, CONCURRENCY)["texts"]

        all_at_once = {"generate": local.batches, "hfserve": served(hf_base), PEER: served(peer_base)}
        c8 = together(all_at_once, plan.rounds, errors)
        for level in (c1, c8):
            for name, run in level.items():
                run.update(
                    audio_s_per_s=audio_s * len(run["wall_s_runs"]) / run["wall_s"]
                    if level is c8
                    else audio_s / run["wall_s"],
                    mismatches=mismatches(run["texts"], expected),
                )
                print(f"{name} c={run['concurrency']}: {run['audio_s_per_s']:.2f} audio s/s", flush=True)
        chat_rounds(hf_base, 1, 8)  # warm-up
        mixed = chat_beside_transcriptions(
            hf_base, model, clips, expected, audio, plan.chat_rounds, plan.chat_tokens
        )
    finally:
        for proc in procs:
            stop_server(proc)
    itl = [mixed[k]["itl_ms"]["p99"] for k in ("chat_alone", "chat_with_transcriptions")]
    print(f"chat ITL p99: {itl[0]:.0f} ms alone, {itl[1]:.0f} ms with transcriptions", flush=True)

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
        "split": split,
        "c1": c1,
        "c8": c8,
        "errors": errors,
        "mixed": mixed,
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

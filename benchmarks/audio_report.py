"""The "Speech to text" section of RESULTS.md from ``audio_bench.py``'s results (and replacing only
that section of the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADING = "# Speech to text: whisper-base beside generate() and transformers serve"
LABELS = {
    "generate": "in-process `generate()`",
    "hfserve": "hfserve",
    "transformers serve": "`transformers serve`",
}


def _row(name: str, run: dict[str, Any], n: int, batch: int) -> str:
    how = (
        ("one clip at a time" if run["concurrency"] == 1 else f"batches of {batch}")
        if name == "generate"
        else f"{min(run['concurrency'], n)} in flight"
    )
    p50 = f"{run['latency_ms']['p50']:.0f}" if "latency_ms" in run else ""
    equal = (
        "(the reference)"
        if name == "generate" and run["concurrency"] == 1
        else f"{n - len(run['mismatches'])}/{n}"
    )
    runs = (
        ", ".join(f"{w:.1f}" for w in run["wall_s_runs"])
        if run["concurrency"] > 1
        else f"{run['wall_s']:.1f}"
    )
    return f"| {LABELS[name]}, {how} | {run['audio_s_per_s']:.2f} | {runs} | {p50} | {equal} |"


def _step(split: dict[str, Any]) -> str:
    step_s = split["decoder_step_s"]
    return f"~{step_s * 1000:.0f} ms" if step_s > 0 else "not measurable in this run (noise)"


def markdown(results: dict[str, Any]) -> str:
    clips, n, split, mixed = results["clips"], results["clips"]["count"], results["split"], results["mixed"]
    c1, c8, errors = results["c1"], results["c8"], results["errors"]
    rounds = results["plan"]["rounds"]
    lines = [
        HEADING,
        "",
        f"Machine: {results['machine']}; whisper-base in float32 on CPU; produced by "
        f"`{results['command']}` ({results['date']}, {results['minutes']:.1f} min). {n} English "
        f"espeak-ng clips of {clips['sentences_per_clip']} test sentence(s) each, "
        f"{clips['audio_s']:.1f} s of audio in all ({clips['min_s']:.1f}-{clips['max_s']:.1f} s each); "
        'every request `language="en"`, greedy. Throughput is audio seconds per wall second. One at a '
        "time, the clips go through each of the three in turn, clip by clip (the order rotating); all "
        f"at once, each of the three takes all clips in turn, {rounds} round(s), the order reversed "
        "every other round: the shared machine's speed moves by several times within minutes, so only "
        'runs interleaved like this compare. "Equal" counts transcripts identical to in-process greedy '
        "`generate()` one clip at a time.",
        "",
        "| run | audio s / wall s | wall s (per round) | request p50 ms | transcripts equal |",
        "|---|---|---|---|---|",
    ]
    for level in (c1, c8):
        lines += [_row(name, level[name], n, split["batch"]) for name in LABELS if name in level]
    lines.append("")
    ratios = "hfserve was not measured."
    if "hfserve" in c1 and "hfserve" in c8:
        ratio_1 = c1["hfserve"]["audio_s_per_s"] / c1["generate"]["audio_s_per_s"]
        ratio_8 = c8["hfserve"]["audio_s_per_s"] / c8["generate"]["audio_s_per_s"]
        ratios = (
            f"**hfserve / generate(): {ratio_1:.2f}x one at a time, {ratio_8:.2f}x with {min(8, n)} in "
            f"flight (against batches of {split['batch']}).**"
        )
    lines.append(
        f"{ratios} The in-process times leave out the log-mel features "
        f"({split['features_s_per_clip'] * 1000:.0f} ms a clip), which the server's requests pay in the "
        "worker with the upload and the WAV decoding. Where `generate()`'s time goes (before the "
        "servers started; the encoder alone and whole `generate()` runs interleaved, medians of 3): one "
        f"encoder pass takes {split['encoder_pass_one_s']:.2f} s of {split['generate_one_s']:.2f} s for clip "
        f"0 alone ({split['encoder_share_one']:.0%}) and {split['encoder_pass_batch_s']:.2f} s of "
        f"{split['generate_batch_s']:.2f} s for a batch of {split['batch']} "
        f"({split['encoder_share_batched']:.0%}); the rest is the decoder's prompt and steps "
        f"({split['decoder_positions']} positions in the batch: {_step(split)} per step). Every clip is "
        "padded to Whisper's 30 s window, so the encoder costs the same for a "
        "3 s clip as for a 30 s one, and audio s / wall s grows with clip length. On a CPU the server's "
        "runner encodes one window per pass (the 256-token prefill budget is under a window's 1,500), "
        "one layer per loop step, so 8 clips' windows are encoded one after another, each step also "
        "running the decoder step of the rows already decoding; `generate()`'s batch encodes the 8 "
        "windows in one pass, then decodes them together."
    )
    for name, error in errors.items():
        lines += ["", f"{LABELS[name]} could not be measured (or not to the end): {error}"]
    checked = [(f"{LABELS[name]} c={level[name]['concurrency']}", level[name]["mismatches"])
               for level in (c1, c8) for name in level]  # fmt: skip
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
    for label, run in (("alone", alone), (f"with {mixed['streams']} transcriptions in flight", loaded)):
        lines.append(
            f"| {label} | {run['output_throughput']:.0f} | {run['ttft_ms']['p50']:.0f} | "
            f"{run['ttft_ms']['p99']:.0f} | {run['itl_ms']['p50']:.1f} | {run['itl_ms']['p99']:.1f} |"
        )
    stage_s = split["encoder_pass_batch_s"] / split["batch"] / split["encoder_layers"]
    lines += [
        "",
        "Under the load, each step of the host's loop also carries the speech runner's share: on a CPU "
        "one encoder stage (a layer of one window; a pass of one clip in the batch over "
        f"{split['encoder_layers']} layers is {stage_s * 1000:.0f} ms, measured before the servers) and one "
        f"decoder step of the transcription rows ({_step(split)} for "
        f"{split['batch']} rows in `generate()`'s batch), and every chat token waits for its step.",
        "",
        "Machine, how to reproduce, caveats: the 2-core machine is shared with other jobs (other "
        "builds and test runs), so absolute numbers move by several times between runs and within "
        "one; compare rows of one run. Reproduce with `python benchmarks/audio_bench.py` (`--quick`: "
        "4 one-sentence clips, one round, one short chat round; a smoke check); it needs espeak-ng and "
        "the test extra (whisper-base's packages, `transformers[serving]`, python-multipart, soxr). "
        "`transformers serve` runs without continuous batching (its transcription route refuses that "
        "mode), so it transcribes one request at a time whatever the concurrency; it ignores "
        "`language` (it detects the language: one more decoder step) and computes features with the "
        "processor, without an attention mask; its transcripts are compared stripped of the leading "
        "space it keeps.",
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

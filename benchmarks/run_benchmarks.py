"""Benchmark hfserve against the in-process references and `transformers serve`, in one run.

    python benchmarks/run_benchmarks.py [--out-dir benchmarks] [--quick]

Builds two random-weight Qwen2 models offline (tiny: hidden 64, 2 layers; small: hidden 512,
intermediate 1408, 8 layers, 8 heads, 4 KV heads, vocab 2000), then for each measures
1. the ceiling: in-process ``model.generate()`` on a static batch of c prompts (median of 3 runs);
2. the bare decode loop: the model's forward plus argmax on a KV cache, nothing else, batch c
   (median of 3 runs);
3. ``hfserve start --model <folder> --workers 4`` under ``hfserve bench`` at concurrency c (128
   requests; 256 on the tiny model, whose 64 last under half a second);
4. ``transformers serve --continuous-batching <folder>`` under the same load;
and, on the small model, the multi-turn benchmark (8 conversations x 6 turns sharing a ~1,000-token
system prompt) on both servers. Writes ``results.json``, its own section of ``RESULTS.md`` (tables,
the issue's targets with value / goal; other sections are kept) and plots. Streaming chat,
~40-token prompts, 64 new tokens (ignore_eos), fp32 on CPU.

``--quick`` is a smoke check of the whole pipeline (fewer requests, shorter replies and
conversations) and writes to a temporary folder unless ``--out-dir`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.bench import BenchConfig, make_prompts, run_bench  # noqa: E402
from cli.bench_plot import table  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from multiturn import run_multiturn  # noqa: E402
from reference import bare_loop, ceiling  # noqa: E402
from report import COALESCED, PEER, markdown, plot_all, targets, write_section  # noqa: E402

LEVELS = {"tiny": [32], "small": [8, 32]}
# Requests per level, in multiples of ``Plan.prompts_per_level`` x the largest level: the tiny
# model's 64 requests last under half a second, most of it the first wave's ramp-up, so it runs 4x;
# the small model's 64 at c=32 (two waves, ~4 s) gave 0.90x and 1.05x the ceiling in two runs an
# hour apart, so it runs 2x.
ROUNDS = {"tiny": 4, "small": 2}


@dataclass(frozen=True)
class Plan:
    """How much of each measurement one run makes (the full run, or ``--quick``)."""

    input_len: int = 40
    output_len: int = 64
    prompts_per_level: int = 2  # x the largest concurrency
    conversations: int = 8
    turns: int = 6
    system_tokens: int = 1000
    user_tokens: int = 20
    reply_tokens: int = 32


QUICK = Plan(output_len=16, prompts_per_level=1, conversations=2, turns=3, system_tokens=300, reply_tokens=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(work: Path) -> dict[str, Path]:
    from model_host.demo.build import ModelSpec, build_model

    specs = {
        "tiny": ModelSpec(
            vocab_size=2000,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            synthetic_vocab_text=True,
        ),
        "small": ModelSpec(
            vocab_size=2000,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            synthetic_vocab_text=True,
        ),
    }
    out = {}
    for name, spec in specs.items():
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        out[name] = build_model(folder, spec)
        _split_as_qwen2(folder)
        _silence_textless_tokens(folder)
    return out


def _split_as_qwen2(folder: Path) -> None:
    """Give the tokenizer the pre-tokenizer and normalizer of transformers' ``Qwen2Tokenizer``.

    ``AutoTokenizer`` (so ``transformers serve``) reads a Qwen2 model's tokenizer with its own
    rules whatever ``tokenizer.json`` says: digits one by one, NFC. With the builder's GPT-2
    split, the peer read the benchmark's digit-heavy prompts as twice as many tokens as hfserve
    did (prefilling twice the work, and refusing multi-turn histories past 2,048 tokens). With
    the same rules both servers see the same token ids; the check below fails the run if not."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    path = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.save(str(path))
    sample = make_prompts(1, 400, 1, str(folder))[0]
    peer = AutoTokenizer.from_pretrained(folder)(sample, add_special_tokens=False)["input_ids"]
    if tok.encode(sample, add_special_tokens=False).ids != peer:
        raise RuntimeError(f"{folder}: transformers tokenizes the prompts differently from tokenizer.json")


def _silence_textless_tokens(folder: Path) -> None:
    """Zero the (tied) embedding rows of tokens that stream no text, so their logits are 0 and a
    random model's greedy choice, the largest of ~2000 random logits, is never one. Otherwise a
    random model emits them as a trained one on text does not: runs of special tokens, which
    would show up as time-to-first-token of whole seconds that no server could avoid; and single
    bytes of UTF-8 characters (128 of the 2,004 tokens) in random order, which a server must hold
    back until they form a character or cannot: 14 % of the tokens made no chunk, and the gaps
    around them (two to five steps) were most of the ITL p99."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    partial = {i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])}
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(special | partial)] = 0.0
    model.save_pretrained(folder)


def start_server(cmd: list[str], port: int, log: Path, ready_path: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited early; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{cmd} not ready; see {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def bench_server(
    label: str,
    cmd: list[str],
    port: int,
    folder: Path,
    levels: list[int],
    requests: int,
    logs: Path,
    plan: Plan,
    ignore_eos: bool = True,
    then: Callable[[str], Any] | None = None,
) -> tuple[dict[str, Any], Any]:
    """``hfserve bench`` at each level against a server started for it; ``then(base_url)`` runs
    on the same server afterwards (the multi-turn benchmark)."""
    proc = start_server(cmd, port, logs / f"{label}.log", "/health")
    try:
        base = f"http://127.0.0.1:{port}"
        model = str(folder)

        def config(levels: list[int], prompts: int, output_len: int, seed: int) -> BenchConfig:
            return BenchConfig(
                base, model, levels, prompts, plan.input_len, output_len, float("inf"), seed, model, label,
                None, None, ignore_eos,
            )  # fmt: skip

        run_bench(config([1], 4, 8, 99))  # warm-up: model load, first-request paths
        report = run_bench(config(levels, requests, plan.output_len, 0))
        return report, (then(base) if then is not None else None)
    finally:
        stop_server(proc)


def multiturn(folder: Path, plan: Plan, ignore_eos: bool) -> Callable[[str], Any]:
    system = make_prompts(1, plan.system_tokens, 7, str(folder))[0]
    users = make_prompts(plan.conversations * plan.turns, plan.user_tokens, 8, str(folder))
    turns = [users[i * plan.turns : (i + 1) * plan.turns] for i in range(plan.conversations)]

    def run(base_url: str) -> dict[str, Any]:
        result = run_multiturn(base_url, str(folder), system, turns, plan.reply_tokens, ignore_eos)
        print(f"multi-turn TTFT p50 by turn (ms): {result['ttft_ms_by_turn']}", flush=True)
        return result

    return run


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks that stop the servers


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default: benchmarks/ (--quick: a temp folder)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke check: fewer, shorter requests")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="hfserve-bench-"))
    out: Path = args.out_dir or (work / "out" if args.quick else ROOT / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir()
    here = os.path.dirname(sys.executable)  # this environment's scripts, activated or not
    hfserve = shutil.which("hfserve", path=here) or shutil.which("hfserve") or "hfserve"
    tserve = shutil.which("transformers", path=here) or shutil.which("transformers") or "transformers"

    flags = " --quick" if args.quick else ""
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {**asdict(plan), "flags": flags},
        "models": {},
        "multiturn": {},
    }
    for name, folder in build(work).items():
        prompts = make_prompts(max(LEVELS[name]), plan.input_len, 0, str(folder))
        data: dict[str, Any] = {"ceiling": {}, "bare": {}, "servers": {}}
        for c in LEVELS[name]:
            data["ceiling"][str(c)] = ceiling(folder, prompts, c, plan.output_len)
            data["bare"][str(c)] = bare_loop(folder, prompts, c, plan.output_len)
            print(
                f"{name} c={c}: generate() {data['ceiling'][str(c)]['output_throughput']:.0f} tok/s, "
                f"bare loop {data['bare'][str(c)]['output_throughput']:.0f} tok/s",
                flush=True,
            )
        data["params"] = data["ceiling"][str(LEVELS[name][0])]["params"]
        requests = ROUNDS[name] * plan.prompts_per_level * max(LEVELS[name])
        mt = name == "small"  # the multi-turn benchmark runs on the small model's servers
        port = free_port()
        data["servers"]["hfserve"], multi = bench_server(
            "hfserve",
            [hfserve, "start", "--model", str(folder), "--workers", "4", "--port", str(port)],
            port,
            folder,
            LEVELS[name],
            requests,
            logs,
            plan,
            then=multiturn(folder, plan, True) if mt else None,
        )
        if mt:
            results["multiturn"]["hfserve"] = multi
        if name == "tiny":  # steps of a few ms: the same server, tokens coalesced per 20 ms
            port = free_port()
            data["servers"][COALESCED], _ = bench_server(
                COALESCED,
                [hfserve, "start", "--model", str(folder), "--workers", "4", "--port", str(port)]
                + ["--stream-interval-ms", "20"],
                port,
                folder,
                LEVELS[name],
                requests,
                logs,
                plan,
            )
        port = free_port()
        data["servers"][PEER], multi = bench_server(
            PEER,
            [tserve, "serve", "--continuous-batching", "--port", str(port), "--device", "cpu", str(folder)],
            port,
            folder,
            LEVELS[name],
            requests,
            logs,
            plan,
            ignore_eos=False,  # it refuses the extension; random weights rarely sample EOS anyway
            then=multiturn(folder, plan, False) if mt else None,
        )
        if mt:
            results["multiturn"][PEER] = multi
        print(table(list(data["servers"].values())), flush=True)
        results["models"][name] = data
    results["minutes"] = (time.monotonic() - started) / 60
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_section(out / "RESULTS.md", markdown(results, LEVELS))
    plot_all(results, out)
    print((out / "RESULTS.md").read_text())
    print(f"written to {out}", flush=True)


if __name__ == "__main__":
    main()

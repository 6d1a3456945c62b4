"""Benchmark hfserve against the in-process ceiling and `transformers serve`, in one run.

    python benchmarks/run_benchmarks.py [--out-dir benchmarks]

Builds two random-weight Qwen2 models offline (tiny: hidden 64, 2 layers; small: hidden 512,
intermediate 1408, 8 layers, 8 heads, 4 KV heads, vocab 2000), then for each measures
1. the ceiling: in-process ``model.generate()`` on a static batch of c prompts;
2. ``hfserve start --model <folder> --workers 4`` under ``hfserve bench`` at concurrency c;
3. ``transformers serve --continuous-batching <folder>`` under the same load;
and writes ``results.json``, ``RESULTS.md`` (table, targets, where each target stands) and plots.
Streaming chat, ~40-token prompts, 64 new tokens (ignore_eos), fp32 on CPU.
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
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.bench import BenchConfig, run_bench  # noqa: E402
from cli.bench_plot import plot_reports, table  # noqa: E402

INPUT_LEN = 40
OUTPUT_LEN = 64
LEVELS = {"tiny": [32], "small": [8, 32]}


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
        _silence_special_tokens(folder)
    return out


def _silence_special_tokens(folder: Path) -> None:
    """Zero the (tied) embedding rows of special tokens, so their logits are 0 and a random
    model's greedy choice, the largest of ~2000 random logits, is never one. Otherwise a random
    model sometimes emits runs of special tokens, which stream no text and would show up as
    time-to-first-token of whole seconds that no server could avoid."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight[special] = 0.0
    model.save_pretrained(folder)


def ceiling(folder: Path, prompts: list[str], batch: int) -> dict[str, Any]:
    """Output tokens/s of one static batch through ``model.generate()`` in this process."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = (folder / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = []
    for p in prompts[:batch]:
        (text,), _ = render_jinja_template(
            [[{"role": "user", "content": p}]], chat_template=template, add_generation_prompt=True
        )
        rows.append(tok.encode(text, add_special_tokens=False).ids)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs = dict(max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], **kwargs)  # warm-up
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        elapsed = time.perf_counter() - started
    return {
        "batch": batch,
        "seconds": elapsed,
        "output_throughput": batch * OUTPUT_LEN / elapsed,
        "params": sum(p.numel() for p in model.parameters()),
    }


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
    logs: Path,
    ignore_eos: bool = True,
) -> dict[str, Any]:
    proc = start_server(cmd, port, logs / f"{label}.log", "/health")
    try:
        base = f"http://127.0.0.1:{port}"
        cfg = BenchConfig(
            base,
            str(folder),
            [1],
            4,
            INPUT_LEN,
            8,
            float("inf"),
            99,
            str(folder),
            label,
            None,
            None,
            ignore_eos,
        )
        run_bench(cfg)  # warm-up: model load, first-request paths
        cfg = BenchConfig(
            base,
            str(folder),
            levels,
            2 * max(levels),
            INPUT_LEN,
            OUTPUT_LEN,
            float("inf"),
            0,
            str(folder),
            label,
            None,
            None,
            ignore_eos,
        )
        return run_bench(cfg)
    finally:
        stop_server(proc)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    def run(model: str, label: str, c: int) -> dict[str, Any]:
        report = results[model]["servers"][label]
        return next(r for r in report["runs"] if r["concurrency"] == c)

    def ceil(model: str, c: int) -> float:
        return float(results[model]["ceiling"][str(c)]["output_throughput"])

    checks = []

    def check(name: str, value: float, goal: float, higher_is_better: bool = True) -> None:
        ok = value >= goal if higher_is_better else value <= goal
        checks.append(
            {
                "target": name,
                "value": round(value, 1),
                "goal": round(goal, 1),
                "met": ok,
                "ratio_to_goal": round(value / goal, 3) if goal else None,
            }
        )

    hf = "hfserve"
    check(
        "small c=32 >= 0.8 x ceiling (tok/s)",
        run("small", hf, 32)["output_throughput"],
        0.8 * ceil("small", 32),
    )
    check(
        "small c=32 >= 2 x transformers serve CB (tok/s)",
        run("small", hf, 32)["output_throughput"],
        2 * run("small", "transformers-serve-cb", 32)["output_throughput"],
    )
    check(
        "small c=8 >= 0.9 x ceiling (tok/s)", run("small", hf, 8)["output_throughput"], 0.9 * ceil("small", 8)
    )
    check(
        "tiny c=32 >= 0.5 x ceiling (tok/s)", run("tiny", hf, 32)["output_throughput"], 0.5 * ceil("tiny", 32)
    )
    check("small c=32 TTFT p50 <= 350 ms", run("small", hf, 32)["ttft_ms"]["p50"], 350, False)
    check("small c=32 ITL p99 <= 150 ms", run("small", hf, 32)["itl_ms"]["p99"], 150, False)
    return checks


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {results['machine']}. Streaming chat, {INPUT_LEN}-token prompts, {OUTPUT_LEN} new "
        "tokens, fp32 on CPU, produced by `python benchmarks/run_benchmarks.py`.",
        "",
        "| model | c | in-process generate() ceiling tok/s | hfserve tok/s "
        "| transformers serve --continuous-batching tok/s |",
        "|---|---|---|---|---|",
    ]
    for model, data in results["models"].items():
        for c in LEVELS[model]:
            cells = [f"{data['ceiling'][str(c)]['output_throughput']:.0f}"]
            for label in ("hfserve", "transformers-serve-cb"):
                run = next(r for r in data["servers"][label]["runs"] if r["concurrency"] == c)
                cells.append(f"{run['output_throughput']:.0f} ({run['completed']} ok)")
            lines.append(f"| {model} ({data['params'] / 1e6:.2f}M) | {c} | " + " | ".join(cells) + " |")
    lines += ["", "## Latency", ""]
    for model, data in results["models"].items():
        lines += [f"### {model}", "", table(list(data["servers"].values())), ""]
    lines += ["## Targets", "", "| target | value | goal | met | value / goal |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(
            f"| {t['target']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else '**no**'} "
            f"| {t['ratio_to_goal']} |"
        )
    # Other benchmarks (embeddings_bench.py) keep their own top-level sections after this one.
    old = path.read_text() if path.exists() else ""
    others = old.find("\n# ")
    path.write_text("\n".join(lines) + "\n" + (old[others:] if others >= 0 else ""))


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks that stop the servers


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hfserve-bench-"))
    logs = work / "logs"
    logs.mkdir()
    here = os.path.dirname(sys.executable)  # this environment's scripts, activated or not
    hfserve = shutil.which("hfserve", path=here) or shutil.which("hfserve") or "hfserve"
    tserve = shutil.which("transformers", path=here) or shutil.which("transformers") or "transformers"
    from cli.bench import make_prompts

    results: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "models": {}}
    for name, folder in build(work).items():
        prompts = make_prompts(max(LEVELS[name]), INPUT_LEN, 0, str(folder))
        data: dict[str, Any] = {"ceiling": {}, "servers": {}}
        for c in LEVELS[name]:
            data["ceiling"][str(c)] = ceiling(folder, prompts, c)
            print(
                f"{name} ceiling c={c}: {data['ceiling'][str(c)]['output_throughput']:.0f} tok/s", flush=True
            )
        data["params"] = data["ceiling"][str(LEVELS[name][0])]["params"]
        port = free_port()
        data["servers"]["hfserve"] = bench_server(
            "hfserve",
            [hfserve, "start", "--model", str(folder), "--workers", "4", "--port", str(port)],
            port,
            folder,
            LEVELS[name],
            logs,
        )
        port = free_port()
        data["servers"]["transformers-serve-cb"] = bench_server(
            "transformers-serve-cb",
            [tserve, "serve", "--continuous-batching", "--port", str(port), "--device", "cpu", str(folder)],
            port,
            folder,
            LEVELS[name],
            logs,
            ignore_eos=False,  # it refuses the extension; random weights rarely sample EOS anyway
        )
        print(table(list(data["servers"].values())), flush=True)
        results["models"][name] = data
    results["targets"] = targets(results["models"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "RESULTS.md")
    for name, data in results["models"].items():
        plot_reports(list(data["servers"].values()), out / f"plot-{name}.png")
    print((out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()

"""Paired A/B of the model host's engine between two checkouts, in process, in CPU time.

    python benchmarks/engine_ab.py OLD_CHECKOUT NEW_CHECKOUT --model FOLDER [--pairs 4]
        [--prompt-len 40] [--concurrency 32] [--requests 64] [--new-tokens 64]
        [--workload steady|mixed|multiturn] [--old-budget 256] [--new-budget 256]

Each run drives the engine as the host does (``--requests`` greedy requests, ``--concurrency`` at a
time, a finished one replaced at once, no HTTP) in a child process started in that checkout, on
one torch thread, and reports the CPU time of the loop: on a shared machine CPU time moves far less
than wall time, so a change of a few percent shows. Runs alternate (old first, then new first) and
the verdict is the median of the per-pair ratios. The tokens of both checkouts must be identical.
Each run also reports the time to first token (p50) and between tokens (p99), in CPU seconds of
the loop. ``--old-budget``/``--new-budget`` set each side's prefill budget (tokens per step): one
checkout passed twice compares two budgets.
Make OLD_CHECKOUT with ``git worktree add /tmp/old <commit>``.

``--workload mixed`` makes every fourth prompt 16 times longer (chunked over several steps) and
reports the time to first token of the short ones apart. ``--workload multiturn`` measures
scheduling too: 8 conversations of 6 turns that share a
1,000-token system prompt (the multi-turn benchmark's shape, prefix cache on), each next turn added
the moment the last one ends. Besides the loop's CPU time it reports the time to first token (CPU
seconds of the loop from a request's arrival to its first token) of turn 1 and of turns 2-6.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import hashlib, json, sys, time
import torch
from model_host.engine import Engine
from model_host.ipc.messages import AddRequest, FinishReason, Generate, SamplingParams
from model_host.ipc.settings import HostSettings
from model_host.registry import ModelRegistry

model = sys.argv[1]
prompt_len, concurrency, requests, new_tokens, budget, long_every = map(int, sys.argv[2:8])
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
lengths = (prompt_len + torch.randint(-5, 6, (requests,), generator=gen)).tolist()
if long_every:  # every long_every-th prompt is long: 16x the others
    lengths = [n * 16 if i % long_every == 0 else n for i, n in enumerate(lengths)]
prompts = [tuple(torch.randint(10, 1990, (n,), generator=gen).tolist()) for n in lengths]
registry = ModelRegistry("cpu", "float32", False)
engine = Engine(registry, HostSettings(device="cpu", prefix_cache_mb=0), budget)
params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())
added = finished = 0
tokens, arrived, stamps = {}, {}, {}

def add():
    global added
    arrived[added] = time.process_time()
    engine.add(AddRequest(added, 0, 0, model, Generate(prompts[added], params)))
    added += 1

with torch.inference_mode():
    engine.registry.get(model)
    for _ in range(min(concurrency, requests)):
        add()
    started = time.process_time()
    while finished < requests:
        outs = engine.step()
        now = time.process_time()
        for out in outs:
            tokens.setdefault(out.frame.request_id, []).extend(out.frame.token_ids)
            if out.frame.token_ids:
                stamps.setdefault(out.frame.request_id, []).append(now)
            if out.frame.finish_reason is not FinishReason.NONE:
                finished += 1
                if added < requests:
                    add()
    cpu_s = time.process_time() - started
digest = hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()
ttft = sorted(stamps[r][0] - arrived[r] for r in stamps)
short = sorted(stamps[r][0] - arrived[r] for r in stamps if not long_every or r % long_every)
itl = sorted(b - a for r in stamps for a, b in zip(stamps[r], stamps[r][1:]))
print(json.dumps({
    "cpu_s": cpu_s, "tokens": digest,
    "ttft_p50_s": ttft[len(ttft) // 2], "ttft_short_p50_s": short[len(short) // 2],
    "itl_p99_s": itl[int(len(itl) * 0.99)],
}))
"""


_MULTITURN_CHILD = r"""
import hashlib, json, statistics, sys, time
import torch
from model_host.engine import Engine
from model_host.ipc.messages import AddRequest, FinishReason, Generate, SamplingParams
from model_host.ipc.settings import HostSettings
from model_host.prefix_cache import PrefixCache
from model_host.registry import ModelRegistry

model, conversations, turns, new_tokens, budget = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
system = torch.randint(10, 1990, (1000,), generator=gen).tolist()
users = [
    [torch.randint(10, 1990, (20,), generator=gen).tolist() for _ in range(turns)]
    for _ in range(conversations)
]
registry = ModelRegistry("cpu", "float32", False, PrefixCache(512 * 1024 * 1024))
engine = Engine(registry, HostSettings(device="cpu"), budget)
params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())
history = {c: list(system) for c in range(conversations)}
turn_of, arrived, first, tokens = {}, {}, {}, {}

def add(c, t):
    rid = c * turns + t
    history[c] += users[c][t]
    turn_of[rid], arrived[rid] = t, time.process_time()
    engine.add(AddRequest(rid, 0, 0, model, Generate(tuple(history[c]), params)))

with torch.inference_mode():
    engine.registry.get(model)
    started = time.process_time()
    for c in range(conversations):
        add(c, 0)
    while len(first) < conversations * turns or engine.has_work():
        for out in engine.step():
            rid = out.frame.request_id
            if out.frame.token_ids and rid not in first:
                first[rid] = time.process_time()
            tokens.setdefault(rid, []).extend(out.frame.token_ids)
            if out.frame.finish_reason is not FinishReason.NONE:
                c, t = divmod(rid, turns)
                history[c] += tokens[rid]
                if t + 1 < turns:
                    add(c, t + 1)
    cpu_s = time.process_time() - started
ttft = {rid: first[rid] - arrived[rid] for rid in first}
digest = hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()
print(json.dumps({
    "cpu_s": cpu_s, "tokens": digest,
    "ttft_turn1_p50_s": statistics.median(v for r, v in ttft.items() if turn_of[r] == 0),
    "ttft_later_p50_s": statistics.median(v for r, v in ttft.items() if turn_of[r] > 0),
}))
"""


def run(label: str, checkout: Path, args: argparse.Namespace) -> dict[str, float | str]:
    budget = str(args.new_budget if label == "new" else args.old_budget)
    if args.workload == "multiturn":
        cmd = [sys.executable, "-c", _MULTITURN_CHILD, str(args.model), "8", "6", "32", budget]
    else:
        cmd = [sys.executable, "-c", _CHILD, str(args.model)]
        cmd += [str(v) for v in (args.prompt_len, args.concurrency, args.requests, args.new_tokens, budget)]
        cmd.append("4" if args.workload == "mixed" else "0")
    out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--model", type=Path, required=True, help="a causal LM folder")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--workload", choices=("steady", "mixed", "multiturn"), default="steady")
    parser.add_argument("--old-budget", type=int, default=256, help="prefill tokens per step, old side")
    parser.add_argument("--new-budget", type=int, default=256, help="prefill tokens per step, new side")
    args = parser.parse_args()
    ratios = []
    for i in range(args.pairs):
        order = [("old", args.old), ("new", args.new)]
        got = {label: run(label, path, args) for label, path in (order if i % 2 == 0 else order[::-1])}
        if got["old"]["tokens"] != got["new"]["tokens"]:
            sys.exit("the two checkouts generated different tokens")
        ratios.append(float(got["old"]["cpu_s"]) / float(got["new"]["cpu_s"]))
        print(
            f"pair {i}: old {got['old']['cpu_s']:.2f} s, new {got['new']['cpu_s']:.2f} s, {ratios[-1]:.3f}x"
        )
        for label in ("old", "new"):
            ttfts = {k: v for k, v in got[label].items() if k.startswith(("ttft", "itl"))}
            if ttfts:
                print(f"  {label}: " + ", ".join(f"{k} {float(v):.3f}" for k, v in ttfts.items()))
    print(f"new / old speed, median of {len(ratios)} pairs: {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()

"""What ``run_benchmarks.py`` writes: the issue's targets checked against one run's numbers, its
section of ``RESULTS.md`` (the other sections, written by other scripts or by hand, are kept), and
the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cli.bench_plot import plot_reports, table

SECTION_TITLE = "# Benchmark results"
PEER = "transformers-serve-cb"
COALESCED = "hfserve-stream-interval-20ms"  # hfserve --stream-interval-ms 20 (the tiny model only)


def _run(results: dict[str, Any], model: str, label: str, c: int) -> dict[str, Any]:
    report = results["models"][model]["servers"][label]
    return dict(next(r for r in report["runs"] if r["concurrency"] == c))


def _ref(results: dict[str, Any], model: str, kind: str, c: int) -> float:
    return float(results["models"][model][kind][str(c)]["output_throughput"])


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's acceptance table: each target's value, goal, and value / goal (for a "<="
    target a ratio above 1 is the factor by which it is missed)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, goal: float | None, higher_is_better: bool = True) -> None:
        if value is None or goal is None:
            checks.append({"target": name, "value": None, "goal": goal, "met": False, "ratio_to_goal": None})
            return
        met = value >= goal if higher_is_better else value <= goal
        ratio = round(value / goal, 3) if goal else None
        checks.append(
            {
                "target": name,
                "value": round(value, 1),
                "goal": round(goal, 1),
                "met": met,
                "ratio_to_goal": ratio,
            }
        )

    hf = "hfserve"
    small32 = _run(results, "small", hf, 32)["output_throughput"]
    check(
        "small c=32 >= 1.0 x generate() ceiling at batch 32 (tok/s)",
        small32,
        _ref(results, "small", "ceiling", 32),
    )
    check(
        "small c=32 >= 0.9 x bare decode loop at batch 32 (tok/s)",
        small32,
        0.9 * _ref(results, "small", "bare", 32),
    )
    peer32 = _run(results, "small", PEER, 32)["output_throughput"]
    check("small c=32 >= 2.5 x transformers serve CB (tok/s)", small32, 2.5 * peer32)
    check("small c=32 TTFT p50 <= 300 ms", _run(results, "small", hf, 32)["ttft_ms"]["p50"], 300, False)
    check("small c=32 ITL p99 <= 150 ms", _run(results, "small", hf, 32)["itl_ms"]["p99"], 150, False)
    small8 = _run(results, "small", hf, 8)["output_throughput"]
    check(
        "small c=8 >= 1.0 x generate() ceiling at batch 8 (tok/s)",
        small8,
        _ref(results, "small", "ceiling", 8),
    )
    tiny32 = _run(results, "tiny", hf, 32)["output_throughput"]
    check("tiny c=32 >= 0.6 x generate() ceiling (tok/s)", tiny32, 0.6 * _ref(results, "tiny", "ceiling", 32))
    if COALESCED in results["models"]["tiny"]["servers"]:
        check(
            "tiny c=32, --stream-interval-ms 20, >= 0.6 x generate() ceiling (tok/s)",
            _run(results, "tiny", COALESCED, 32)["output_throughput"],
            0.6 * _ref(results, "tiny", "ceiling", 32),
        )
    multi = results.get("multiturn", {})
    ours, peer = multi.get(hf, {}), multi.get(PEER, {})
    later, first = ours.get("later_ttft_p50_ms"), ours.get("turn1_ttft_p50_ms")
    check(
        "multi-turn: hfserve TTFT p50 of turns 2-6 <= 0.3 x its turn 1 (ms)",
        later,
        first and 0.3 * first,
        False,
    )
    peer_later = peer.get("later_ttft_p50_ms")
    check(
        "multi-turn: hfserve TTFT p50 of turns 2-6 <= 0.3 x transformers serve's (ms)",
        later,
        peer_later and 0.3 * peer_later,
        False,
    )
    return checks


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, Any], levels: dict[str, list[int]]) -> str:
    cfg = results["config"]
    lines = [
        SECTION_TITLE,
        "",
        f"Machine: {results['machine']}. Streaming chat, {cfg['input_len']}-token prompts, "
        f"{cfg['output_len']} new tokens, fp32 on CPU, produced by "
        f"`python benchmarks/run_benchmarks.py{cfg['flags']}` in one run ({results['minutes']:.0f} min). "
        "The in-process references are each the median of 3 runs.",
        "",
        "| model | c | generate() ceiling tok/s | bare decode loop tok/s | hfserve tok/s "
        "| transformers serve --continuous-batching tok/s | hfserve / ceiling | hfserve / bare loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, data in results["models"].items():
        for c in levels[model]:
            ceiling, bare = _ref(results, model, "ceiling", c), _ref(results, model, "bare", c)
            ours = _run(results, model, "hfserve", c)
            peer = _run(results, model, PEER, c)
            lines.append(
                f"| {model} ({data['params'] / 1e6:.2f}M) | {c} | {ceiling:.0f} | {bare:.0f} "
                f"| {ours['output_throughput']:.0f} ({ours['completed']} ok) "
                f"| {peer['output_throughput']:.0f} ({peer['completed']} ok) "
                f"| {ours['output_throughput'] / ceiling:.2f} | {ours['output_throughput'] / bare:.2f} |"
            )
            if COALESCED in data["servers"]:
                coalesced = _run(results, model, COALESCED, c)
                lines.append(
                    f"| {model}, hfserve `--stream-interval-ms 20` | {c} | | "
                    f"| {coalesced['output_throughput']:.0f} ({coalesced['completed']} ok) | "
                    f"| {coalesced['output_throughput'] / ceiling:.2f} "
                    f"| {coalesced['output_throughput'] / bare:.2f} |"
                )
    lines += ["", "## Latency", ""]
    for model, data in results["models"].items():
        lines += [f"### {model}", "", table(list(data["servers"].values())), ""]
    multi = results.get("multiturn")
    if multi:
        any_run = next(iter(multi.values()))
        lines += [
            "## Multi-turn",
            "",
            f"{any_run['conversations']} conversations x {any_run['turns']} turns at once on the small "
            f"model, a shared system prompt of {cfg['system_tokens']} tokens, {cfg['user_tokens']}-token "
            f"user messages, {any_run['max_tokens']}-token replies, streaming, greedy. TTFT p50 by turn "
            "(ms); "
            "prompt tokens taken from the prefix cache per turn, as the server reports them.",
            "",
            "| server | " + " | ".join(f"turn {i + 1}" for i in range(any_run["turns"])) + " | turns 2+ p50 "
            "| failed |",
            "|---|" + "---|" * (any_run["turns"] + 2),
        ]
        for label, run in multi.items():
            cells = [_fmt(v) for v in run["ttft_ms_by_turn"]]
            lines.append(
                f"| {label} | "
                + " | ".join(cells)
                + f" | {_fmt(run['later_ttft_p50_ms'])} | {run['failed']} |"
            )
        for label, run in multi.items():
            cached = ", ".join(
                f"{c}/{p}"
                for c, p in zip(run["cached_tokens_by_turn"], run["prompt_tokens_by_turn"], strict=True)
            )
            lines.append(f"\n{label}: cached / prompt tokens by turn: {cached}.")
        lines.append("")
    lines += ["## Targets", "", "| target | value | goal | met | value / goal |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        met = "yes" if t["met"] else "**no**"
        lines.append(
            f"| {t['target']} | {_fmt(t['value'])} | {_fmt(t['goal'])} | {met} | {t['ratio_to_goal']} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of ``path`` (from its title to the next top-level heading),
    keeping every other section where it is; a file without the section gets it first."""
    old = path.read_text() if path.exists() else ""
    start = 0 if old.startswith(SECTION_TITLE + "\n") else old.find("\n" + SECTION_TITLE + "\n")
    if start < 0:
        path.write_text(section + ("\n" + old if old else ""))
        return
    end = old.find("\n# ", start + 1)
    head = old[: start + 1] if start else ""
    tail = old[end + 1 :] if end >= 0 else ""
    path.write_text(head + section + ("\n" + tail if tail else ""))


def plot_multiturn(multi: dict[str, Any], path: Path) -> Path:
    """TTFT p50 by turn, a line per server (log scale: the first turn is seconds, later ones not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in multi.items():
        turns = list(range(1, len(run["ttft_ms_by_turn"]) + 1))
        ax.plot(turns, [v or float("nan") for v in run["ttft_ms_by_turn"]], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("multi-turn conversations sharing a system prompt")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(results: dict[str, Any], out: Path) -> list[Path]:
    paths = [
        plot_reports(list(data["servers"].values()), out / f"plot-{name}.png")
        for name, data in results["models"].items()
    ]
    if results.get("multiturn"):
        paths.append(plot_multiturn(results["multiturn"], out / "plot-multiturn.png"))
    return paths

"""Plots and tables of ``hfserve bench`` reports: throughput and latency against concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_reports(reports: list[dict[str, Any]], path: Path) -> Path:
    """One PNG with three panels (output tok/s, TTFT p50, ITL p99), a line per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("output_throughput", None, "output tokens/s"),
        ("ttft_ms", "p50", "TTFT p50 (ms)"),
        ("itl_ms", "p99", "ITL p99 (ms)"),
    ]
    for report in reports:
        levels = [run["concurrency"] for run in report["runs"]]
        for ax, (metric, stat, _) in zip(axes, panels, strict=True):
            values = [run[metric] if stat is None else run[metric][stat] for run in report["runs"]]
            ax.plot(levels, values, marker="o", label=report["label"])
    for ax, (_, _, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.grid(True, alpha=0.3)
        ax.legend()
    model = reports[0]["model"] if reports else ""
    fig.suptitle(f"{model}: {reports[0]['input_len']} in / {reports[0]['output_len']} out" if reports else "")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(reports: list[dict[str, Any]]) -> str:
    """A Markdown table of every run of every report."""
    lines = [
        "| server | c | ok/failed | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| ITL p99 ms | TPOT p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for run in report["runs"]:
            lines.append(
                f"| {report['label']} | {run['concurrency']} | {run['completed']}/{run['failed']} "
                f"| {run['output_throughput']:.0f} | {run['request_throughput']:.2f} "
                f"| {run['ttft_ms']['p50']:.0f} | {run['ttft_ms']['p99']:.0f} "
                f"| {run['itl_ms']['p50']:.1f} | {run['itl_ms']['p99']:.1f} | {run['tpot_ms']['p50']:.1f} |"
            )
    return "\n".join(lines)

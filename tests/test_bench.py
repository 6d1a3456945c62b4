"""`hfserve bench` against hfserve and against `transformers serve`, writing JSON and PNG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.server import ServerProcess, free_port, hfserve_cmd, server_env, venv_script


def run_bench(base_url: str, tmp: Path, label: str, *extra: str) -> dict:
    out, png = tmp / f"{label}.json", tmp / f"{label}.png"
    cmd = [
        *hfserve_cmd(),
        "bench",
        "--base-url",
        base_url,
        "--concurrency",
        "1,4",
        "--num-prompts",
        "6",
        "--input-len",
        "12",
        "--output-len",
        "8",
        "--label",
        label,
        "--out",
        str(out),
        "--plot",
        str(png),
    ]
    cmd += list(extra)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    assert label in done.stdout  # the summary table
    return report


def test_bench_against_hfserve(server: ServerProcess, tmp_path: Path) -> None:
    report = run_bench(server.base_url, tmp_path, "hfserve")
    assert report["model"] == "hfserve-demo"
    assert [r["concurrency"] for r in report["runs"]] == [1, 4]
    for run in report["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        # ignore_eos is honoured: exactly the requested length, counted from usage
        assert run["total_output_tokens"] == 6 * 8
        assert run["total_input_tokens"] > 0
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"]
        assert run["itl_ms"]["p50"] > 0 and run["output_throughput"] > 0
        assert run["e2e_ms"]["p50"] >= run["ttft_ms"]["p50"]


def test_bench_reports_a_server_that_is_down(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        [
            *hfserve_cmd(),
            "bench",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--model",
            "m",
            "--num-prompts",
            "2",
            "--concurrency",
            "1",
            "--out",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runs"][0]["failed"] == 2 and report["runs"][0]["errors"]


def test_bench_against_transformers_serve(cache_dir: Path, demo_model: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "tserve.log").open("wb")
    proc = subprocess.Popen(
        [venv_script("transformers"), "serve", "--port", str(port), "--device", "cpu", str(demo_model)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=server_env(cache_dir),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "tserve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not start"
            time.sleep(0.5)
        # It refuses the ignore_eos extension with a 422.
        report = run_bench(
            f"http://127.0.0.1:{port}", tmp_path, "tserve", "--model", str(demo_model), "--no-ignore-eos"
        )
        assert all(r["completed"] == 6 for r in report["runs"]), [r["errors"] for r in report["runs"]]
        assert all(r["total_output_tokens"] > 0 for r in report["runs"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_prompts_have_the_asked_length_in_tokens(demo_model: Path) -> None:
    from tokenizers import Tokenizer

    from cli.bench import make_prompts

    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    for length in (12, 40, 300):
        prompts = make_prompts(16, length, 3, str(demo_model))
        lengths = [len(tok.encode(p, add_special_tokens=False).ids) for p in prompts]
        assert all(length - 1 <= n <= length for n in lengths), (length, lengths)
        assert len(set(prompts)) == 16
    assert make_prompts(4, 40, 3, str(demo_model)) == make_prompts(4, 40, 3, str(demo_model))  # seeded

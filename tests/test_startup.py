"""Starting the server: misconfigurations are one line on stderr and exit 78, EX_CONFIG (no
traceback, no process left behind); a good start says where it listens, and prints each log line
once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.server import ServerProcess, free_port, hfserve_cmd, server_env

START_ERROR_TIMEOUT_S = 120


def _run_start(cache_dir: Path, *args: str) -> tuple[int, str, list[str]]:
    """Run ``hfserve start ARGS`` to its end; returns its exit status, its stderr, and the pids of
    processes of its session still alive afterwards."""
    if "--port" not in args:  # the default port may be taken on this machine
        args = ("--port", str(free_port()), *args)
    proc = subprocess.Popen(
        [*hfserve_cmd(), "start", *args],
        env=server_env(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=START_ERROR_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err, _left_in_session(proc.pid)


def _left_in_session(sid: int, grace_s: float = 3.0) -> list[str]:
    """Processes of the server's session still alive ``grace_s`` after it exited (its helpers get
    a moment to notice), by command line."""
    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getsid(p.info["pid"]) == sid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(p.info["cmdline"] or [])[:120])
            except (ProcessLookupError, psutil.Error):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _assert_one_line_error(result: tuple[int, str, list[str]], *needles: str) -> None:
    code, err, left = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in err and "╭" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not left, f"processes left behind: {left}"


def test_port_in_use(cache_dir: Path, demo_model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_start(cache_dir, "--port", str(port))
    _assert_one_line_error(result, str(port), "in use")


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("no_tokenizer", "tokenizer.json"),
        ("no_config", "config.json"),
        ("bad_config", "config.json"),
        ("truncated_weights", "safetensors"),
        ("garbage_weights", "safetensors"),
    ],
)
def test_unreadable_model_folder(
    tmp_path: Path, cache_dir: Path, demo_model: Path, damage: str, needle: str
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(demo_model, folder)
    weights = folder / "model.safetensors"
    if damage == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "bad_config":
        (folder / "config.json").write_text("{not json")
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(b"\x00" * 64)
    _assert_one_line_error(_run_start(cache_dir, "--model", str(folder)), needle)


def test_a_model_the_host_cannot_load_stops_the_server(
    tmp_path: Path, cache_dir: Path, demo_model: Path
) -> None:
    """Past every check the main process can make (here: an architecture transformers does not
    know), the host reports it once and the server exits 78: no restart loop."""
    folder = tmp_path / "model"
    shutil.copytree(demo_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (folder / "config.json").write_text(json.dumps(config))
    code, err, left = _run_start(cache_dir, "--model", str(folder), "--port", str(free_port()))
    _assert_one_line_error((code, err, left), "no_such_architecture")


def test_missing_model_folder(cache_dir: Path) -> None:
    _assert_one_line_error(_run_start(cache_dir, "--model", "/no/such/folder"), "/no/such/folder")


def test_a_device_this_torch_cannot_use(cache_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine can use CUDA")
    _assert_one_line_error(_run_start(cache_dir, "--device", "cuda"), "--device cuda")
    _assert_one_line_error(_run_start(cache_dir, "--device", "tpu9"), "--device")


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--workers", "0"), "--workers"),
        (("--port", "70000"), "--port"),
        (("--max-batch-size", "0"), "--max-batch-size"),
        (("--log-level", "LOUD"), "--log-level"),
        (("--no-such-option",), "--no-such-option"),
    ],
)
def test_bad_options(cache_dir: Path, args: tuple[str, ...], needle: str) -> None:
    _assert_one_line_error(_run_start(cache_dir, *args), needle)


def test_version() -> None:
    out = subprocess.run([*hfserve_cmd(), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert re.fullmatch(r"hfserve \d+\.\d+\.\d+\S*\n", out.stdout)


def test_a_started_server_says_where_it_listens_and_logs_each_line_once(
    cache_dir: Path, demo_model: Path
) -> None:
    with ServerProcess.start(cache_dir, workers=2) as srv:
        srv.wait_for(lambda s: s["ready"])
        text = srv.log_text()
        for _ in range(50):  # the announcement follows readiness within a supervisor tick
            if "hfserve ready" in text:
                break
            time.sleep(0.1)
            text = srv.log_text()
    assert f"hfserve ready: http://127.0.0.1:{srv.port}/v1 serving hfserve-demo (2 workers" in text
    # Every line carries a timestamp (and a pid where Sanic writes it): a repeated line is a duplicate.
    counts = Counter(line.split(" INFO", 1)[-1] for line in text.splitlines() if "Starting worker" in line)
    assert counts and all(n == 1 for n in counts.values()), counts
    assert text.count("Experienced exception") == 0


def test_bench_plot_without_matplotlib_fails_before_any_load(tmp_path: Path) -> None:
    """The plot's dependency is checked before minutes of load, and the extra to install named."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    started = time.monotonic()
    out = subprocess.run(
        [*hfserve_cmd(), "bench", "--base-url", "http://127.0.0.1:9", "--plot", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "hfserve[bench]" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - started < 60  # no request was even tried

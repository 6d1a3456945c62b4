"""Crash recovery of the model host during 16 streams, idle unload of on-demand models, and the
sweep of shared memory a killed server left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import psutil
import pytest

from tests.embedding_texts import FOLDER as MINILM
from tests.server import ServerProcess
from tests.test_lifecycle import shm_entries

MODEL = "hfserve-demo"
HELLO = [{"role": "user", "content": "Hello!"}]


def host_rss_mb(srv: ServerProcess) -> float:
    (host,) = srv.titled("hfserve: model-host")
    return float(host.memory_info().rss / 2**20)


def served(srv: ServerProcess) -> list[str]:
    return [m["id"] for m in httpx.get(f"{srv.base_url}/v1/models", timeout=10).json()["data"]]


def greedy_hello(srv: ServerProcess) -> str | None:
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0)  # type: ignore[arg-type]
    return reply.choices[0].message.content


def embed(srv: ServerProcess) -> None:
    body = {"model": str(MINILM), "input": ["a sentence to embed", "and another one"]}
    resp = httpx.post(f"{srv.base_url}/v1/embeddings", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 2


@pytest.fixture(scope="module")
def idle_unloading(cache_dir: Path, demo_model: Path) -> Iterator[tuple[ServerProcess, Path, Path]]:
    """A 1-worker server with --idle-unload-s 2, started over what a killed server left: a record
    with a pid that is gone, and a segment it mapped. One start serves the idle-unload test and the
    sweep test, which then stops it (starts dominate the suite's time)."""
    leftover = Path(f"/dev/shm/hfserve-left-{os.getpid()}-{time.monotonic_ns()}")
    leftover.write_bytes(b"\0" * 64)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    run = cache_dir / "run"
    run.mkdir(exist_ok=True)
    record = run / f"{dead.pid}.json"
    record.write_text(json.dumps({"pid": dead.pid, "start_ticks": 1, "segments": [str(leftover)]}))
    try:
        with ServerProcess.start(cache_dir, workers=1, args=("--idle-unload-s", "2")) as srv:
            yield srv, leftover, record
    finally:
        leftover.unlink(missing_ok=True)


def test_idle_unload_frees_the_on_demand_model_and_loads_it_again(
    idle_unloading: tuple[ServerProcess, Path, Path],
) -> None:
    srv, _, _ = idle_unloading
    assert srv.proc.poll() is None, "runs before test_a_start_sweeps_what_a_killed_server_left stops it"
    base_mb = host_rss_mb(srv)
    embed(srv)
    assert str(MINILM) in served(srv)
    loaded_mb = host_rss_mb(srv)
    assert loaded_mb - base_mb > 40, (base_mb, loaded_mb)  # MiniLM's weights are ~90 MB
    deadline = time.monotonic() + 30
    while str(MINILM) in served(srv):
        assert time.monotonic() < deadline, "the idle model was not unloaded"
        time.sleep(0.25)
    unloaded_mb = host_rss_mb(srv)
    # Most of what the load took is given back; the demo model (the default) stays.
    assert loaded_mb - unloaded_mb > 0.5 * (loaded_mb - base_mb), (base_mb, loaded_mb, unloaded_mb)
    assert served(srv) == [MODEL]
    # Used again: loaded again.
    embed(srv)
    assert str(MINILM) in served(srv)
    # A model in use is not unloaded, whatever its age: the demo model never is.
    assert greedy_hello(srv) == "Hello! How can I help you today?"
    assert "unloaded after 2 s without requests" in srv.log_text()


def test_a_start_sweeps_what_a_killed_server_left(
    idle_unloading: tuple[ServerProcess, Path, Path], cache_dir: Path
) -> None:
    srv, leftover, record = idle_unloading
    assert not leftover.exists() and not record.exists()
    assert "left by a server that was killed" in srv.log_text()
    own = cache_dir / "run" / f"{srv.proc.pid}.json"
    assert srv.stop() == 0
    assert not own.exists()  # a clean stop leaves no record


# -- a host killed under 16 streams ----------------------------------------------------------
async def _long_stream(
    client: httpx.AsyncClient, started: asyncio.Event, count: list[int]
) -> dict[str, object]:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 1900,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a long story"}],
    }
    seen: dict[str, object] = {"errors": [], "done": False, "content": False}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                seen["done"] = True
            elif line.startswith("data: "):
                event = orjson.loads(line[6:])
                if "error" in event:
                    seen["errors"].append(event["error"])  # type: ignore[attr-defined]
                    seen["error_at"] = time.monotonic()
                elif not seen["content"] and any(c["delta"].get("content") for c in event["choices"]):
                    seen["content"] = True
                    count[0] += 1
                    if count[0] == 16:
                        started.set()
    seen["ended_at"] = time.monotonic()
    return seen


async def _kill_host_under_streams(srv: ServerProcess) -> tuple[float, list[dict[str, object]]]:
    started = asyncio.Event()
    count = [0]
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
        tasks = [asyncio.create_task(_long_stream(client, started, count)) for _ in range(16)]
        await asyncio.wait_for(started.wait(), 120)
        (host,) = srv.titled("hfserve: model-host")
        killed_at = time.monotonic()
        os.kill(host.pid, signal.SIGKILL)
        return killed_at, list(await asyncio.gather(*tasks))


def test_host_sigkill_under_16_streams_recovers_by_itself(cache_dir: Path, demo_model: Path) -> None:
    shm_before = shm_entries()
    with ServerProcess.start(cache_dir, workers=4) as srv:
        before = greedy_hello(srv)
        old_host = srv.host_status()["pid"]
        killed_at, results = asyncio.run(_kill_host_under_streams(srv))
        # Every stream ends at once, with an in-band error event and [DONE].
        for r in results:
            assert r["errors"] and r["done"], r
            assert r["error_at"] - killed_at < 2.0, r["error_at"] - killed_at  # type: ignore[operator]
            assert r["errors"][0]["code"] == "engine_unavailable"  # type: ignore[index]
        # /health says 503 while the host is down, then 200 again, with nobody's help.
        saw_503 = False
        deadline = time.monotonic() + 180
        while True:
            code = srv.health().status_code
            saw_503 = saw_503 or code == 503
            if code == 200 and srv.host_status()["pid"] != old_host:
                break
            assert time.monotonic() < deadline, srv.log_text()[-3000:]
            time.sleep(0.1)
        assert saw_503
        # The new host has the model again and answers as the old one did.
        assert greedy_hello(srv) == before == "Hello! How can I help you today?"
        assert srv.host_status()["epoch"] == 2
        assert "died (killed by SIGKILL" in srv.log_text()
        # And the recovered server still stops cleanly: every process gone, no shared memory left.
        pids = [p.pid for p in srv.processes()]
        assert srv.stop() == 0
    time.sleep(0.2)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert shm_entries() - shm_before == set()


def test_restart_backoff_doubles_while_a_process_keeps_dying() -> None:
    from sanic_serve.lifecycle.supervisor import Backoff

    b = Backoff(first_s=0.5, cap_s=4.0, stable_after_s=60.0)
    delays = []
    now = 0.0
    for _ in range(6):
        delays.append(b.delay_s("ModelHost", now))
        now += delays[-1]
        b.restarted("ModelHost", now)
        now += 1.0  # dies again a second after each restart
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay_s("Sanic-Server-0-0", now) == 0.5  # each process has its own count
    # Up for longer than stable_after_s: the next crash starts the count again.
    assert b.delay_s("ModelHost", now + 61.0) == 0.5


# -- leftovers of a killed tree ----------------------------------------------------------------
_HOLDER = """
import sys, time
from multiprocessing import shared_memory
block = shared_memory.SharedMemory(name=sys.argv[1], create=True, size=4096)
print("ready", flush=True)
time.sleep(600)
"""


def test_segments_of_a_killed_tree_are_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    from sanic_serve.lifecycle import shm

    name = f"hfserve-sweep-{os.getpid()}-{time.monotonic_ns()}"
    # A process tree that maps a named segment, as a library in a server's process might.
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, name], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        recorder = shm.Recorder(tmp_path, pid=holder.pid)
        recorder.record()
        assert json.loads(recorder.path.read_text())["segments"] == [f"/dev/shm/{name}"]
        assert shm.sweep(tmp_path) == [] and recorder.path.exists()  # its server still runs
        os.killpg(holder.pid, signal.SIGKILL)  # the whole tree, its resource tracker too
        holder.wait(10)
        assert Path(f"/dev/shm/{name}").exists()  # left behind
        assert shm.sweep(tmp_path) == [f"/dev/shm/{name}"]
        assert not Path(f"/dev/shm/{name}").exists() and not recorder.path.exists()
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)
        Path(f"/dev/shm/{name}").unlink(missing_ok=True)

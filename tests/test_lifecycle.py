"""Process layout, worker footprint, shutdown, host crash recovery and client disconnects."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.server import ServerProcess, free_port, hfserve_cmd, server_env

MODEL = "hfserve-demo"
SHM = Path("/dev/shm")


def shm_entries() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


@pytest.fixture(scope="module")
def fresh_four(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    """A server of its own: the shared one's workers keep some memory of the 16 MB bodies other
    tests send them (glibc keeps freed heap), which says nothing about what a worker needs. Measured
    first, then stopped by ``test_sigint_stops_cleanly`` (one start for both: starts dominate the
    suite's time)."""
    with ServerProcess.start(cache_dir, workers=4) as srv:
        yield srv


def test_four_workers_one_host_small_torch_free_workers(fresh_four: ServerProcess) -> None:
    assert fresh_four.proc.poll() is None, "measured before test_sigint_stops_cleanly stops it"
    _check_processes(fresh_four)


def test_sigint_stops_cleanly(fresh_four: ServerProcess) -> None:
    pids = [p.pid for p in fresh_four.processes()]
    assert len(pids) >= 5  # four workers and the host at least: all of them must go
    assert fresh_four.stop(signal.SIGINT) == 0
    time.sleep(0.2)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def _check_processes(server: ServerProcess) -> None:
    workers = server.titled("hfserve: worker")
    hosts = server.titled("hfserve: model-host")
    assert len(workers) == 4
    assert len(hosts) == 1
    assert psutil.Process(server.proc.pid).children()  # the main process supervises them
    for w in workers:
        rss_mb = w.memory_info().rss / 2**20
        assert rss_mb <= 150, f"worker {w.pid} uses {rss_mb:.0f} MB"
        maps = Path(f"/proc/{w.pid}/maps").read_text()
        assert "libtorch" not in maps, f"worker {w.pid} has torch loaded"
    host_maps = Path(f"/proc/{hosts[0].pid}/maps").read_text()
    assert "libtorch" in host_maps  # the check above would notice torch if it were there


def _long_stream_request(server: ServerProcess) -> socket.socket:
    """Start a long streaming request over a raw socket and read its first bytes."""
    body = (
        b'{"model": "hfserve-demo", "stream": true, "max_tokens": 1900, "ignore_eos": true,'
        b' "messages": [{"role": "user", "content": "Write a long story"}]}'
    )
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert b"200 OK" in sock.recv(4096)
    return sock


def test_client_disconnect_aborts_in_host(server: ServerProcess) -> None:
    before = server.host_status()["aborted_total"]
    socks = [_long_stream_request(server) for _ in range(3)]
    server.wait_for(lambda s: s["running"] >= 1)
    for s in socks:
        s.close()
    status = server.wait_for(
        lambda s: s["aborted_total"] >= before + 3 and s["running"] == 0 and s["waiting"] == 0
    )
    assert status["running"] == 0


def test_non_stream_disconnect_aborts_too(server: ServerProcess) -> None:
    before = server.host_status()["aborted_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/v1/chat/completions",
            timeout=httpx.Timeout(10, read=0.5),
            json={
                "model": MODEL,
                "max_tokens": 1900,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": "Write a long story"}],
            },
        )
    server.wait_for(lambda s: s["aborted_total"] >= before + 1 and s["running"] == 0)


def test_pinned_model_and_stop_leaves_nothing_behind(cache_dir: Path, demo_model: Path) -> None:
    shm_before = shm_entries()
    pinned = str(demo_model)
    with ServerProcess.start(cache_dir, workers=2, args=("--model", pinned)) as srv:
        pids = [p.pid for p in srv.processes()]
        assert len(srv.titled("hfserve: worker")) == 2
        c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == [pinned]
        reply = c.chat.completions.create(
            model=pinned, messages=[{"role": "user", "content": "Hi"}], temperature=0
        )
        assert reply.choices[0].message.content == "Hi there! What can I do for you?"
        # Pinned: any other model, even one that exists, is refused.
        with pytest.raises(openai.NotFoundError) as exc:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert exc.value.body["code"] == "model_not_found"  # type: ignore[index]
        assert srv.stop(signal.SIGTERM) == 0
    time.sleep(0.2)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert shm_entries() - shm_before == set()


def test_worker_sigkill_is_restarted_and_its_requests_aborted(cache_dir: Path, demo_model: Path) -> None:
    with ServerProcess.start(cache_dir, workers=2) as srv:
        # One keep-alive connection: ask which worker it reached, then start a long stream on it.
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = sock.recv(65536).decode()
        index = json.loads(head.split("\r\n\r\n", 1)[1])["worker"]["index"]
        body = (
            b'{"model": "hfserve-demo", "stream": true, "max_tokens": 1900, "ignore_eos": true,'
            b' "messages": [{"role": "user", "content": "Write a long story"}]}'
        )
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b"200 OK" in sock.recv(4096)
        srv.wait_for(lambda s: s["running"] >= 1)
        (victim,) = srv.titled(f"hfserve: worker {index}")
        before = srv.host_status()
        os.kill(victim.pid, signal.SIGKILL)
        sock.close()
        # The supervisor tells the host at once that nobody reads that worker's requests: the
        # stream (seconds of work left) is aborted, not run to its end or until a new worker
        # has started.
        status = srv.wait_for(lambda s: s["running"] == 0)
        assert status["aborted_total"] == before["aborted_total"] + 1, status
        assert status["finished_total"] == before["finished_total"], status
        # And it starts a new worker in its place.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = srv.titled("hfserve: worker")
            if len(workers) == 2 and victim.pid not in [w.pid for w in workers]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the killed worker was not replaced")
        assert f"worker {index} went away: aborted 1 orphaned requests" in srv.log_path.read_text()
        assert status["epoch"] == 1  # the host itself kept running
        c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
        for _ in range(6):  # whichever worker answers
            reply = c.chat.completions.create(
                model=MODEL, temperature=0, messages=[{"role": "user", "content": "Hello!"}]
            )
            assert reply.choices[0].message.content == "Hello! How can I help you today?"
        assert srv.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_startup_exits_cleanly(cache_dir: Path, demo_model: Path, sig: int) -> None:
    # Stopped as soon as the first worker is up, while the host is still loading: the server
    # stops promptly with status 0 (systemd stopping a unit that is still starting) and leaves
    # nothing behind.
    shm_before = shm_entries()
    log = cache_dir / f"early-stop-{sig}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*hfserve_cmd(), "start", "--port", str(free_port()), "--workers", "2"],
            env=server_env(cache_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while b"Worker ready" not in log.read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.02)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        assert proc.wait(60) == 0, log.read_text()  # a loaded machine may take a while
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    time.sleep(0.5)
    assert not [p for p in children if psutil.pid_exists(p.pid) and p.status() != "zombie"]
    assert shm_entries() - shm_before == set()

"""Running as a service: systemd notifications, the unit `hfserve service install` writes, and the
graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import psutil

from tests.server import ServerProcess, free_port, hfserve_cmd, server_env

MODEL = "hfserve-demo"
SHM = Path("/dev/shm")
HELLO = [{"role": "user", "content": "Hello!"}]


def shm_entries() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


class NotifyListener:
    """The service manager's end of the notify protocol: a datagram socket the server writes to.
    When READY=1 arrives, it checks at once what a unit ordered after this one would rely on."""

    def __init__(self, base_url: str, model: str = MODEL) -> None:
        self.dir = tempfile.mkdtemp(prefix="hfn-")  # short: socket paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.base_url = base_url
        self.model = model
        self.messages: list[tuple[float, str]] = []
        self.ready_check: tuple[int, str | None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            for line in data.decode().splitlines():
                self.messages.append((now, line))
                if line == "READY=1" and self.ready_check is None:
                    self.ready_check = self._check_serving()

    def _check_serving(self) -> tuple[int, str | None]:
        health = httpx.get(f"{self.base_url}/health", timeout=10).status_code
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model=self.model, messages=HELLO, temperature=0)  # type: ignore[arg-type]
        return health, reply.choices[0].message.content

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sd_notify_ready_watchdog_and_stopping(cache_dir: Path, demo_model: Path) -> None:
    with notify_server(cache_dir) as (srv, listener):
        _wait(lambda: listener.ready_check is not None, 60, "READY=1")
        # Sent only when it was true: /health 200 and a chat request succeeds at that very moment.
        assert listener.ready_check == (200, "Hello! How can I help you today?")
        assert len(listener.lines("READY=1")) == 1
        ready_at = listener.lines("READY=1")[0][0]
        statuses = [m for t, m in listener.lines("STATUS=") if t <= ready_at]
        assert statuses and statuses[0].startswith("STATUS=loading hfserve-demo"), listener.messages
        assert listener.lines("STATUS=serving 1 model"), listener.messages

        # WATCHDOG=1 every half WATCHDOG_USEC (1 s here): polled until five have come, not slept
        # for; their gaps say how often they come.
        def pings_after_ready() -> list[float]:
            return [t for t, _ in listener.lines("WATCHDOG=1") if t > ready_at]

        _wait(lambda: len(pings_after_ready()) >= 5, 10, "five watchdog pings")
        pings = pings_after_ready()
        assert len(pings) >= 4, listener.messages
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert 0.35 <= statistics.median(gaps) <= 0.8, gaps

        # A frozen host stops beating: the pings stop (systemd would restart the service); they
        # come back when it thaws.
        (host,) = srv.titled("hfserve: model-host")
        os.kill(host.pid, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            time.sleep(6.0)
            late = [t for t, _ in listener.lines("WATCHDOG=1") if t > frozen_at + 3.5]
            assert late == [], f"pings while the host was frozen: {late}"
        finally:
            os.kill(host.pid, signal.SIGCONT)
        thawed_at = time.monotonic()
        _wait(lambda: any(t > thawed_at for t, _ in listener.lines("WATCHDOG=1")), 10, "pings again")

        stop_at = time.monotonic()
        assert srv.stop(signal.SIGTERM) == 0
        stopping = [t for t, _ in listener.lines("STOPPING=1")]
        assert len(stopping) == 1 and stopping[0] >= stop_at


@contextmanager
def notify_server(
    cache_dir: Path,
    workers: int = 2,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    model: str = MODEL,
) -> Iterator[tuple[ServerProcess, NotifyListener]]:
    """A server whose NOTIFY_SOCKET is a listener's socket, with WATCHDOG_USEC 1 s. Not waited for:
    the listener must see the start."""
    port = free_port()
    listener = NotifyListener(f"http://127.0.0.1:{port}", model)
    env = {**(env or {}), "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"}
    log = Path(tempfile.mkstemp(prefix="hfserve-test-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*hfserve_cmd(), "start", "--port", str(port), "--workers", str(workers), *args],
            env={**server_env(cache_dir), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    srv = ServerProcess(proc, port, log)
    try:
        yield srv, listener
    finally:
        srv.stop()
        srv.kill_leftovers()
        listener.close()


# -- the drain ---------------------------------------------------------------------------------
STREAM_TOKENS = 600


async def _stream(client: httpx.AsyncClient, started: asyncio.Event, counter: list[int]) -> dict[str, object]:
    """One long stream; returns what a client saw: content chunks, finish reason, errors, [DONE]."""
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": STREAM_TOKENS,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a long story"}],
    }
    seen: dict[str, object] = {"chunks": 0, "finish": None, "errors": [], "done": False}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        seen["status"] = resp.status_code
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                seen["done"] = True
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                seen["errors"].append(event["error"])  # type: ignore[attr-defined]
                continue
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    seen["chunks"] = int(seen["chunks"]) + 1  # type: ignore[call-overload]
                    if seen["chunks"] == 1:
                        counter[0] += 1
                        if counter[0] == 16:
                            started.set()
                if choice["finish_reason"]:
                    seen["finish"] = choice["finish_reason"]
    seen["ended_at"] = time.monotonic()
    return seen


async def _drain_run(srv: ServerProcess, n: int = 16) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """n streams in flight, then SIGTERM, then a new request and a health check during the drain."""
    started = asyncio.Event()
    counter = [0]
    during: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
        tasks = [asyncio.create_task(_stream(client, started, counter)) for _ in range(n)]
        await asyncio.wait_for(started.wait(), 120)
        srv.proc.send_signal(signal.SIGTERM)
        during["signal_at"] = time.monotonic()
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=30) as fresh:  # a new connection
            deadline = time.monotonic() + 10
            while True:  # the signal takes a moment to reach the workers
                late = await fresh.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
                if late.status_code != 200 or time.monotonic() > deadline:
                    break
            during["late"] = (late.status_code, late.headers.get("retry-after"), late.json())
            during["late_at"] = time.monotonic()
            health = await fresh.get("/health")
            during["health"] = (health.status_code, health.json()["status"])
        results = await asyncio.gather(*tasks)
    return list(results), during


def test_sigterm_drains_streams_in_flight(cache_dir: Path, demo_model: Path) -> None:
    shm_before = shm_entries()
    with ServerProcess.start(cache_dir, workers=4, args=("--drain-timeout-s", "120")) as srv:
        pids = [p.pid for p in srv.processes()]
        results, during = asyncio.run(_drain_run(srv))
        code = srv.proc.wait(60)
        log = srv.log_text()
    assert code == 0, log[-3000:]
    # A request that arrives during the drain: 503, an OpenAI error object, and when to retry.
    status, retry_after, body = during["late"]
    assert status == 503 and retry_after is not None and int(retry_after) >= 1, during
    assert body["error"]["code"] == "server_shutting_down" and body["error"]["type"] == "server_error"
    assert during["health"] == (503, "draining")
    # It came while the streams still ran, and every one of them finished normally afterwards.
    assert any(r["ended_at"] > during["late_at"] for r in results)
    for r in results:
        assert r["status"] == 200 and r["errors"] == [] and r["done"], r
        assert r["finish"] == "length", r
    time.sleep(0.3)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert shm_entries() - shm_before == set()


def test_drain_timeout_ends_the_rest_with_an_error_event(cache_dir: Path, demo_model: Path) -> None:
    with ServerProcess.start(cache_dir, workers=2, args=("--drain-timeout-s", "1")) as srv:
        socks = [_raw_stream(srv) for _ in range(3)]
        srv.wait_for(lambda s: s["running"] >= 3)
        sent_at = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        received = [_read_to_end(s) for s in socks]
        ended_after_s = time.monotonic() - sent_at
        assert srv.proc.wait(60) == 0, srv.log_text()[-3000:]
    assert ended_after_s < 15
    for raw in received:
        assert b'"error"' in raw and b"shut down" in raw, raw[-500:]
        assert raw.rstrip().endswith(b"data: [DONE]"), raw[-500:]


def _raw_stream(srv: ServerProcess) -> socket.socket:
    body = (
        b'{"model": "hfserve-demo", "stream": true, "max_tokens": 1900, "ignore_eos": true,'
        b' "messages": [{"role": "user", "content": "Write a long story"}]}'
    )
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(60)
    received = b""
    while b"data: [DONE]" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    # Chunked transfer encoding: keep the event text, drop the chunk sizes.
    return b"\n".join(line for line in received.split(b"\r\n") if not _is_hex(line))


def _is_hex(line: bytes) -> bool:
    try:
        int(line, 16)
    except ValueError:
        return False
    return True


def test_ctrl_c_to_the_whole_group_drains_too(cache_dir: Path, demo_model: Path) -> None:
    # A terminal's Ctrl-C sends SIGINT to every process of the group: only the main process acts
    # on it, so the host and the workers keep serving the stream until the drain is over.
    with ServerProcess.start(cache_dir, workers=2) as srv:
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": 600,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a long story"}],
        }
        events: list[str] = []
        with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break  # generating
            os.killpg(srv.proc.pid, signal.SIGINT)
            events = [line for line in lines if line.startswith("data: ")]
        assert srv.proc.wait(60) == 0, srv.log_text()[-3000:]
    assert events[-1] == "data: [DONE]"
    assert not any('"error"' in e for e in events), [e for e in events if "error" in e]
    finishes = [orjson.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] == "length"


def test_sigterm_waits_for_a_background_response(cache_dir: Path, demo_model: Path, tmp_path: Path) -> None:
    """A background /v1/responses run is the only work in flight (its HTTP request answered long
    ago): the drain waits for it, and it is stored complete, not cut off."""
    from sanic_serve.responses.store import ResponseStore

    db = tmp_path / "responses.sqlite3"
    args = ("--responses-db", str(db), "--drain-timeout-s", "180")
    with ServerProcess.start(cache_dir, workers=1, args=args) as srv:
        body = {
            "model": MODEL,
            "input": "Write a long story",
            "max_output_tokens": 1500,  # seconds of work: it cannot end before the freeze below
            "ignore_eos": True,
            "background": True,
        }
        (host,) = srv.titled("hfserve: model-host")  # looked up first: it takes a while
        queued = httpx.post(f"{srv.base_url}/v1/responses", json=body, timeout=60)
        assert queued.status_code == 200, queued.text
        response_id = queued.json()["id"]
        srv.wait_for(lambda s: s["running"] >= 1, 60)  # generating, with no request open
        # Freeze the host so the run cannot finish before the stop begins (the demo model makes a
        # token in a few ms on a quiet machine); it thaws once the drain has counted it.
        os.kill(host.pid, signal.SIGSTOP)
        try:
            retrieved = httpx.get(f"{srv.base_url}/v1/responses/{response_id}", timeout=30)
            assert retrieved.json()["status"] == "in_progress", retrieved.text
            srv.proc.send_signal(signal.SIGTERM)
            # At least the run: the retrieval may still count, its answer sent before its handler
            # returned (an exact "1" failed that way on a loaded machine).
            _wait(lambda: "stopping: draining " in srv.log_text(), 60, "the drain to count the run")
        finally:
            os.kill(host.pid, signal.SIGCONT)
        assert srv.proc.wait(180) == 0  # a busy machine may take a while for 1500 tokens
    store = ResponseStore(db, max_bytes=64 * 1024 * 1024)
    try:
        stored = store.get(response_id)
    finally:
        store.close()
    assert stored is not None
    assert stored["status"] == "incomplete", stored["status"]  # max_output_tokens reached: ran to its end
    assert stored["incomplete_details"] == {"reason": "max_output_tokens"}
    assert stored["usage"]["output_tokens"] == 1500

"""Running as a service: systemd notifications, the unit `hfserve service install` writes, and the
graceful drain on SIGTERM."""

from __future__ import annotations

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

import httpx
import openai

from tests.server import ServerProcess, free_port, hfserve_cmd, server_env

MODEL = "hfserve-demo"
SHM = Path("/dev/shm")
HELLO = [{"role": "user", "content": "Hello!"}]


def shm_entries() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


class NotifyListener:
    """The service manager's end of the notify protocol: a datagram socket the server writes to.
    When READY=1 arrives, it checks at once what a unit ordered after this one would rely on."""

    def __init__(self, base_url: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="hfn-")  # short: socket paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.base_url = base_url
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
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0)  # type: ignore[arg-type]
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

        # WATCHDOG=1 every half WATCHDOG_USEC (1 s here).
        time.sleep(3.0)
        pings = [t for t, _ in listener.lines("WATCHDOG=1") if t > ready_at]
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
def notify_server(cache_dir: Path) -> Iterator[tuple[ServerProcess, NotifyListener]]:
    """A 2-worker server whose NOTIFY_SOCKET is a listener's socket, with WATCHDOG_USEC 1 s. Not
    waited for: the listener must see the start."""
    port = free_port()
    listener = NotifyListener(f"http://127.0.0.1:{port}")
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"}
    log = Path(tempfile.mkstemp(prefix="hfserve-test-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*hfserve_cmd(), "start", "--port", str(port), "--workers", "2"],
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

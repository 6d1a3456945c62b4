"""Start and stop a real ``hfserve start`` in a subprocess, on a free port of 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0


def venv_script(name: str) -> str:
    """A console script of this Python's environment, found even when it is not on PATH."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name) or name


def hfserve_cmd() -> list[str]:
    exe = venv_script("hfserve")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "cli.main"]


def model_with_template(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of the model folder ``src`` whose chat template is ``edit(old_template)``."""
    shutil.copytree(src, dst)
    template = dst / "chat_template.jinja"
    new = edit(template.read_text())
    assert new != template.read_text(), "the template edit changed nothing"
    template.write_text(new)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HFSERVE_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"})
    return env


def build_demo_model(cache_dir: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "model_host.demo", str(cache_dir)],
        env=server_env(cache_dir),
        stdout=subprocess.PIPE,
        check=True,
        text=True,
        timeout=600,
    )
    return Path(out.stdout.strip().splitlines()[-1])


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"
        # Sent on /health when set: with API keys configured, only a request with a key sees the
        # host's status (``host_status``, ``wait_for``).
        self.api_key: str | None = None

    @classmethod
    @contextmanager
    def start(
        cls,
        cache_dir: Path,
        workers: int = 1,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Iterator[ServerProcess]:
        port = free_port()
        log = Path(tempfile.mkstemp(prefix="hfserve-test-", suffix=".log")[1])
        cmd = [*hfserve_cmd(), "start", "--port", str(port), "--workers", str(workers), *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                env={**server_env(cache_dir), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        srv = cls(proc, port, log)
        try:
            srv.wait_healthy(START_TIMEOUT_S)
            yield srv
        finally:
            srv.stop()
            srv.kill_leftovers()

    # -- state -----------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.get(f"{self.base_url}/health", timeout=5.0, headers=headers)

    def host_status(self) -> dict[str, Any]:
        return dict(self.health().json()["host"])

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_text()[-4000:]}")
            try:
                if self.health().status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout_s} s:\n{self.log_text()[-4000:]}")

    def wait_for(self, predicate: Any, timeout_s: float = 20.0) -> dict[str, Any]:
        """Poll the host status until ``predicate(status)`` holds; returns that status."""
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = self.host_status()
                if predicate(status):
                    return status
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"condition not met in {timeout_s} s; last status {status}")

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def titled(self, title: str) -> list[psutil.Process]:
        found = []
        for p in self.processes():
            try:
                if title in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                continue
        return found

    # -- shutdown --------------------------------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


async def stream_chat_text(client: Any, prompt: str, **kwargs: Any) -> str:
    """Stream one chat completion with an ``openai.AsyncOpenAI`` client; returns its text."""
    parts = []
    async for chunk in await client.chat.completions.create(
        messages=[{"role": "user", "content": prompt}], stream=True, **kwargs
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)

"""Real MCP servers for the tests (``tests/mcp_counting_server.py`` in a subprocess), and servers
that misbehave: one that accepts connections and never answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.server import free_port

COUNTING_SERVER = Path(__file__).with_name("mcp_counting_server.py")
START_TIMEOUT_S = 60.0


def stdio_spec(call_log: Path) -> dict[str, Any]:
    """An ``mcpServers`` entry that runs the counting server over stdio."""
    return {
        "command": sys.executable,
        "args": [str(COUNTING_SERVER), "stdio"],
        "env": {"MCP_CALL_LOG": str(call_log)},
    }


@contextmanager
def counting_server(call_log: Path, transport: str = "http") -> Iterator[str]:
    """The counting server over ``http`` (streamable HTTP) or ``sse``; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(COUNTING_SERVER), transport, str(port)],
        env={**os.environ, "MCP_CALL_LOG": str(call_log)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the MCP test server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/{'sse' if transport == 'sse' else 'mcp'}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections, reads, and never answers: an MCP server that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/mcp"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        listener.close()


def closed_port_url() -> str:
    """A URL where nothing listens: an MCP server that is down."""
    return f"http://127.0.0.1:{free_port()}/mcp"


def read_calls(call_log: Path) -> list[dict[str, Any]]:
    if not call_log.exists():
        return []
    return [json.loads(line) for line in call_log.read_text().splitlines() if line.strip()]

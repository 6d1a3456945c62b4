"""Raw-socket abuse: requests cut short, stalled, dribbled or oversized, below what an HTTP client
library would ever send."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

HOST = "127.0.0.1"


def request_head(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: hostile"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def exchange(port: int, data: bytes, *, read_timeout_s: float = 10.0, half_close: bool = False) -> bytes:
    """Send ``data`` and read until the server closes or ``read_timeout_s`` passes."""
    with socket.create_connection((HOST, port), timeout=read_timeout_s) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_until_closed(s, read_timeout_s)


def read_until_closed(s: socket.socket, timeout_s: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
        if _complete(out):
            break
    return out


def _complete(raw: bytes) -> bool:
    """A whole response with a Content-Length has arrived (the connection may stay open)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def status_of(raw: bytes) -> int | None:
    """The status of the (last non-1xx) response in ``raw``, or None when there is none."""
    status = None
    for part in raw.split(b"HTTP/1.1 ")[1:]:
        code = part[:3]
        if code.isdigit() and not code.startswith(b"1"):
            status = int(code)
    return status


def body_of(raw: bytes) -> Any:
    return json.loads(raw.rpartition(b"\r\n\r\n")[2] or b"null")


async def dribble(port: int, data: bytes, interval_s: float, duration_s: float) -> tuple[bytes, float]:
    """Slowloris: send ``data`` one byte per ``interval_s`` for at most ``duration_s``; returns
    what the server answered and after how long it closed or answered (``duration_s`` if never)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    started = time.monotonic()
    answer = b""
    try:
        for i in range(len(data)):
            if time.monotonic() - started > duration_s:
                break
            try:
                writer.write(data[i : i + 1])
                await writer.drain()
            except (ConnectionError, OSError):
                break
            try:
                answer += await asyncio.wait_for(reader.read(65536), interval_s)
            except TimeoutError:
                continue
            if reader.at_eof() or answer:
                break
        return answer, time.monotonic() - started
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass

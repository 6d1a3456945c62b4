"""A lean streaming POST over plain HTTP/1.1, for the load generator.

A load generator shares the machine with the server it measures; on a small machine every
core-second it spends is taken from the server. Streaming through httpx, ``hfserve bench`` spent
~180 us of CPU per streamed token (2 cores, 32 streams); through this reader, ~50 us: one
connection per request (``Connection: close``), the response read as it comes (chunked or not),
the body handed out line by line. Plain ``http://`` only; ``https://`` goes through httpx.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPResponseError(Exception):
    """The response could not be read as HTTP/1.1."""


class RawStream:
    """One POST's response: ``status``, ``headers``, then :meth:`lines` (or :meth:`read`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}

    async def _head(self) -> None:
        status_line = await self._reader.readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HTTPResponseError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        self.status = int(parts[1])
        while (line := await self._reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def _pieces(self) -> AsyncIterator[bytes]:
        reader = self._reader
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readline()
                try:
                    size = int(size_line.split(b";", 1)[0], 16)
                except ValueError as exc:
                    raise HTTPResponseError(f"bad chunk size {size_line[:40]!r}") from exc
                if size == 0:
                    return
                piece = await reader.readexactly(size + 2)  # the chunk and its CRLF
                yield piece[:-2]
        elif "content-length" in self.headers:
            yield await reader.readexactly(int(self.headers["content-length"]))
        else:  # until the server closes
            while piece := await reader.read(65536):
                yield piece

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines, without their line ends, as they arrive."""
        rest = b""
        async for piece in self._pieces():
            rest += piece
            *complete, rest = rest.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode()
        if rest:
            yield rest.rstrip(b"\r").decode()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self._pieces()])

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


async def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> RawStream:
    """Send ``body`` to ``url`` (``http://`` only) and read the response's head. The caller closes
    the stream."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"not a plain http URL: {url}")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port or 80), timeout_s
    )
    stream = RawStream(reader, writer)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        await asyncio.wait_for(stream._head(), timeout_s)
    except BaseException:
        await stream.close()
        raise
    return stream

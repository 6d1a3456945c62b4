"""A lean streaming POST over plain HTTP/1.1, for the load generator.

A load generator shares the machine with the server it measures; on a small machine every
core-second it spends is taken from the server. Streaming through httpx, ``hfserve bench`` spent
~180 us of CPU per streamed token (2 cores, 32 streams); through this reader, ~50 us: the response
read as it comes (chunked or not), the body handed out line by line, connections kept alive and
reused as a real client's are. Plain ``http://`` only; ``https://`` goes through httpx.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class HTTPResponseError(Exception):
    """The response could not be read as HTTP/1.1."""


class ClosedBeforeAnswer(HTTPResponseError):
    """The server closed the connection without a word (a kept-alive one it had let go)."""


class Pool:
    """Idle keep-alive connections by host and port. A connection goes back only after its
    response was read to the end and the server did not ask to close it."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def connect(self, host: str, port: int, timeout_s: float) -> tuple[_Connection, bool]:
        """A connection, and whether it was reused (a reused one may have been closed by the
        server meanwhile)."""
        idle = self._idle.get((host, port))
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return (reader, writer), True
            writer.close()
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s), False

    def give_back(self, host: str, port: int, conn: _Connection) -> None:
        self._idle.setdefault((host, port), []).append(conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()


class RawStream:
    """One POST's response: ``status``, ``headers``, then :meth:`lines` (or :meth:`read`)."""

    def __init__(self, conn: _Connection, pool: Pool | None, where: tuple[str, int]) -> None:
        (self._reader, self._writer), self._pool, self._where = conn, pool, where
        self.status = 0
        self.headers: dict[str, str] = {}
        self._ended = False  # the body was read to its end

    async def _head(self) -> None:
        status_line = await self._reader.readline()
        if not status_line:
            raise ClosedBeforeAnswer("the server closed the connection before answering")
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
                    while await reader.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._ended = True
                    return
                piece = await reader.readexactly(size + 2)  # the chunk and its CRLF
                yield piece[:-2]
        elif "content-length" in self.headers:
            yield await reader.readexactly(int(self.headers["content-length"]))
            self._ended = True
        else:  # until the server closes: the connection cannot be reused
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
        """Back to the pool when the response was read to its end; closed otherwise."""
        reusable = self._ended and self.headers.get("connection", "").lower() != "close"
        if reusable and self._pool is not None:
            self._pool.give_back(*self._where, (self._reader, self._writer))
            return
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


async def post(
    url: str, body: bytes, headers: dict[str, str], timeout_s: float, pool: Pool | None = None
) -> RawStream:
    """Send ``body`` to ``url`` (``http://`` only) and read the response's head. The caller closes
    the stream. With a ``pool``, the connection is kept alive and reused; without, it is closed."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"not a plain http URL: {url}")
    where = (parts.hostname, parts.port or 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if pool is not None else "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    for attempt in range(2):
        if pool is not None:
            conn, reused = await pool.connect(*where, timeout_s)
        else:
            conn, reused = await asyncio.wait_for(asyncio.open_connection(*where), timeout_s), False
        stream = RawStream(conn, pool, where)
        try:
            conn[1].write(request)
            await conn[1].drain()
            await asyncio.wait_for(stream._head(), timeout_s)
            return stream
        except (ConnectionError, ClosedBeforeAnswer):
            await stream.close()
            if not (reused and attempt == 0):  # a kept-alive one the server let go: once more
                raise
        except BaseException:
            await stream.close()
            raise
    raise AssertionError("unreachable")

"""The load generator's lean HTTP/1.1 reader against a socket server that answers in each of the
body framings (chunked, sized, until close), with lines split across reads, and with errors."""

from __future__ import annotations

import asyncio

import pytest

from cli import sse_http

EVENTS = b'data: {"a": 1}\n\ndata: {"b": "\xc3\xa9"}\r\n\r\ndata: [DONE]\n\n'
LINES = ['data: {"a": 1}', "", 'data: {"b": "é"}', "", "data: [DONE]", ""]


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, at = b"", 0
    for size in sizes:
        piece = body[at : at + size]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        at += size
    return out + b"0\r\n\r\n"


async def _serve(answer: bytes, seen: list[bytes]) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
        )
        seen.append(head + await reader.readexactly(length))
        for i in range(0, len(answer), 7):  # in small writes: lines and chunks cross reads
            writer.write(answer[i : i + 7])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions?x=1"


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(EVENTS, [5, 1, 30, 200]),
        b"Content-Length: %d\r\n\r\n" % len(EVENTS) + EVENTS,
        b"\r\n" + EVENTS,  # until the server closes
    ],
    ids=["chunked", "sized", "until-close"],
)
def test_lines_come_out_whole_whatever_the_framing(framing: bytes) -> None:
    async def run() -> tuple[int, list[str], list[bytes]]:
        seen: list[bytes] = []
        server, url = await _serve(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + framing, seen)
        async with server:
            stream = await sse_http.post(url, b'{"q": 1}', {"Authorization": "Bearer k"}, 10)
            try:
                return stream.status, [line async for line in stream.lines()], seen
            finally:
                await stream.close()

    status, lines, seen = asyncio.run(run())
    assert status == 200
    assert lines == LINES
    request = seen[0]
    assert request.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in request and request.endswith(b'\r\n\r\n{"q": 1}')


def test_an_error_status_and_its_body() -> None:
    body = b'{"error": {"message": "no"}}'

    async def run() -> tuple[int, bytes]:
        answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        server, url = await _serve(answer, [])
        async with server:
            stream = await sse_http.post(url, b"{}", {}, 10)
            try:
                return stream.status, await stream.read()
            finally:
                await stream.close()

    assert asyncio.run(run()) == (401, body)


def test_what_is_not_http_is_an_error() -> None:
    async def run() -> None:
        server, url = await _serve(b"SSH-2.0-OpenSSH\r\n", [])
        async with server:
            await sse_http.post(url, b"{}", {}, 10)

    with pytest.raises(sse_http.HTTPResponseError):
        asyncio.run(run())
    with pytest.raises(ValueError):
        asyncio.run(sse_http.post("https://127.0.0.1/v1", b"{}", {}, 10))


@pytest.mark.parametrize("pause_s", [0.05, 0.0], ids=["closed-while-idle", "closed-as-reused"])
def test_a_pool_keeps_connections_alive_and_replaces_one_the_server_let_go(pause_s: float) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(EVENTS, [9, 200])
    connections: list[int] = []

    async def run(answers_per_connection: int) -> list[list[str]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            for _ in range(answers_per_connection):
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"\r\nConnection: keep-alive\r\n" in head
                await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
                writer.write(answer)
                await writer.drain()
            writer.close()  # as a server's idle timeout would

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
        pool, got = sse_http.Pool(), []
        async with server:
            for _ in range(3):
                stream = await sse_http.post(url, b"{}", {}, 10, pool)
                got.append([line async for line in stream.lines()])
                await stream.close()
                await asyncio.sleep(pause_s)  # 0: the close may come after the next request
            pool.close()
        return got

    assert asyncio.run(run(answers_per_connection=3)) == [LINES] * 3
    assert len(connections) == 1  # one connection served all three
    connections.clear()
    assert asyncio.run(run(answers_per_connection=1)) == [LINES] * 3
    assert len(connections) == 3  # each let go after one answer, and replaced

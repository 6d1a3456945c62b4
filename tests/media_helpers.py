"""Images and a loopback HTTP server for the media tests: real files of each format (made with
Pillow), crafted bad ones (a pixel bomb, a cut PNG), and ``ImageServer``, which serves images,
redirects, endless and slow bodies, and counts every request per path, so a test can say that no
request reached it; ``web_fixture`` gives a test module one of those as its ``web`` fixture, and
``ask_about_images`` asks ``/v1/responses`` about images."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.server import ServerProcess

PROMPT = "What is in the picture?"


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 12), color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def animated_gif(
    frames: tuple[str, ...] = ("red", "blue", "green"), size: tuple[int, int] = (10, 10)
) -> bytes:
    images = [Image.new("RGB", size, c) for c in frames]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    return buf.getvalue()


def noise_png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """A PNG that does not compress much (random pixels): a byte-size test's image."""
    import random

    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` grey pixels (10 G by default), with a small
    deflate stream of zero rows behind it: decoding it whole would take gigabytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compressobj(9)
    data = rows.compress(b"\x00" * (width + 1) * 64) + rows.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def truncated_png() -> bytes:
    whole = noise_png((64, 64))
    return whole[: len(whole) // 2]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def input_image(url: str) -> dict[str, Any]:
    """A Responses ``input_image`` content part."""
    return {"type": "input_image", "image_url": url}


def ask_about_images(
    server: ServerProcess, model: str | Path, *parts: dict[str, Any], timeout_s: float, **options: Any
) -> httpx.Response:
    """``/v1/responses`` with one user turn: ``PROMPT`` and then ``parts``; ``options`` (such as
    ``max_output_tokens``) join the body."""
    content = [{"type": "input_text", "text": PROMPT}, *parts]
    body = {"model": str(model), "input": [{"role": "user", "content": content}], **options}
    return httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=timeout_s)


Route = Callable[[BaseHTTPRequestHandler], None]


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 with routes set per test; ``hits`` counts requests by path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path = self.path.split("?", 1)[0]
                server.hits[path] += 1
                route = server.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- routes --------------------------------------------------------------------------------
    def image(self, path: str, data: bytes, content_type: str = "image/png") -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)

        self.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route
        return self.url(path)

    def endless(self, path: str, chunk_bytes: int = 64 * 1024, declare_bytes: int | None = None) -> str:
        """A body that never ends (or declares ``declare_bytes`` and sends more than the reader takes);
        ``sent[path]`` counts the bytes written before the reader hung up."""

        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            if declare_bytes is not None:
                h.send_header("Content-Length", str(declare_bytes))
            h.end_headers()
            chunk = b"\x89PNG" + b"\x00" * (chunk_bytes - 4)
            try:
                for _ in range(100_000):
                    h.wfile.write(chunk)
                    self.sent[path] += len(chunk)
            except OSError:
                pass

        self.sent: Counter[str] = getattr(self, "sent", Counter())
        self.routes[path] = route
        return self.url(path)

    def slow(self, path: str, delay_s: float) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            time.sleep(delay_s)
            try:
                h.send_response(200)
                h.end_headers()
            except OSError:
                pass

        self.routes[path] = route
        return self.url(path)

    def gzipped(self, path: str, data: bytes) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            body = zlib.compress(data)
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Encoding", "deflate")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        self.routes[path] = route
        return self.url(path)


@pytest.fixture(scope="module", name="web")
def web_fixture() -> Iterator[ImageServer]:
    """The ``web`` fixture of each test module that imports this: one ``ImageServer`` per module."""
    server = ImageServer()
    yield server
    server.close()

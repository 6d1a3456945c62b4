"""The media module on its own (no hfserve server): every way ``load_image`` refuses an image, and
the images it takes. Remote fetching runs against a real HTTP server on loopback that counts its
requests; where a test needs a public address, a stand-in resolver names one and a stand-in dialler
sends that address's connections to the loopback server (the rest of the fetch, redirects and
policy included, is the real code)."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import time
from pathlib import Path
from typing import Any

import httpcore2
import pytest

from sanic_serve.errors import APIError
from sanic_serve.mcp.policy import GuardedBackend, IPAddress
from sanic_serve.media import ImageTooLarge, MediaPolicy, load_image
from tests.media_helpers import (
    ImageServer,
    animated_gif,
    bomb_png,
    data_url,
    image_bytes,
    noise_png,
    truncated_png,
    web_fixture,  # noqa: F401 - the module's ``web`` fixture
)

PARAM = "messages[1].content[0].image_url"
REMOTE = MediaPolicy(allow_remote=True, fetch_timeout_s=5.0)
PUBLIC = "93.184.215.14"  # a global address no test ever reaches: the stand-in dialler reroutes it


def load(url: str, policy: MediaPolicy = MediaPolicy(), backend: Any = None) -> Any:
    return asyncio.run(load_image(url, PARAM, policy, backend=backend))


def refused(
    url: str, policy: MediaPolicy = MediaPolicy(), backend: Any = None, status: int = 400
) -> APIError:
    with pytest.raises(APIError) as info:
        load(url, policy, backend)
    err = info.value
    assert err.status == status, err.body()
    assert err.param == PARAM
    body = err.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]
    assert "Traceback" not in body["message"] and "Errno" not in body["message"]
    return err


class StandIn(httpcore2.AsyncNetworkBackend):
    """Dials ``PUBLIC`` at the loopback server (as if the Internet's host were it); anything else
    as asked. Records every address dialled."""

    def __init__(self) -> None:
        self.inner = httpcore2.AnyIOBackend()
        self.dialled: list[str] = []

    async def connect_tcp(self, host: str, port: int, **kwargs: Any) -> httpcore2.AsyncNetworkStream:
        self.dialled.append(host)
        return await self.inner.connect_tcp("127.0.0.1" if host == PUBLIC else host, port, **kwargs)

    async def connect_unix_socket(self, path: str, **kwargs: Any) -> httpcore2.AsyncNetworkStream:
        raise AssertionError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


NAMES = {"images.example": PUBLIC, "rebind.example": "127.0.0.1", "meta.example": "169.254.169.254"}


async def fake_resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    if host not in NAMES:
        raise OSError("no such name")
    return [ipaddress.ip_address(NAMES[host])]


def backend(policy: MediaPolicy) -> tuple[GuardedBackend, StandIn]:
    dialler = StandIn()
    return GuardedBackend(policy.outbound(), resolver=fake_resolve, inner=dialler), dialler


# -- what is taken ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_each_format_is_taken_as_its_own_bytes(fmt: str, mime: str) -> None:
    data = image_bytes(fmt)
    image = load(data_url(data, mime))
    assert image.data == data and image.digest == hashlib.sha256(data).digest()


def test_an_animated_gif_is_taken_with_its_first_frame_checked() -> None:
    data = animated_gif()
    assert load(data_url(data, "image/gif")).data == data


def test_a_mislabelled_image_is_judged_by_its_bytes() -> None:
    data = image_bytes("JPEG")
    assert load(data_url(data, "image/png")).data == data


# -- bytes that are no image -----------------------------------------------------------------------
def test_a_pixel_bomb_is_refused_from_its_header() -> None:
    start = time.monotonic()
    err = refused(data_url(bomb_png()))
    assert "100000 x 100000" in err.message and time.monotonic() - start < 2.0
    # the operator's limit decides, whatever Pillow's own default is
    err = refused(data_url(image_bytes("PNG", (40, 30))), MediaPolicy(max_image_pixels=1000))
    assert "40 x 30" in err.message
    assert load(data_url(image_bytes("PNG", (40, 25))), MediaPolicy(max_image_pixels=1000))


def test_a_truncated_png_is_refused() -> None:
    assert "truncated" in refused(data_url(truncated_png())).message


@pytest.mark.parametrize(
    "data", [b"hello, this is text", b"%PDF-1.4\n1 0 obj", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a"]
)
def test_a_non_image_with_an_image_type_is_refused(data: bytes) -> None:
    assert refused(data_url(data)).code == "invalid_image"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO", "PPM"])
def test_other_image_formats_are_refused(fmt: str) -> None:
    refused(data_url(image_bytes(fmt), "image/png"))


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64",  # no comma
        "data:image/png," + "abc",  # not base64
        "data:text/plain;base64,aGVsbG8=",
        "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=",
        "data:image/png;base64,***notbase64***",
        "data:image/png;base64,",
        "",
        "   ",
    ],
)
def test_malformed_data_urls_are_refused(url: str) -> None:
    refused(url)


def test_an_oversized_data_url_is_a_413_before_decoding() -> None:
    data = noise_png((128, 128))
    policy = MediaPolicy(max_image_bytes=len(data) - 1)
    err = refused(data_url(data), policy, status=413)
    assert isinstance(err, ImageTooLarge) and err.code == "image_too_large"
    assert load(data_url(data), MediaPolicy(max_image_bytes=len(data))).data == data
    # A body far over the limit is refused from its length alone (no base64 decode of 40 MB).
    start = time.monotonic()
    refused(
        "data:image/png;base64," + "A" * (40 * 1024 * 1024), MediaPolicy(max_image_bytes=1024), status=413
    )
    assert time.monotonic() - start < 1.0


# -- schemes and local files -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)", "blob:abc", "ws://x/y"]
)
def test_other_schemes_are_refused(url: str) -> None:
    assert refused(url, REMOTE).code == "image_url_refused"


@pytest.mark.parametrize(
    "url",
    [
        "http://a..b/x.png",  # an empty label: the resolver's IDNA codec fails on it
        "http://" + "a" * 70 + ".example/x.png",  # a label over 63 characters
        "http://exa\x00mple.com/x.png",
        "http://ex\tample.com/x.png",
        "http://\u2028/x.png",
        "https://\ud800.example/x.png",
    ],
)
def test_urls_the_client_or_resolver_cannot_take_are_400s(url: str) -> None:
    err = refused(url, REMOTE)
    assert err.code == "image_url_refused" and err.message == "The image URL is not a valid URL."


def test_a_redirect_to_an_invalid_url_is_a_400(web: ImageServer) -> None:
    policy = MediaPolicy(allow_remote=True, allow_private=True)
    web.redirect("/to-invalid", "http://a..b/x.png")
    assert refused(web.url("/to-invalid"), policy).message == "The image URL is not a valid URL."


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "/etc/passwd", "../../etc/passwd", "file://localhost/etc/hosts"]
)
def test_local_files_are_refused_without_a_media_root(url: str) -> None:
    assert "--media-root" in refused(url, REMOTE).message


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "media" / "sub").mkdir(parents=True)
    (tmp_path / "media" / "sub" / "cat.png").write_bytes(image_bytes("PNG"))
    (tmp_path / "secret.png").write_bytes(image_bytes("PNG"))
    return tmp_path / "media"


def test_files_under_the_media_root_are_read(root: Path) -> None:
    policy = MediaPolicy(media_root=str(root))
    expected = image_bytes("PNG")
    for url in (
        "sub/cat.png",
        str(root / "sub" / "cat.png"),
        f"file://{root}/sub/cat.png",
        "sub/../sub/cat.png",
    ):
        assert load(url, policy).data == expected, url


def test_media_root_escapes_are_refused(root: Path) -> None:
    policy = MediaPolicy(media_root=str(root))
    (root / "out.png").symlink_to(root.parent / "secret.png")
    (root / "outdir").symlink_to(root.parent)
    for url in (
        "file:///etc/passwd",
        "/etc/passwd",
        "../secret.png",
        "sub/../../secret.png",
        f"file://{root}/../secret.png",
        "out.png",  # a symlink in the root to a file outside it
        "outdir/secret.png",  # through a symlinked folder
        "file://otherhost/sub/cat.png",
    ):
        assert refused(url, policy).code == "image_url_refused", url
    # whether a path outside the root exists is not told
    assert refused("../nothing.png", policy).message == refused("../secret.png", policy).message


def test_special_files_under_the_root_are_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe.png")
    policy = MediaPolicy(media_root=str(root))
    start = time.monotonic()
    refused("pipe.png", policy)
    refused("sub", policy)  # a folder
    refused("missing.png", policy)
    assert time.monotonic() - start < 2.0


def test_an_oversized_local_file_is_a_413(root: Path) -> None:
    data = noise_png((64, 64))
    (root / "big.png").write_bytes(data)
    refused("big.png", MediaPolicy(media_root=str(root), max_image_bytes=len(data) - 1), status=413)


# -- remote URLs -----------------------------------------------------------------------------------
def test_remote_urls_are_refused_unless_allowed(web: ImageServer) -> None:
    url = web.image("/off.png", image_bytes("PNG"))
    assert "--allow-remote-media" in refused(url).message
    assert web.hits["/off.png"] == 0


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1.2.3",
        "localhost",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "[::1]",
        "[fe80::1]",
        "[fc00::1]",
        "[::]",
        "[ff02::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:10.0.0.1]",
        "[::ffff:169.254.169.254]",
    ],
)
def test_non_public_addresses_are_refused_without_a_request(web: ImageServer, host: str) -> None:
    path = f"/private-{host.strip('[]').replace(':', '_')}.png"
    web.image(path, image_bytes("PNG"))
    err = refused(f"http://{host}:{web.port}{path}", REMOTE)
    assert err.code == "image_url_refused" and "--allow-private-media" in err.message
    assert web.hits[path] == 0


def test_a_name_resolving_to_loopback_is_refused_without_a_request(web: ImageServer) -> None:
    web.image("/byname.png", image_bytes("PNG"))
    guarded, dialled = backend(REMOTE)
    refused(web.url("/byname.png", host="rebind.example"), REMOTE, guarded)
    refused(web.url("/byname.png", host="localhost"), REMOTE)  # the real resolver
    assert web.hits["/byname.png"] == 0 and dialled.dialled == []


def test_a_public_url_is_fetched(web: ImageServer) -> None:
    data = image_bytes("WEBP")
    web.image("/public.webp", data, "image/webp")
    guarded, dialled = backend(REMOTE)
    assert load(web.url("/public.webp", host="images.example"), REMOTE, guarded).data == data
    assert dialled.dialled == [PUBLIC]


@pytest.mark.parametrize(
    ("target", "what"),
    [
        ("http://127.0.0.1:{port}/inner.png", "loopback literal"),
        ("http://rebind.example:{port}/inner.png", "name resolving to loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/inner.png", "IPv4-mapped IPv6"),
        ("http://meta.example/latest/meta-data", "cloud metadata by name"),
        ("file:///etc/passwd", "file URL"),
    ],
)
def test_a_public_url_redirecting_to_a_private_one_is_refused_at_the_hop(
    web: ImageServer, target: str, what: str
) -> None:
    web.image("/inner.png", image_bytes("PNG"))
    before = web.hits["/inner.png"]
    path = f"/hop-{abs(hash(what))}"
    web.redirect(path, target.format(port=web.port))
    guarded, dialled = backend(REMOTE)
    err = refused(web.url(path, host="images.example"), REMOTE, guarded)
    assert err.code == "image_url_refused", what
    assert web.hits[path] == 1  # the first hop was made...
    assert web.hits["/inner.png"] == before  # ...and nothing reached the private target
    assert dialled.dialled == [PUBLIC]


def test_relative_and_chained_redirects_are_followed_up_to_the_limit(web: ImageServer) -> None:
    data = image_bytes("GIF")
    web.image("/final.gif", data, "image/gif")
    web.redirect("/r1", "/r2", 301)
    web.redirect("/r2", f"http://images.example:{web.port}/final.gif", 307)
    guarded, _ = backend(REMOTE)
    assert load(web.url("/r1", host="images.example"), REMOTE, guarded).data == data
    for i in range(7):
        web.redirect(f"/loop{i}", f"/loop{i + 1}")
    guarded, _ = backend(REMOTE)
    assert "redirects more than" in refused(web.url("/loop0", host="images.example"), REMOTE, guarded).message
    assert web.hits["/loop6"] == 0


def test_the_host_allow_list_is_checked_at_every_hop(web: ImageServer) -> None:
    data = image_bytes("PNG")
    web.image("/listed.png", data)
    web.redirect("/to-unlisted", f"http://localhost:{web.port}/listed.png")
    policy = MediaPolicy(allow_remote=True, allow_private=True, allow_hosts=("127.0.0.1",))
    assert load(web.url("/listed.png"), policy).data == data
    hits = web.hits["/listed.png"]
    assert "not among the hosts" in refused(web.url("/to-unlisted"), policy).message
    assert web.hits["/listed.png"] == hits
    refused(web.url("/listed.png", host="localhost"), policy)


def test_a_body_over_the_cap_is_cut_off_while_streaming(web: ImageServer) -> None:
    policy = MediaPolicy(allow_remote=True, allow_private=True, max_image_bytes=256 * 1024)
    start = time.monotonic()
    err = refused(web.endless("/endless"), policy, status=413)
    assert err.code == "image_too_large" and time.monotonic() - start < 5.0
    time.sleep(0.2)
    assert web.sent["/endless"] < 64 * 1024 * 1024  # far less than the 6 GB the route would send
    # a declared length over the cap is refused before the body is read
    refused(web.endless("/declared", declare_bytes=10**9), policy, status=413)


def test_a_slow_server_runs_into_the_whole_fetch_deadline(web: ImageServer) -> None:
    policy = MediaPolicy(allow_remote=True, allow_private=True, fetch_timeout_s=0.5)
    start = time.monotonic()
    err = refused(web.slow("/slow", 3.0), policy)
    assert err.code == "image_fetch_failed" and time.monotonic() - start < 2.5


def test_http_errors_and_compressed_bodies_are_400s(web: ImageServer) -> None:
    policy = MediaPolicy(allow_remote=True, allow_private=True)
    assert "404" in refused(web.url("/nothing-here"), policy).message
    refused(web.gzipped("/deflated.png", image_bytes("PNG")), policy)
    refused(f"http://127.0.0.1:{_closed_port()}/x.png", policy)  # connection refused: still a 400
    refused("http://user:pw@example.com/x.png", REMOTE)
    refused("http://no-such-name.invalid/x.png", REMOTE)


def test_a_fetched_non_image_is_refused(web: ImageServer) -> None:
    policy = MediaPolicy(allow_remote=True, allow_private=True)
    refused(web.image("/fake.png", b"<html>not an image</html>"), policy)
    refused(web.image("/bomb.png", bomb_png()), policy)
    refused(web.image("/cut.png", truncated_png()), policy)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_too_many_images_is_a_400_naming_the_field() -> None:
    policy = MediaPolicy(max_images_per_request=2)
    policy.check_count(2, "messages")
    with pytest.raises(APIError) as info:
        policy.check_count(3, "messages")
    assert (
        info.value.status == 400 and info.value.param == "messages" and info.value.code == "too_many_images"
    )

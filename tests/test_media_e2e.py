"""Images end to end against a real ``hfserve start --allow-remote-media`` (private addresses not
allowed, small byte and pixel limits): every refusal is a 400 naming the part (a 413 over the byte
limit), no request reaches a loopback server that counts its hits, and the server keeps serving.

The refusals of the media policy run in the HTTP worker before the model host is asked anything,
so they are asked of a folder the worker reads as a vision-language model: the demo model's
tokenizer and template beside a ``vision_config`` and an image processor's config. No request in
this module reaches the host with that folder (it has no vision weights); the text-only refusals use
the demo model itself. A public-looking URL that redirects to loopback cannot be served here without
the Internet: the redirect re-check is tested in ``test_media_units.py`` with a stand-in resolver."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.media_helpers import (
    ImageServer,
    ask_about_images,
    bomb_png,
    data_url,
    image_bytes,
    input_image,
    noise_png,
    truncated_png,
    web_fixture,  # noqa: F401 - the module's ``web`` fixture
)
from tests.server import ServerProcess

MAX_IMAGE_MB = 0.05  # 52 KB: an oversized image is cheap to send
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def vision_folder(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vision") / "tiny-vision"
    shutil.copytree(demo_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"] = {"model_type": "siglip_vision_model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor"})
    )
    return folder


@pytest.fixture(scope="module")
def media_server(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    args = ("--allow-remote-media", "--max-image-mb", str(MAX_IMAGE_MB), "--media-timeout-s", "5")
    with ServerProcess.start(cache_dir, workers=1, args=args) as srv:
        yield srv


respond = partial(ask_about_images, timeout_s=TIMEOUT_S, max_output_tokens=4)


def refused(reply: httpx.Response, param: str, status: int = 400) -> dict[str, Any]:
    assert reply.status_code == status, reply.text[:500]
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert error["message"] and "Traceback" not in error["message"] and "Errno" not in error["message"]
    return dict(error)


def still_serving(server: ServerProcess) -> None:
    reply = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": "hfserve-demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 3},
        timeout=TIMEOUT_S,
    )
    assert reply.status_code == 200, reply.text


def test_models_say_what_they_read(media_server: ServerProcess) -> None:
    listing = httpx.get(f"{media_server.base_url}/v1/models", timeout=TIMEOUT_S).json()
    assert [m["input_modalities"] for m in listing["data"]] == [["text"]]


def test_a_text_model_refuses_images_naming_the_part(media_server: ServerProcess, web: ImageServer) -> None:
    url = web.image("/text-model.png", image_bytes("PNG"))
    error = refused(
        respond(media_server, "hfserve-demo", input_image(data_url(image_bytes("PNG")))),
        "input[0].content[1]",
    )
    assert "takes no images" in error["message"] and error["code"] == "unsupported_content_type"
    body = {
        "model": "hfserve-demo",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look"},
                    {"type": "image", "source": {"type": "url", "url": url}},
                ],
            }
        ],
    }
    reply = httpx.post(f"{media_server.base_url}/v1/messages", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 400 and reply.json()["type"] == "error", reply.text
    assert reply.json()["error"]["message"].startswith("messages.0.content.1: ")
    assert web.hits["/text-model.png"] == 0


def test_urls_to_loopback_are_refused_without_a_request(
    media_server: ServerProcess, web: ImageServer, vision_folder: Path
) -> None:
    web.image("/cat.png", image_bytes("PNG"))
    model = str(vision_folder)
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.0.0.2"):
        error = refused(
            respond(media_server, model, input_image(web.url("/cat.png", host))),
            "input[0].content[1].image_url",
        )
        assert error["code"] == "image_url_refused" and "--allow-private-media" in error["message"], host
    # the redirect route is never even asked for: its first hop is loopback too
    web.redirect("/hop", web.url("/cat.png"))
    refused(respond(media_server, model, input_image(web.url("/hop"))), "input[0].content[1].image_url")
    assert web.hits["/cat.png"] == 0 and web.hits["/hop"] == 0
    still_serving(media_server)


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        (data_url(noise_png((160, 160))), 413, "image_too_large"),
        (data_url(bomb_png()), 400, "invalid_image"),
        (data_url(truncated_png()), 400, "invalid_image"),
        (data_url(b"<html>not an image</html>"), 400, "invalid_image"),
        ("file:///etc/passwd", 400, "image_url_refused"),
        ("/etc/passwd", 400, "image_url_refused"),
        ("ftp://example.com/cat.png", 400, "image_url_refused"),
    ],
)
def test_bad_images_are_refused_naming_the_part(
    media_server: ServerProcess, vision_folder: Path, url: str, status: int, code: str
) -> None:
    parts = [input_image(data_url(image_bytes("PNG"))), input_image(url)]  # the second one is at fault
    error = refused(
        respond(media_server, str(vision_folder), *parts), "input[0].content[2].image_url", status
    )
    assert error["code"] == code
    assert "root:" not in error["message"]  # nothing of the file is shown


def test_the_server_keeps_serving_after_the_refusals(media_server: ServerProcess) -> None:
    still_serving(media_server)
    assert media_server.proc.poll() is None

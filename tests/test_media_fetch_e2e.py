"""Fetched images end to end on a tiny vision-language model (``tests/vision_models.py``), against
``hfserve start --allow-remote-media --allow-private-media --media-allow-hosts 127.0.0.1``: an image
served by a loopback server and used by URL gives the same greedy reply as the same image inline,
through chat, Responses ``input_image`` and Messages image blocks; a stored turn's image is read
again by a later turn that names it (``previous_response_id``); a redirect from the allowed host
to one the allow-list does not name is refused at that hop, with no request reaching the target."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.media_helpers import (
    PROMPT,
    ImageServer,
    ask_about_images,
    data_url,
    image_bytes,
    input_image,
    web_fixture,  # noqa: F401 - the module's ``web`` fixture
)
from tests.responses_helpers import output_text
from tests.server import ServerProcess
from tests.vision_models import build_vision_model

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def model(cache_dir: Path) -> Path:
    return build_vision_model(cache_dir, "qwen2-vl")


@pytest.fixture(scope="module")
def fetch_server(cache_dir: Path, model: Path) -> Iterator[ServerProcess]:
    args = (
        "--model",
        str(model),
        "--allow-remote-media",
        "--allow-private-media",
        "--media-allow-hosts",
        "127.0.0.1",
    )
    with ServerProcess.start(cache_dir, workers=1, args=args) as srv:
        yield srv


def chat(server: ServerProcess, model: Path, url: str) -> str:
    content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}]
    body = {
        "model": str(model),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    }
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def respond(server: ServerProcess, model: Path, url: str) -> httpx.Response:
    options = {"max_output_tokens": 8, "temperature": 0}
    return ask_about_images(server, model, input_image(url), timeout_s=TIMEOUT_S, **options)


def message(server: ServerProcess, model: Path, source: dict[str, Any]) -> str:
    content = [{"type": "text", "text": PROMPT}, {"type": "image", "source": source}]
    body = {
        "model": str(model),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    }
    reply = httpx.post(f"{server.base_url}/v1/messages", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    return "".join(b["text"] for b in reply.json()["content"] if b["type"] == "text")


def test_an_image_by_url_reads_as_the_same_image_inline(
    fetch_server: ServerProcess, model: Path, web: ImageServer
) -> None:
    data = image_bytes("PNG", (96, 80), "orange")
    url = web.image("/cat.png", data)
    inline = chat(fetch_server, model, data_url(data))
    assert inline  # the tiny model says something, so equal replies mean something
    assert chat(fetch_server, model, url) == inline
    assert web.hits["/cat.png"] == 1
    by_url, by_data = respond(fetch_server, model, url), respond(fetch_server, model, data_url(data))
    assert by_url.status_code == 200 and by_data.status_code == 200, by_url.text
    assert output_text(by_url.json()) == output_text(by_data.json()) == inline
    b64 = data_url(data).split(",", 1)[1]
    assert message(fetch_server, model, {"type": "url", "url": url}) == inline
    assert message(fetch_server, model, {"type": "base64", "media_type": "image/png", "data": b64}) == inline


def test_a_redirect_to_a_host_off_the_list_is_refused_at_the_hop(
    fetch_server: ServerProcess, model: Path, web: ImageServer
) -> None:
    web.image("/target.png", image_bytes("PNG"))
    hop = web.redirect("/hop", web.url("/target.png", host="localhost"))
    reply = respond(fetch_server, model, hop)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "input[0].content[1].image_url" and "not among the hosts" in error["message"]
    assert web.hits["/hop"] == 1 and web.hits["/target.png"] == 0


def test_models_list_the_vision_model_with_its_image_input(fetch_server: ServerProcess, model: Path) -> None:
    listing = httpx.get(f"{fetch_server.base_url}/v1/models", timeout=TIMEOUT_S).json()
    entry = next(m for m in listing["data"] if m["id"] == str(model))
    assert entry["input_modalities"] == ["text", "image"]


def test_a_stored_turn_with_an_image_is_read_again_by_the_next_turn(
    fetch_server: ServerProcess, model: Path
) -> None:
    """Turn 2 sends text only and names turn 1, whose ``input_image`` the store kept: its reply is
    the same two-turn conversation sent whole through chat (greedy)."""
    url = data_url(image_bytes("PNG", (120, 90), "teal"))
    first = respond(fetch_server, model, url)
    assert first.status_code == 200, first.text
    said = output_text(first.json())
    assert said
    body = {
        "model": str(model),
        "input": "And what colour is it?",
        "previous_response_id": first.json()["id"],
        "max_output_tokens": 8,
        "temperature": 0,
    }
    second = httpx.post(f"{fetch_server.base_url}/v1/responses", json=body, timeout=TIMEOUT_S)
    assert second.status_code == 200, second.text
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}],
        },
        {"role": "assistant", "content": said},
        {"role": "user", "content": "And what colour is it?"},
    ]
    whole = httpx.post(
        f"{fetch_server.base_url}/v1/chat/completions",
        json={"model": str(model), "messages": messages, "max_tokens": 8, "temperature": 0},
        timeout=TIMEOUT_S,
    )
    assert whole.status_code == 200, whole.text
    assert output_text(second.json()) == whole.json()["choices"][0]["message"]["content"]
    # The same prompt as the model read it (the host's count, the image's tokens included).
    assert second.json()["usage"]["input_tokens"] == whole.json()["usage"]["prompt_tokens"]

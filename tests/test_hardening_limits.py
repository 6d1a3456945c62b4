"""Limits on a one-worker server: ``--max-queue 0`` (no waiting room, yet service), 404 before 429,
body and head deadlines (``--request-timeout-s``), and big inputs tokenised off the event loop."""

from __future__ import annotations

import json
import random
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import ServerProcess
from tests.test_errors import assert_error
from tests.test_hardening import assert_plain_5xx

MODEL = "hfserve-demo"
TIMEOUT_S = 2


@pytest.fixture(scope="module")
def tight(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    args = ("--max-queue", "0", "--max-batch-size", "1", "--request-timeout-s", str(TIMEOUT_S))
    args += ("--trust-remote-code",)  # for the model whose forward pass raises
    with ServerProcess.start(cache_dir, workers=1, args=args) as srv:
        yield srv


def small_chat(server: ServerProcess, **body: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 1, **body}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)


# -- --max-queue 0 -------------------------------------------------------------------------------
def test_max_queue_zero_still_serves_what_fits_a_free_slot(tight: ServerProcess) -> None:
    for _ in range(3):
        resp = small_chat(tight, temperature=0, max_tokens=20)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "Hello! How can I help you today?"


def test_unknown_model_is_404_before_the_full_queue_is_429(tight: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tight.base_url}/v1/completions", json=body, timeout=60) as long_run:
        assert long_run.status_code == 200
        lines = long_run.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)  # the one batch slot is taken
        tight.wait_for(lambda s: s["running"] == 1)
        missing = small_chat(tight, model="nobody/no-such-model")
        assert_error(missing, 404, param="model", code="model_not_found")
        busy = small_chat(tight)
        assert busy.status_code == 429, busy.text
        assert busy.json()["error"]["code"] == "server_overloaded" and busy.headers["Retry-After"]
    tight.wait_for(lambda s: s["running"] == 0)  # leaving the stream aborted it


# -- deadlines -----------------------------------------------------------------------------------
def stalled_exchange(server: ServerProcess, sent: bytes) -> tuple[bytes, float]:
    """Send ``sent`` and nothing more; returns everything the server answers before it closes
    the connection, and how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(sent)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def error_of(raw: bytes) -> dict[str, Any]:
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"])


def test_stalled_body_gets_408_and_the_worker_moves_on(tight: ServerProcess) -> None:
    half = b'{"model": "hfserve-demo", "messages": [{"role": "us'
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sent = head + b"Content-Length: %d\r\n\r\n" % (2 * len(half)) + half
    result: dict[str, Any] = {}

    def stall() -> None:
        result["raw"], result["s"] = stalled_exchange(tight, sent)

    stalled = threading.Thread(target=stall)
    stalled.start()
    time.sleep(0.5)
    assert small_chat(tight).status_code == 200  # served while the other body hangs
    stalled.join(30)
    assert result["raw"].startswith(b"HTTP/1.1 408"), result["raw"][:200]
    assert TIMEOUT_S - 0.5 <= result["s"] < TIMEOUT_S + 4
    err = error_of(result["raw"])
    assert err["code"] == "request_timeout" and err["type"] == "invalid_request_error"


def test_stalled_head_gets_408(tight: ServerProcess) -> None:
    raw, took_s = stalled_exchange(tight, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert raw.startswith(b"HTTP/1.1 408"), raw[:200]
    assert took_s < TIMEOUT_S + 4
    assert error_of(raw)["code"] == "request_timeout"


def test_small_routes_take_small_bodies(tight: ServerProcess) -> None:
    resp = httpx.post(f"{tight.base_url}/reset", content=b"x" * (2 * 1024 * 1024), timeout=30)
    assert_error(resp, 413)
    resp = httpx.get(f"{tight.base_url}/health", timeout=30)
    assert resp.status_code == 200


# -- big inputs off the loop ---------------------------------------------------------------------
def test_a_5_mb_message_does_not_stall_small_requests(tight: ServerProcess) -> None:
    rng = random.Random(0)
    words = ["hello", "weather", "paris", "tool", "sum", "of", "the", "and", "is", "what"]
    text = " ".join(rng.choice(words) for _ in range(900_000))[: 5 * 1024 * 1024]
    big_body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    big: dict[str, Any] = {}

    def send_big() -> None:
        resp = httpx.post(f"{tight.base_url}/v1/chat/completions", json=big_body, timeout=300)
        big.update(status=resp.status_code, body=resp.json(), done=time.monotonic())

    def small_latencies_s() -> list[float]:
        latencies_s = []
        for _ in range(8):
            started = time.monotonic()
            assert small_chat(tight).status_code == 200
            latencies_s.append(time.monotonic() - started)
        return latencies_s

    # What a small request costs on this (shared, possibly busy) machine with nothing else running.
    alone_s = statistics.median(small_latencies_s())
    sender = threading.Thread(target=send_big)
    sender.start()
    time.sleep(0.5)  # the body is in; its tokenising takes seconds
    latencies_s = small_latencies_s()
    small_done = time.monotonic()
    sender.join(300)
    assert statistics.median(latencies_s) < 0.2 + alone_s, (alone_s, latencies_s)
    assert max(latencies_s) < 1.0 + alone_s, (alone_s, latencies_s)
    # The big one was still being tokenised while the small ones ran, then failed as it should.
    assert big["done"] > small_done, "the big request finished first: nothing was measured"
    assert big["status"] == 400 and big["body"]["error"]["code"] == "context_length_exceeded"


# -- 5xx -----------------------------------------------------------------------------------------
BOOM = """from transformers import Qwen2ForCausalLM


class BoomForCausalLM(Qwen2ForCausalLM):
    def forward(self, *args, **kwargs):
        raise RuntimeError("secret internals in /srv/weights/boom.bin")
"""


def test_generation_failure_says_what_failed_and_names_the_request(
    tight: ServerProcess, demo_model: Path, tmp_path: Path
) -> None:
    boom = tmp_path / "boom"  # the demo model, with a forward pass that raises
    shutil.copytree(demo_model, boom)
    (boom / "modeling_boom.py").write_text(BOOM)
    config = json.loads((boom / "config.json").read_text())
    config |= {"architectures": ["BoomForCausalLM"]}
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_boom.BoomForCausalLM"}
    (boom / "config.json").write_text(json.dumps(config))
    resp = small_chat(tight, model=str(boom))
    assert_plain_5xx(tight, resp, "generation_failed", ("secret", "RuntimeError", "boom.bin"))
    assert resp.json()["error"]["message"].startswith("Generation failed (request id req_")
    assert "secret internals" in tight.log_text()  # the log has it all
    assert small_chat(tight).status_code == 200  # the host lives on

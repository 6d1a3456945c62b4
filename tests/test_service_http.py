"""Running as a service, the HTTP side (issue 13, items 5 and 6): API keys on every route but the
public list (acceptance 5: the walk reads the app's own route table, so a route added later is
covered without touching this file), keys never logged, CORS, ``X-Request-Id`` and the access log."""

from __future__ import annotations

import functools
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cli.api_keys import load_api_keys
from cli.preflight import ConfigError
from sanic_serve.auth import KeyChecker
from tests.embedding_texts import FOLDER as MINILM
from tests.openapi import validate
from tests.server import ServerProcess, hfserve_cmd, server_env

KEY_A = "sk-hfserve-test-" + secrets.token_hex(12)  # from a key file
KEY_B = "sk-hfserve-test-" + secrets.token_hex(12)  # from --api-key
NEAR_MISS = KEY_A[:-1] + ("0" if KEY_A[-1] != "0" else "1")
ORIGIN = "http://ui.example"
HELLO = [{"role": "user", "content": "Hello!"}]
CHAT = {"model": "hfserve-demo", "messages": HELLO}

# The app built twice, with the defaults and with every option set (a route may exist only with an
# option, or only without one): the walk covers both tables. A ServerConfig field this config leaves
# at its default fails here, so an option added later is walked too once it is set below.
ROUTE_TABLE = """
import dataclasses, json, sys
from model_host.ipc.settings import HostSettings
from sanic_serve.app import create_app
from sanic_serve.config import ServerConfig
from sanic_serve.mcp.settings import MCPSettings
from sanic_serve.media.policy import MediaPolicy
every = ServerConfig(
    host="127.0.0.2", port=8001, workers=2, default_model_id="m", default_model_path="m", pinned=True,
    log_level="DEBUG", max_request_bytes=1024, request_timeout_s=5.0, drain_timeout_s=5.0,
    ring_capacity_bytes=2 << 20, tool_parser="hermes", engine=HostSettings(device="cpu", idle_unload_s=9.0),
    responses_db="responses.sqlite3", responses_max_mb=1.0, responses_ttl_s=60.0, max_audio_mb=1.0,
    max_audio_s=10.0,
    mcp=MCPSettings(
        servers={"s": {"url": "http://127.0.0.1:9/mcp"}}, allow_private=True, allow_hosts=("h",),
        timeout_s=1.0,
    ),
    media=MediaPolicy(allow_remote=True, allow_private=True, media_root="/srv/images"),
    api_keys=("unused",), metrics_auth=True, cors_origins=("http://ui.example",), metrics_vllm_names=True,
)
default = ServerConfig()
fields = dataclasses.fields(ServerConfig)
left = [f.name for f in fields if getattr(every, f.name) == getattr(default, f.name)]
if left:
    sys.exit(f"set these in the route walk's config too: {left}")
app = create_app(every if sys.argv[1] == "every" else default)
print(json.dumps(sorted({(m, "/" + r.path.lstrip("/")) for r in app.router.routes for m in r.methods})))
"""


@functools.cache
def route_table() -> list[tuple[str, str]]:
    """(method, path pattern) of every route of the app, with the defaults and with every option,
    read from its router in a process of its own (the app registers itself by name, once per
    process)."""
    routes: set[tuple[str, str]] = set()
    for config in ("default", "every"):
        out = subprocess.run(
            [sys.executable, "-c", ROUTE_TABLE, config], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        routes |= {(m, p) for m, p in json.loads(out.stdout)}
    return sorted(routes)


def concrete(pattern: str) -> str:
    return re.sub(r"<[^>]+>", "x", pattern)


@pytest.fixture(scope="module")
def keyed(
    cache_dir: Path, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Two keys (a file and an option), /metrics guarded too, vLLM's metric names, CORS for one
    origin, and DEBUG logging: the most a log could ever show of a request."""
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"# hfserve keys\n\n{KEY_A}\n")
    args = ("--api-key-file", str(key_file), "--api-key", KEY_B, "--metrics-auth", "--metrics-vllm-names")
    args += ("--cors-origin", ORIGIN, "--log-level", "DEBUG")
    with ServerProcess.start(cache_dir, workers=2, args=args) as srv:
        srv.api_key = KEY_A
        yield srv


@pytest.fixture(scope="module")
def keyed_open_metrics(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(cache_dir, workers=1, args=("--api-key", KEY_B)) as srv:
        srv.api_key = KEY_B
        yield srv


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(srv: ServerProcess, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    return httpx.request(
        method,
        srv.base_url + path,
        content=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=60.0,
    )


def assert_401(resp: httpx.Response, what: str) -> None:
    assert resp.status_code == 401, (what, resp.status_code, resp.text[:300])
    assert resp.headers["WWW-Authenticate"] == "Bearer", what
    body = resp.json()
    if body.get("type") == "error":  # Anthropic's routes (/v1/messages...) answer in its shape
        assert body["error"]["type"] == "authentication_error", what
    else:
        assert body["error"]["code"] == "invalid_api_key", what


@pytest.mark.parametrize("setup", ["metrics_auth", "default"])
def test_every_route_needs_the_key_but_the_public_list(setup: str, request: pytest.FixtureRequest) -> None:
    srv: ServerProcess = request.getfixturevalue("keyed" if setup == "metrics_auth" else "keyed_open_metrics")
    public = {"/health"} if setup == "metrics_auth" else {"/health", "/metrics"}
    routes = route_table()
    assert len(routes) >= 10 and ("POST", "/v1/chat/completions") in routes
    assert {p for _, p in routes} >= public
    for method, pattern in routes:
        path = concrete(pattern)
        what = f"{method} {pattern}"
        if pattern in public:
            assert call(srv, method, path).status_code != 401, what
            continue
        assert_401(call(srv, method, path), what)
        assert_401(call(srv, method, path, bearer(NEAR_MISS)), what)
        assert_401(call(srv, method, path, {"Authorization": f"Basic {KEY_B}"}), what)
        # Any 4xx but 401 with the key: the handler itself answered (400 for the empty body, 404
        # for the made-up ids).
        assert call(srv, method, path, bearer(KEY_B)).status_code != 401, what
    # A path no route serves tells a stranger nothing either.
    assert_401(call(srv, "GET", "/no/such/route"), "unknown path")


def test_401_is_openais_error_and_both_keys_work(keyed: ServerProcess) -> None:
    missing = call(keyed, "POST", "/v1/chat/completions")
    validate("ErrorResponse", missing.json())
    assert missing.json()["error"]["type"] == "invalid_request_error"
    wrong = call(keyed, "POST", "/v1/chat/completions", bearer(NEAR_MISS))
    assert_401(wrong, "wrong key")
    assert NEAR_MISS not in wrong.text  # a wrong key is not echoed either
    assert_401(call(keyed, "GET", "/v1/models", {"Authorization": "Bearer"}), "empty bearer")
    for key in (KEY_A, KEY_B):
        client = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(model="hfserve-demo", messages=HELLO)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "Hello! How can I help you today?"
    # The scheme's name is case-insensitive (RFC 7235).
    assert call(keyed, "GET", "/v1/models", {"Authorization": f"bearer {KEY_A}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=NEAR_MISS, max_retries=0).models.list()


def test_x_api_key_and_anthropic_401s(keyed: ServerProcess) -> None:
    """Anthropic's clients send ``x-api-key``: the same keys, on every route; a wrong one is an
    Anthropic-shaped 401 on the Messages routes."""
    import anthropic

    body = {"model": "hfserve-demo", "max_tokens": 16, "messages": HELLO}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        for headers in ({}, {"x-api-key": NEAR_MISS}, {"x-api-key": NEAR_MISS, **bearer(NEAR_MISS)}):
            resp = httpx.post(keyed.base_url + path, json=body, headers=headers, timeout=60.0)
            assert resp.status_code == 401, (path, headers.keys(), resp.text)
            assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "authentication_error"
            assert NEAR_MISS not in resp.text
    assert call(keyed, "GET", "/v1/models", {"x-api-key": KEY_B}).status_code == 200
    assert_401(call(keyed, "GET", "/v1/models", {"x-api-key": NEAR_MISS}), "wrong x-api-key")
    for key in (KEY_A, KEY_B):
        client = anthropic.Anthropic(base_url=keyed.base_url, api_key=key, max_retries=0)
        reply = client.messages.create(model="hfserve-demo", max_tokens=16, messages=HELLO)  # type: ignore[arg-type]
        assert reply.content and reply.usage.output_tokens > 0
    stranger = anthropic.Anthropic(base_url=keyed.base_url, api_key=NEAR_MISS, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="hfserve-demo", max_tokens=16, messages=HELLO)  # type: ignore[arg-type]


def test_health_tells_a_stranger_only_the_status(keyed: ServerProcess, demo_model: Path) -> None:
    for headers in ({}, bearer(NEAR_MISS), {"Authorization": "Basic x"}):
        resp = call(keyed, "GET", "/health", headers)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"status": "ok"}  # no model folders, pids or totals
        assert str(demo_model) not in resp.text
    full = call(keyed, "GET", "/health", bearer(KEY_B)).json()
    assert full["status"] == "ok" and "host" in full and "worker" in full
    assert full["host"]["pid"] > 0 and full["host"]["models"]


def test_metrics_guarded_and_named_like_vllm(keyed: ServerProcess, keyed_open_metrics: ServerProcess) -> None:
    assert_401(call(keyed, "GET", "/metrics"), "/metrics with --metrics-auth")
    text = call(keyed, "GET", "/metrics", bearer(KEY_A)).text
    assert "vllm:num_requests_running" in text and "vllm:time_to_first_token_seconds_bucket" in text
    # vLLM's dashboards filter every panel on model_name: the host's numbers carry it too.
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total"):
        assert f'vllm:{name}{{model_name="hfserve-demo"}}' in text, name
    assert "hfserve:num_requests_running" not in text
    assert "hfserve:http_requests_total" in text  # no vLLM equivalent: always hfserve's own
    assert "hfserve:num_requests_running" in call(keyed_open_metrics, "GET", "/metrics").text


def test_cli_clients_send_the_key(keyed: ServerProcess, tmp_path: Path) -> None:
    env = {**server_env(tmp_path), "HFSERVE_API_KEY": KEY_A}
    chat = [*hfserve_cmd(), "chat", keyed.base_url, "-p", "Hello!", "--max-tokens", "16"]
    out = subprocess.run(chat, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Hello! How can I help you today?" in out.stdout
    env.pop("HFSERVE_API_KEY")
    env.pop("OPENAI_API_KEY", None)
    refused = subprocess.run(chat, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    report = tmp_path / "bench.json"
    bench = [*hfserve_cmd(), "bench", "--base-url", keyed.base_url, "--api-key", KEY_B, "--concurrency", "2"]
    bench += ["--num-prompts", "4", "--output-len", "4", "--out", str(report)]
    out = subprocess.run(bench, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = json.loads(report.read_text())["runs"]
    assert runs[0]["failed"] == 0 and runs[0]["completed"] == 4


def test_cors(keyed: ServerProcess, keyed_open_metrics: ServerProcess) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    asked = "authorization, content-type, x-request-id"
    ok = call(
        keyed, "OPTIONS", "/v1/chat/completions", {**preflight, "Access-Control-Request-Headers": asked}
    )
    assert ok.status_code == 204  # no key: browsers send preflights without credentials
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert ok.headers["Access-Control-Allow-Headers"] == asked
    other = call(keyed, "OPTIONS", "/v1/chat/completions", {**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers
    # Real requests, answered or refused, carry the headers a page needs to read them.
    for headers, status in (({}, 401), (bearer(KEY_A), 200)):
        resp = httpx.post(
            f"{keyed.base_url}/v1/chat/completions",
            json=CHAT,
            headers={"Origin": ORIGIN, **headers},
            timeout=60,
        )
        assert resp.status_code == status
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
        assert "Origin" in resp.headers["Vary"]
    foreign = call(keyed, "GET", "/v1/models", {"Origin": "http://evil.example", **bearer(KEY_A)})
    assert "Access-Control-Allow-Origin" not in foreign.headers
    # Without --cors-origin: no CORS at all.
    plain = call(keyed_open_metrics, "OPTIONS", "/v1/models", preflight)
    assert "Access-Control-Allow-Origin" not in plain.headers
    assert (
        "Access-Control-Allow-Origin"
        not in call(keyed_open_metrics, "GET", "/health", {"Origin": ORIGIN}).headers
    )


def access_lines(srv: ServerProcess, request_id: str) -> list[str]:
    return [line for line in srv.log_text().splitlines() if f"[request_id={request_id}]" in line]


def access_line(srv: ServerProcess, request_id: str, timeout_s: float = 20.0) -> str:
    """The request's one access line. It is written once the handler returns, a moment after the
    client has read the last byte: wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [line for line in access_lines(srv, request_id) if "hfserve.access" in line]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, found  # one line per request
            return found[0]
        time.sleep(0.1)


def test_request_id_echoed_generated_and_on_every_line(keyed: ServerProcess) -> None:
    rid = "trace-" + secrets.token_hex(6)
    field = "zz_unknown_" + secrets.token_hex(4)  # logged once, as a warning, by the worker
    resp = httpx.post(
        f"{keyed.base_url}/v1/chat/completions",
        json={**CHAT, field: 1},
        headers={**bearer(KEY_A), "X-Request-Id": rid},
        timeout=60,
    )
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == rid
    access = access_line(keyed, rid)
    assert any(field in line for line in access_lines(keyed, rid)), keyed.log_text()[-3000:]
    assert "POST /v1/chat/completions route=/v1/chat/completions status=200" in access
    assert "prompt_tokens=10 completion_tokens=10" in access
    # Every worker log line that names the field was logged inside this request.
    assert all(f"[request_id={rid}]" in line for line in keyed.log_text().splitlines() if field in line)
    # A stream's line is written when it ends: its tokens are all counted.
    sid = "stream-" + secrets.token_hex(6)
    streamed = httpx.post(
        f"{keyed.base_url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={**bearer(KEY_A), "X-Request-Id": sid},
        timeout=60,
    )
    assert streamed.status_code == 200 and streamed.headers["X-Request-Id"] == sid
    line = access_line(keyed, sid)
    assert "status=200" in line and "completion_tokens=10" in line
    # No id, or one that could forge a log line: a fresh one, different each time.
    generated = {
        call(keyed, "GET", "/health", h).headers["X-Request-Id"] for h in ({}, {}, {"X-Request-Id": "a b"})
    }
    assert len(generated) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated)
    assert access_lines(keyed, "a b") == []


def test_a_client_gone_mid_stream_still_gets_its_access_line(keyed: ServerProcess) -> None:
    rid = "gone-" + secrets.token_hex(6)
    body = {**CHAT, "stream": True, "max_tokens": 1500, "ignore_eos": True}
    headers = {**bearer(KEY_A), "X-Request-Id": rid}
    with httpx.stream("POST", f"{keyed.base_url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())  # it has begun; leaving the block drops the connection
    line = access_line(keyed, rid)
    assert "status=200" in line
    completion = int(re.search(r"completion_tokens=(\d+)", line).group(1))  # type: ignore[union-attr]
    assert 0 < completion < 1500  # ended early, with what it had generated
    keyed.wait_for(lambda s: s["running"] == 0, timeout_s=30.0)


def test_access_line_counts_embedding_tokens(keyed: ServerProcess) -> None:
    rid = "embed-" + secrets.token_hex(6)
    resp = httpx.post(
        f"{keyed.base_url}/v1/embeddings",
        json={"model": str(MINILM), "input": ["a first text", "and a second one"]},
        headers={**bearer(KEY_A), "X-Request-Id": rid},
        timeout=180,
    )
    assert resp.status_code == 200, resp.text
    tokens = resp.json()["usage"]["prompt_tokens"]
    line = access_line(keyed, rid)
    assert "status=200 " in line and f"prompt_tokens={tokens} completion_tokens=0" in line


def test_keys_never_reach_the_log(keyed: ServerProcess) -> None:
    for key in (KEY_A, NEAR_MISS):  # the right key and a wrong one, on a logged error path too
        call(keyed, "POST", "/v1/chat/completions", bearer(key))
        call(keyed, "GET", "/v1/models/nope", bearer(key))
    log = keyed.log_text()
    assert "hfserve.access" in log  # the log does record these requests
    for secret in (KEY_A, KEY_B, NEAR_MISS, KEY_A[-12:]):
        assert secret not in log


# -- units ---------------------------------------------------------------------------------------
def test_key_checker_compares_every_key() -> None:
    checker = KeyChecker(("alpha-1", "beta-2"))
    assert checker.accepts("alpha-1") and checker.accepts("beta-2")
    assert not checker.accepts("alpha-") and not checker.accepts("") and not checker.accepts("alpha-1 ")
    assert not checker.accepts("é")  # not ASCII: no exception, just no match


def test_keys_from_options_variable_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFSERVE_API_KEY", " env-key \n")
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\n\nfile-key-1\n  file-key-2  \nenv-key\n")
    assert load_api_keys(["opt-key"], key_file) == ("opt-key", "env-key", "file-key-1", "file-key-2")
    monkeypatch.delenv("HFSERVE_API_KEY")
    assert load_api_keys([], None) == ()
    with pytest.raises(ConfigError) as bad:
        load_api_keys(["has space-secret"], None)
    assert "secret" not in str(bad.value)  # the message never repeats a key
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_api_keys([], tmp_path / "empty")
    with pytest.raises(ConfigError, match="api-key-file"):
        load_api_keys([], tmp_path / "missing")


def test_a_bad_key_option_is_one_line_and_the_units_exit_status(tmp_path: Path) -> None:
    # Under the service unit (which sets the variable) a settings error exits 78, not restarted.
    out = subprocess.run(
        [*hfserve_cmd(), "start", "--api-key", "two words"],
        env={**server_env(tmp_path), "HFSERVE_CONFIG_ERROR_EXIT": "78"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 78  # a restart would only repeat it
    assert out.stderr.startswith("error: an API key from --api-key is not usable")
    assert "two words" not in out.stderr

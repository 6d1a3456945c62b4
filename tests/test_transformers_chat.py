"""`transformers chat` (the CLI of the installed transformers, unmodified) against a real `hfserve
start`, and the transformers-serve endpoints it relies on: `/load_model`, `/reset` and
`generation_config`."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pexpect
import pytest
from tokenizers import Tokenizer

from tests.server import ServerProcess, venv_script

GREETING_REPLY = "Hello! How can I help you today?"  # the demo model's greedy answer to "Hello!"
ODD_PROMPT = "zebra quantum fiddle?"  # off the demo corpus: the model is unsure what comes next


def spawn_transformers_chat(server: ServerProcess, model: str, save_dir: Path, *flags: str) -> pexpect.spawn:
    # huggingface_hub's offline mode refuses every URL, even a local server's: the client runs
    # online (nothing here reaches beyond 127.0.0.1). A dumb terminal makes rich print plain text.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(TERM="dumb", NO_COLOR="1", HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="400", LINES="50")
    args = ["chat", model, server.base_url, *flags, "--user", "tester", "--save-folder", str(save_dir)]
    return pexpect.spawn(
        venv_script("transformers"), args, env=env, encoding="utf-8", timeout=90, dimensions=(50, 400)
    )


def prompt(child: pexpect.spawn) -> None:
    child.expect_exact("<tester>:")


def saved_chat(child: pexpect.spawn) -> dict[str, Any]:
    child.expect(r"Chat saved to (\S+\.json)!")
    return dict(json.loads(Path(child.match.group(1)).read_text()))


def test_transformers_chat_session(server: ServerProcess, demo_model: Path, tmp_path: Path) -> None:
    child = spawn_transformers_chat(server, "hfserve-demo", tmp_path, "do_sample=False")
    child.expect_exact("hfserve-demo was already loaded.")  # /load_model answered `cached: true`
    prompt(child)
    child.sendline("Hello!")
    child.expect_exact("<hfserve-demo>:")
    child.expect_exact(GREETING_REPLY)
    prompt(child)
    child.sendline("What is the weather like in Paris?")
    child.expect_exact("<hfserve-demo>:")
    prompt(child)
    child.sendline("!set max_new_tokens=5")
    prompt(child)
    child.sendline("Hello!")
    child.expect_exact("Generation stopped after reaching the token limit.")  # finish_reason length
    child.expect_exact("Continue generating? (y/N):")
    child.sendline("n")
    prompt(child)
    child.sendline("!status")
    child.expect_exact("Model: hfserve-demo")
    child.expect_exact('"max_new_tokens": 5')
    prompt(child)
    child.sendline("!save")
    chat = saved_chat(child)["chat_history"]
    assert [m["role"] for m in chat] == ["user", "assistant"] * 3
    assert chat[1]["content"] == GREETING_REPLY
    assert chat[3]["content"]
    short = chat[5]["content"]
    tokenizer = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    assert 0 < len(tokenizer.encode(short, add_special_tokens=False).ids) <= 5, short
    prompt(child)
    child.sendline("!clear")
    prompt(child)
    time.sleep(1.1)  # saves are named by the second
    child.sendline("!save")
    assert saved_chat(child)["chat_history"] == []
    prompt(child)
    child.sendline("!exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# -- generation_config -------------------------------------------------------------------------


def chat(server: ServerProcess, **body: Any) -> httpx.Response:
    payload = {"model": "hfserve-demo", "messages": [{"role": "user", "content": "Hello!"}], **body}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, timeout=60)


@pytest.mark.parametrize(
    "config", ['{"do_sample": false, "max_new_tokens": 5}', {"do_sample": False, "max_new_tokens": 5}]
)
def test_generation_config_max_new_tokens(server: ServerProcess, config: str | dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="hfserve-demo",
        messages=[{"role": "user", "content": "Hello!"}],
        extra_body={"generation_config": config},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"
    assert GREETING_REPLY.startswith(reply.choices[0].message.content or "-")


def test_generation_config_on_completions(server: ServerProcess) -> None:
    body = {"model": "hfserve-demo", "prompt": "Hello", "generation_config": {"max_new_tokens": 3}}
    reply = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 3  # not the endpoint's default of 16


def test_request_fields_win_over_generation_config(server: ServerProcess) -> None:
    reply = chat(server, max_tokens=3, generation_config={"max_new_tokens": 8}).json()
    assert reply["usage"]["completion_tokens"] == 3


def test_do_sample_false_is_greedy_whatever_the_temperature(server: ServerProcess) -> None:
    # As transformers serve: the request's temperature replaces the config's but does not turn
    # sampling back on.
    odd = [{"role": "user", "content": ODD_PROMPT}]
    greedy = chat(server, messages=odd, max_tokens=12, temperature=0).json()
    config = {"do_sample": False, "temperature": 0.3}
    hot = chat(server, messages=odd, max_tokens=12, temperature=1.8, seed=3, generation_config=config).json()
    assert hot["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_do_sample_true_samples_a_greedy_model(server: ServerProcess) -> None:
    # The demo model's own generation_config.json says do_sample: false.
    odd = [{"role": "user", "content": ODD_PROMPT}]
    texts = {
        chat(
            server, messages=odd, seed=seed, generation_config='{"do_sample": true, "max_new_tokens": 12}'
        ).json()["choices"][0]["message"]["content"]
        for seed in range(4)
    }
    assert len(texts) > 1


@pytest.mark.parametrize(
    ("config", "param", "code"),
    [
        ({"max_new_tokens": 5, "colour": "blue"}, "generation_config.colour", "unknown_parameter"),
        ({"num_beams": 4}, "generation_config.num_beams", "unsupported_parameter"),
        ({"max_new_tokens": "five"}, "generation_config.max_new_tokens", None),
        ('{"max_new_tokens": 5', "generation_config", None),
        ("[5]", "generation_config", None),
    ],
)
def test_generation_config_refusals(server: ServerProcess, config: Any, param: str, code: str | None) -> None:
    response = chat(server, generation_config=config)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code and error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_generation_config_accepts_noops_and_off_values(server: ServerProcess) -> None:
    config = {
        "max_new_tokens": 4,
        "num_beams": 1,
        "use_cache": True,
        "pad_token_id": 0,
        "transformers_version": "5",
    }
    assert chat(server, generation_config=config).json()["usage"]["completion_tokens"] <= 4


# -- /load_model and /reset ----------------------------------------------------------------------


def load_events(base_url: str, model: str) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", f"{base_url}/load_model", json={"model": model}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


@pytest.fixture(scope="module")
def on_demand(
    server: ServerProcess, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ServerProcess, str]:
    """A server without --model (so nothing is pinned), and a model folder it has not loaded. The
    session's shared server has exactly those options: a server of its own would only cost another
    start. Other tests may have loaded models of their own into it; /reset unloads them too."""
    copy = tmp_path_factory.mktemp("models") / "demo-copy"
    shutil.copytree(demo_model, copy)
    return server, str(copy.resolve())


def loaded(srv: ServerProcess) -> list[str]:
    return list(srv.host_status()["models"])


def served_ids(srv: ServerProcess) -> list[str]:
    return [m["id"] for m in httpx.get(f"{srv.base_url}/v1/models", timeout=10).json()["data"]]


def test_load_model_streams_stages_then_is_cached(on_demand: tuple[ServerProcess, str]) -> None:
    srv, model = on_demand
    assert model not in loaded(srv)
    events = load_events(srv.base_url, model)
    assert [(e["status"], e.get("stage")) for e in events] == [
        ("loading", "processor"),
        ("loading", "weights"),
        ("loading", "weights"),
        ("ready", None),
    ]
    assert events[1]["progress"] == {"current": 0, "total": 1}
    assert events[2]["progress"] == {"current": 1, "total": 1}
    assert events[-1] == {"status": "ready", "model": model, "cached": False}
    assert model in loaded(srv)  # the host really has the weights, not only the worker
    for _ in range(2):  # whichever worker answers
        assert load_events(srv.base_url, model)[-1] == {"status": "ready", "model": model, "cached": True}


def test_load_model_unknown_model(on_demand: tuple[ServerProcess, str]) -> None:
    srv, _ = on_demand
    events = load_events(srv.base_url, "/no/such/model")
    assert events[-1]["status"] == "error" and "/no/such/model" in events[-1]["message"]
    plain = httpx.post(f"{srv.base_url}/load_model", json={"model": "/no/such/model", "stream": False})
    assert plain.status_code == 404 and plain.json()["error"]["code"] == "model_not_found"
    missing = httpx.post(f"{srv.base_url}/load_model", json={})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def test_reset_unloads_idle_models_only(on_demand: tuple[ServerProcess, str], demo_model: Path) -> None:
    srv, model = on_demand
    assert load_events(srv.base_url, model)[-1]["status"] == "ready"
    default = [str(demo_model.resolve())]  # the demo model, preloaded: never unloaded
    assert loaded(srv)[0] == default[0] and model in loaded(srv)
    long_run = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello!"}],
        "stream": True,
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=long_run, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        reset = httpx.post(f"{srv.base_url}/reset", timeout=30)
        assert reset.status_code == 200 and reset.json() == {"status": "ok"}
        assert model in loaded(srv)  # a request is running on it
    srv.wait_for(lambda s: s["running"] == 0)
    assert httpx.post(f"{srv.base_url}/reset", timeout=30).json() == {"status": "ok"}
    assert loaded(srv) == default
    assert served_ids(srv) == ["hfserve-demo"]
    # Unloaded, not gone: the next request loads it again.
    reply = httpx.post(
        f"{srv.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    assert model in loaded(srv)
    assert load_events(srv.base_url, model)[-1]["cached"] is True


def test_pinned_server_refuses_other_models(cache_dir: Path, demo_model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(demo_model, other)
    pinned = str(demo_model)
    with ServerProcess.start(cache_dir, workers=1, args=("--model", pinned)) as srv:
        assert load_events(srv.base_url, pinned)[-1] == {"status": "ready", "model": pinned, "cached": True}
        refused = load_events(srv.base_url, str(other))[-1]
        assert refused["status"] == "error" and re.search("not served here", refused["message"])
        assert httpx.post(f"{srv.base_url}/reset", timeout=30).json() == {"status": "ok"}
        assert loaded(srv) == [str(demo_model.resolve())]

"""``/v1/completions``: raw prompts (text, lists, token ids), n, echo, streaming, schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from sanic_serve.completions.fim import FORMATS, FimFormat, detect_fim
from tests.openapi import validate
from tests.server import ServerProcess

MODEL = "hfserve-demo"
HELLO = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
JOKE = "<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n"


def stream_completion(server: ServerProcess, **body: object) -> list[dict]:
    """POST a streamed completion of JOKE; returns the JSON events before ``[DONE]``."""
    raw = httpx.post(
        f"{server.base_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": JOKE, "temperature": 0, "max_tokens": 30, "stream": True, **body},
    ).text
    events = [e[len("data: ") :] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def test_text_prompt(server: ServerProcess) -> None:
    resp = client(server).completions.create(model=MODEL, prompt=HELLO, temperature=0, max_tokens=30)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "Hello! How can I help you today?"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 10


def test_default_max_tokens_is_16(server: ServerProcess) -> None:
    story = "<|im_start|>user\nWrite a long story<|im_end|>\n<|im_start|>assistant\n"
    resp = client(server).completions.create(model=MODEL, prompt=story, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 16


def test_token_ids_prompt_list_and_n(server: ServerProcess, demo_model: Path) -> None:
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    hello_ids = tok.encode(HELLO, add_special_tokens=False).ids
    resp = client(server).completions.create(model=MODEL, prompt=hello_ids, temperature=0, max_tokens=30)
    assert resp.choices[0].text == "Hello! How can I help you today?"
    both = client(server).completions.create(
        model=MODEL, prompt=[HELLO, JOKE], n=2, temperature=0, max_tokens=30
    )
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices][:2] == ["Hello! How can I help you today?"] * 2
    assert "mouse" in both.choices[2].text and both.choices[2].text == both.choices[3].text
    joke_len = len(tok.encode(JOKE, add_special_tokens=False).ids)
    assert both.usage is not None and both.usage.prompt_tokens == len(hello_ids) + joke_len


def test_echo_and_stream(server: ServerProcess) -> None:
    whole = client(server).completions.create(
        model=MODEL, prompt=JOKE, temperature=0, max_tokens=30, echo=True
    )
    assert whole.choices[0].text.startswith(JOKE) and "mouse" in whole.choices[0].text
    chunks = stream_completion(server, echo=True, stream_options={"include_usage": True})
    text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    assert text == whole.choices[0].text
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens  # type: ignore[union-attr]
    for ch in chunks:
        # The spec's schema is the whole response, whose finish_reason is always a string; the
        # chunks before the last carry null there, as OpenAI's own stream does.
        if ch["choices"] and ch["choices"][0]["finish_reason"] is not None:
            validate("CreateCompletionResponse", ch)
        elif ch["choices"]:
            assert set(ch["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    raw_whole = httpx.post(
        f"{server.base_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": [JOKE, HELLO], "n": 2, "temperature": 0, "max_tokens": 30},
    ).json()
    validate("CreateCompletionResponse", raw_whole)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": HELLO, "suffix": "x"}, "suffix"),
        ({"prompt": HELLO, "logprobs": 6}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": HELLO, "max_tokens": -1}, "max_tokens"),
        ({"prompt": HELLO, "suffix": "x", "echo": True}, "echo"),
        ({"prompt": HELLO, "n": 2, "best_of": 1}, "best_of"),
        ({"prompt": HELLO, "best_of": 3, "stream": True}, "best_of"),
        ({"prompt": HELLO, "best_of": 0}, "best_of"),
    ],
)
def test_bad_completion_requests(server: ServerProcess, body: dict[str, object], param: str) -> None:
    resp = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    validate("ErrorResponse", resp.json())


def test_legacy_logprobs(server: ServerProcess) -> None:
    whole = client(server).completions.create(
        model=MODEL, prompt=JOKE, temperature=0, max_tokens=30, logprobs=2
    )
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert "".join(lp.tokens) == whole.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    chunks = stream_completion(server, logprobs=2)
    tokens = [t for ch in chunks for t in (ch["choices"][0]["logprobs"] or {}).get("tokens", [])]
    offsets = [o for ch in chunks for o in (ch["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == lp.tokens and offsets == lp.text_offset


# --- echo with logprobs: the prompt scored, as evaluation harnesses use it ----------------------


@pytest.fixture(scope="module")
def reference(demo_model: Path) -> Any:
    """Prompt logprobs computed directly with transformers, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    tokenizer = Tokenizer.from_file(str(demo_model / "tokenizer.json"))

    def score(prompt: str) -> tuple[list[int], list[float]]:
        ids = tokenizer.encode(prompt, add_special_tokens=True).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        return ids, [logp[j - 1, ids[j]].item() for j in range(1, len(ids))]

    return score


def check_prompt_logprobs(lp: Any, prompt: str, reference: Any, k: int) -> None:
    ids, expected = reference(prompt)
    n = len(ids)
    assert "".join(lp["tokens"][:n]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx(expected, abs=2e-4)
    rows = zip(lp["tokens"][1:n], lp["token_logprobs"][1:n], lp["top_logprobs"][1:n], strict=True)
    for token, value, top in rows:
        assert len(top) == k
        assert max(top.values()) >= value - 2e-4  # the best alternative is at least as likely
        if token in top:
            assert top[token] == pytest.approx(value, abs=2e-4)


def test_echo_logprobs_score_the_prompt_without_generating(server: ServerProcess, reference: Any) -> None:
    body = {"model": MODEL, "prompt": JOKE, "max_tokens": 0, "echo": True, "logprobs": 3}
    raw = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    validate("CreateCompletionResponse", _spec_shaped(raw))
    choice = raw["choices"][0]
    assert choice["text"] == JOKE and choice["finish_reason"] == "length"
    assert raw["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == raw["usage"]["prompt_tokens"]
    check_prompt_logprobs(lp, JOKE, reference, 3)
    # the typed client reads it too
    typed = client(server).completions.create(model=MODEL, prompt=JOKE, max_tokens=0, echo=True, logprobs=3)
    assert typed.choices[0].logprobs is not None
    assert typed.choices[0].logprobs.token_logprobs == lp["token_logprobs"]


def test_echo_logprobs_then_generation_stream_and_not(server: ServerProcess, reference: Any) -> None:
    body = {"model": MODEL, "prompt": JOKE, "max_tokens": 8, "echo": True, "logprobs": 2, "temperature": 0}
    whole = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    choice = whole["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(JOKE) and len(choice["text"]) > len(JOKE)
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert len(lp["tokens"]) == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]
    check_prompt_logprobs(lp, JOKE, reference, 2)
    assert all(v is not None for v in lp["token_logprobs"][1:])

    chunks = stream_completion(server, max_tokens=8, echo=True, logprobs=2)
    assert chunks[0]["choices"][0]["text"] == JOKE  # the echo comes first, with the prompt's logprobs
    for key in ("tokens", "token_logprobs", "text_offset"):
        streamed = [x for ch in chunks for x in (ch["choices"][0]["logprobs"] or {}).get(key, [])]
        assert (
            streamed == pytest.approx(lp[key], abs=1e-5) if key == "token_logprobs" else streamed == lp[key]
        )


def test_echo_logprobs_of_prompts_batched_together_and_chunked(server: ServerProcess, reference: Any) -> None:
    # Prompts of different lengths share one left-padded prefill; the long one (over the 256-token
    # prefill budget) is prefilled in chunks. Each must score as it does alone.
    long = JOKE + " ".join(["the weather in Paris is sunny"] * 70)
    prompts = [HELLO, JOKE, long]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1}
    raw = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120).json()
    assert len(reference(long)[0]) > 256
    for prompt, choice in zip(prompts, raw["choices"], strict=True):
        assert choice["text"] == prompt
        check_prompt_logprobs(choice["logprobs"], prompt, reference, 1)


def _spec_shaped(body: dict[str, Any]) -> dict[str, Any]:
    """The published schema types ``token_logprobs`` items as numbers, yet OpenAI's API (and
    vLLM) answer null for an echoed prompt's first token, which nothing predicts: we follow the
    API. Everything else must match the schema."""
    out = json.loads(json.dumps(body))
    for choice in out["choices"]:
        lp = choice["logprobs"]
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    return out


# --- suffix: fill in the middle -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fim_format_detection(fmt: FimFormat) -> None:
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    assert detect_fim(tokenizer) is None
    tokenizer.add_special_tokens([t for t in fmt.sentinels()])
    assert detect_fim(tokenizer) == fmt
    text = fmt.render("def f():", "return 1")
    assert text.index("def f():") < text.index("return 1") or fmt.order == "spm"
    assert all(s in text for s in fmt.sentinels())


@pytest.fixture(scope="module")
def fim_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo model with three of its unused added tokens renamed to Qwen's infilling sentinels
    (it was never trained to infill: what is checked is the prompt it is given)."""
    folder = tmp_path_factory.mktemp("fim") / "fim-model"
    shutil.copytree(demo_model, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    renames = {"</tool_call>": "<|fim_prefix|>", "<tool_response>": "<|fim_suffix|>"}
    renames["</tool_response>"] = "<|fim_middle|>"
    for token in spec["added_tokens"]:
        token["content"] = renames.get(token["content"], token["content"])
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return str(folder)


def test_suffix_fills_in_the_middle(server: ServerProcess, fim_model: str) -> None:
    c = client(server)
    before, after = "def add(a, b):\n    ", "\n    return total\n"
    infill = c.completions.create(model=fim_model, prompt=before, suffix=after, max_tokens=12, temperature=0)
    explicit = f"<|fim_prefix|>{before}<|fim_suffix|>{after}<|fim_middle|>"
    plain = c.completions.create(model=fim_model, prompt=explicit, max_tokens=12, temperature=0)
    assert infill.choices[0].text == plain.choices[0].text
    assert infill.usage is not None and plain.usage is not None
    assert infill.usage.prompt_tokens == plain.usage.prompt_tokens
    tokenizer = Tokenizer.from_file(f"{fim_model}/tokenizer.json")
    ids = tokenizer.encode(explicit).ids
    assert infill.usage.prompt_tokens == len(ids) and tokenizer.token_to_id("<|fim_middle|>") in ids
    # a token-id prompt is the text before the hole just the same
    prefix_ids = tokenizer.encode(before).ids
    by_ids = c.completions.create(
        model=fim_model, prompt=prefix_ids, suffix=after, max_tokens=12, temperature=0
    )
    assert by_ids.choices[0].text == plain.choices[0].text


# --- best_of ------------------------------------------------------------------------------------


def test_best_of_returns_the_most_likely_candidates(server: ServerProcess) -> None:
    # Choice i of a seeded request uses seed + i, so asking for all candidates with n shows
    # exactly what best_of chooses from.
    common = {"model": MODEL, "prompt": [JOKE, HELLO], "seed": 7, "temperature": 1.5, "max_tokens": 10}
    url = f"{server.base_url}/v1/completions"
    every = httpx.post(url, json={**common, "n": 3, "logprobs": 0}, timeout=60).json()
    best = httpx.post(url, json={**common, "n": 2, "best_of": 3}, timeout=60).json()
    validate("CreateCompletionResponse", best)

    def mean(choice: dict) -> float:
        values = choice["logprobs"]["token_logprobs"]
        return sum(values) / len(values)

    expected = []
    for p in range(2):
        candidates = every["choices"][p * 3 : p * 3 + 3]
        assert len({c["text"] for c in candidates}) > 1  # the sampling really differs
        expected += [c["text"] for c in sorted(candidates, key=mean, reverse=True)[:2]]
    assert [c["text"] for c in best["choices"]] == expected
    assert [c["index"] for c in best["choices"]] == [0, 1, 2, 3]
    assert all(c["logprobs"] is None for c in best["choices"])  # ranked by them, not asked for
    assert best["usage"] == every["usage"]  # every candidate was generated, and counts

"""Reasoning models: ``<think>...</think>`` goes to ``reasoning_content``, never to ``content``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from sanic_serve.parsing.reasoning import ReasoningParser, prompt_opens_reasoning
from tests.server import ServerProcess, model_with_template


def split_in_pieces(text: str, size: int, opened: bool) -> tuple[str, str]:
    p = ReasoningParser(opened)
    reasoning = content = ""
    for i in range(0, len(text), size):
        out = p.feed(text[i : i + size])
        reasoning, content = reasoning + out.reasoning, content + out.content
    out = p.finish()
    return reasoning + out.reasoning, content + out.content


def test_split_is_independent_of_chunking() -> None:
    text = "<think>weigh options</think>\nThe answer is 4."
    assert split_in_pieces(text, len(text), False) == ("weigh options", "The answer is 4.")
    for size in (1, 2, 3, 5, 8):
        assert split_in_pieces(text, size, False) == ("weigh options", "The answer is 4.")
    # The prompt opened <think> already (Qwen3-style templates): no opening tag in the output.
    assert split_in_pieces("hmm</think>\n\nYes.", 2, True) == ("hmm", "Yes.")
    assert split_in_pieces("no tags at all", 3, False) == ("", "no tags at all")
    assert split_in_pieces("cut off <thi", 4, False) == ("", "cut off <thi")


def test_prompt_opens_reasoning() -> None:
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<think>a</think><|im_start|>assistant\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_reasoning_content_stream_and_non_stream(
    server: ServerProcess, demo_model: Path, tmp_path: Path
) -> None:
    def open_thinking(template: str) -> str:
        # A template that opens the model's thinking at the start of every answer.
        opened = template.replace(
            "{{- '<|im_start|>assistant\\n' }}{%- endif %}",
            "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}",
        )
        return opened + "{#- answers follow </think> -#}"

    folder = model_with_template(demo_model, tmp_path / "thinking-model", open_thinking)
    body = {
        "model": str(folder),
        "messages": [{"role": "user", "content": "Hello!"}],
        "temperature": 0,
        "max_tokens": 12,
    }
    whole = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120).json()
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"]  # the demo model never closes the thought
    assert message["content"] == ""
    raw = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ).text
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == ""


# --- reasoning_effort ---------------------------------------------------------------------------

GENERATION_PROMPT = "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
HELLO = [{"role": "user", "content": "Hello!"}]


def prompt_tokens(server: ServerProcess, model: str, **fields: object) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 1, **fields}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)


def test_reasoning_effort_switches_thinking(server: ServerProcess, demo_model: Path, tmp_path: Path) -> None:
    def with_switch(template: str) -> str:
        # Qwen3's switch: thinking off pre-writes an empty thought.
        off = "{%- if enable_thinking is defined and enable_thinking is false %}"
        return template.replace(
            GENERATION_PROMPT, GENERATION_PROMPT + off + "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
        )

    model = str(model_with_template(demo_model, tmp_path / "switch", with_switch))

    def count(**fields: object) -> int:
        resp = prompt_tokens(server, model, **fields)
        assert resp.status_code == 200, resp.text
        return int(resp.json()["usage"]["prompt_tokens"])

    thinking = count()
    assert count(reasoning_effort="high") == count(reasoning_effort="low") == thinking
    assert count(reasoning_effort="none") > thinking  # the empty thought is in the prompt
    # explicit template variables win over the effort
    assert count(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}) == thinking


def test_reasoning_effort_reaches_a_template_that_reads_it(
    server: ServerProcess, demo_model: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer
    from transformers.utils.chat_template_utils import render_jinja_template

    def with_effort(template: str) -> str:
        line = (
            "{%- if reasoning_effort is defined %}{{- 'Reasoning: ' + reasoning_effort + '\\n' }}{%- endif %}"
        )
        return line + template

    folder = model_with_template(demo_model, tmp_path / "effort", with_effort)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = (folder / "chat_template.jinja").read_text()
    for effort in ("minimal", "xhigh"):
        rendered, _ = render_jinja_template(
            [HELLO], chat_template=template, add_generation_prompt=True, reasoning_effort=effort
        )
        assert f"Reasoning: {effort}" in rendered[0]
        expected = len(tokenizer.encode(rendered[0], add_special_tokens=False).ids)
        resp = prompt_tokens(server, str(folder), reasoning_effort=effort)
        assert resp.json()["usage"]["prompt_tokens"] == expected


def test_reasoning_effort_without_a_control_is_400(server: ServerProcess) -> None:
    resp = prompt_tokens(server, "hfserve-demo", reasoning_effort="low")
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "reasoning_effort"
    assert prompt_tokens(server, "hfserve-demo", reasoning_effort="extreme").status_code == 400

"""Output parsing by the tokenizer's own ``response_template``: unit, then through the real server
with copies of the demo model whose tokenizer ships a template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from model_host.demo.corpus import ADD_TOOL, WEATHER_TOOL
from sanic_serve.parsing.response_template import FALLBACK_TEMPLATES, TemplateParser, template_call_markup
from tests.server import ServerProcess, model_with_template

# The shapes tokenizers ship: Qwen 2/3's, and the fallbacks for Qwen 3.5 and Gemma 4.
QWEN: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}
XML_CALLS = FALLBACK_TEMPLATES["qwen3_5"]
GEMMA = FALLBACK_TEMPLATES["gemma4"]
PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
ADD = [ADD_TOOL]


def parse(
    template: dict[str, Any], text: str, size: int, prompt: str = PROMPT, tools: Any = ADD
) -> tuple[str, str, list[tuple[str, dict[str, Any]]]]:
    """(content, reasoning, calls) of ``text`` fed in pieces of ``size`` characters."""
    p = TemplateParser(template, prompt, tools)
    content, reasoning, calls = "", "", []
    for out in [p.feed(text[i : i + size]) for i in range(0, len(text), size)] + [p.finish()]:
        content += out.content
        reasoning += out.reasoning
        calls += [(c.name, json.loads(c.arguments)) for c in out.calls]
    return content, reasoning, calls


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_qwen_shape_reasoning_content_and_calls(size: int) -> None:
    text = (
        "<think>\nadd them\n</think>\n\nSure.\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>'
    )
    assert parse(QWEN, text, size) == (
        "Sure.",
        "add them\n",
        [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})],
    )


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_xml_calls_are_typed_by_the_tool_schema(size: int) -> None:
    text = (
        "<think>\n\n</think>\n\n<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
        "<parameter=b>\n-2\n</parameter>\n</function>\n</tool_call>"
    )
    assert parse(XML_CALLS, text, size) == ("", "", [("add", {"a": 1, "b": -2})])


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_special_token_markers_and_unquoted_json(size: int) -> None:
    text = (
        "<|channel>thought\nweather?<channel|>Checking."
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    )
    got = parse(GEMMA, text, size, prompt="<|turn>user\nweather<turn|>\n<|turn>model\n", tools=[WEATHER_TOOL])
    assert got == ("Checking.", "weather?", [("get_weather", {"city": "Paris"})])


def test_the_prompt_can_open_the_reasoning() -> None:
    assert parse(QWEN, "plan</think>answer", 1, prompt=PROMPT + "<think>\n") == ("answer", "plan", [])


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_malformed_call_is_shown_and_parsing_goes_on(size: int) -> None:
    call = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    text = f"Hi <tool_call>not json</tool_call> then {call}"
    assert parse(QWEN, text, size) == ("Hinot json then", "", [("add", {"a": 1})])


PYTHON_CALLS: dict[str, Any] = {
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open": "<calls>",
            "close": "</calls>",
            "content": "python-call-list",
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{arguments}"}},
            "transform_each": True,
        },
        "content": {"content": "text"},
    },
}


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_a_region_that_raises_loses_nothing_around_it(size: int) -> None:
    # transformers' python-call-list parser raises on a malformed list (the JSON one is told not
    # to): the text before it in the same delta, and a good call there, must survive.
    good, bad = "<calls>[add(a=1, b=2)]</calls>", "<calls>[add(a=</calls>"
    assert parse(PYTHON_CALLS, f"hi {good} x {bad} tail", size) == (
        "hi  x [add(a= tail",
        "",
        [("add", {"a": 1, "b": 2})],
    )
    # the reply ends inside a call that cannot parse: shown as text
    assert parse(PYTHON_CALLS, f"hi {good} <calls>[add(a=", size)[0] == "hi  [add(a="


def test_without_tools_call_markup_is_content() -> None:
    text = 'See <tool_call>{"name": "add", "arguments": {}}</tool_call>'
    assert parse(QWEN, text, 2, tools=None) == (text, "", [])


def test_forced_calls_use_the_markup_the_template_reads() -> None:
    assert template_call_markup(QWEN) == "hermes"
    assert template_call_markup(XML_CALLS) == "qwen3_xml"
    assert template_call_markup(GEMMA) == "gemma4"


# --- through the real server -----------------------------------------------------------------


def hide_call_markup(template: str) -> str:
    """The demo chat template with its ``<tool_call>`` literal split in two: the template renders
    the same prompt, but hfserve can no longer tell the markup from the chat template, so only a
    response template can read the model's calls."""
    return template.replace("<tool_call>", "<tool' ~ '_call>")


def with_response_template(folder: Path, template: dict[str, Any]) -> Path:
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["response_template"] = template
    config_file.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def models(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("response-template-models")
    plain = model_with_template(demo_model, root / "plain", hide_call_markup)
    templated = with_response_template(
        model_with_template(demo_model, root / "templated", hide_call_markup), QWEN
    )

    def open_reflection(template: str) -> str:
        return template.replace(
            "{{- '<|im_start|>assistant\\n' }}{%- endif %}",
            "{{- '<|im_start|>assistant\\n<reflect>\\n' }}{%- endif %}",
        )

    reflect = {
        **QWEN,
        "fields": {**QWEN["fields"], "reasoning_content": {"open": "<reflect>", "close": "</reflect>"}},
    }
    reflective = with_response_template(
        model_with_template(demo_model, root / "reflective", open_reflection), reflect
    )
    return {"plain": str(plain), "templated": str(templated), "reflective": str(reflective)}


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_without_the_template_the_call_is_not_read(server: ServerProcess, models: dict[str, str]) -> None:
    # The control: the same model and prompt, no response template, no recognisable markup.
    reply = client(server).chat.completions.create(
        model=models["plain"], messages=ASK, tools=[WEATHER_TOOL], temperature=0
    )
    assert reply.choices[0].message.tool_calls is None
    assert "get_weather" in (reply.choices[0].message.content or "")


def test_the_template_reads_calls_stream_and_non_stream(
    server: ServerProcess, models: dict[str, str]
) -> None:
    c = client(server)
    kwargs: dict[str, Any] = dict(
        model=models["templated"], messages=ASK, tools=[WEATHER_TOOL], temperature=0
    )
    whole = c.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.content is None
    (call,) = whole.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(c.chat.completions.create(stream=True, **kwargs))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"

    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"weather": "sunny, 22 C"})},
    ]
    final = c.chat.completions.create(**{**kwargs, "messages": messages})
    assert final.choices[0].message.content == "The weather in Paris is sunny, 22 C."


def test_required_tool_choice_in_the_templates_markup(server: ServerProcess, models: dict[str, str]) -> None:
    reply = client(server).chat.completions.create(
        model=models["templated"],
        messages=[{"role": "user", "content": "Tell me a joke"}],
        tools=[ADD_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD_TOOL["function"]["parameters"])


def test_the_templates_reasoning_markers(server: ServerProcess, models: dict[str, str]) -> None:
    # The prompt opens <reflect>, a marker only the response template knows: the demo model never
    # closes it, so its whole reply is reasoning, streamed or not.
    body = {
        "model": models["reflective"],
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 12,
    }
    body["temperature"] = 0
    whole = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120).json()
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"] == ""
    raw = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ).text
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in raw.split("\n\n") if e.startswith("data: {")]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == ""


@pytest.mark.parametrize("model_type", ["qwen3_5", "gemma4"])
def test_families_without_a_template_get_their_fallback(
    demo_model: Path, tmp_path: Path, model_type: str
) -> None:
    from sanic_serve.models import RESPONSE_TEMPLATE, load_bundle

    folder = tmp_path / model_type
    shutil.copytree(demo_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    bundle = load_bundle("m", folder)
    assert bundle.reads_response_template and bundle.tool_parser == RESPONSE_TEMPLATE
    assert bundle.response_template == FALLBACK_TEMPLATES[model_type]
    # the tokenizer's own template comes first
    own = with_response_template(folder, QWEN)
    assert load_bundle("m", own).response_template == QWEN
    # and a family that the markup parsers read keeps them
    assert load_bundle("d", demo_model).tool_parser == "hermes"


FORECAST_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "forecast",
        "description": "Weather forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "detailed": {"type": "boolean"},
                "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            },
            "required": ["city", "days", "code"],
        },
    },
}


@pytest.mark.parametrize("family", ["qwen3_5", "gemma4"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "forecast"}}])
def test_forced_calls_in_non_json_markup(
    server: ServerProcess, demo_model: Path, tmp_path: Path, choice: Any, family: str
) -> None:
    # Call formats that are not JSON: Qwen 3.5's <function=...><parameter=...> blocks, Gemma 4's
    # call:NAME{key:<|"|>text<|"|>}. The grammar writes them; the template's reader takes them back,
    # typing values by the schema.
    folder = tmp_path / f"{family}-calls"
    shutil.copytree(demo_model, folder)
    with_response_template(folder, FALLBACK_TEMPLATES[family])
    reply = client(server).chat.completions.create(
        model=str(folder),
        messages=[{"role": "user", "content": "Hello!"}],
        tools=[ADD_TOOL, FORECAST_TOOL],  # type: ignore[list-item]
        tool_choice=choice,
        temperature=1.0,
        seed=4,
        max_tokens=400,  # room for a long sampled string (150 ran out for 5 of 32 seeds x cases)
    )
    assert reply.choices[0].finish_reason == "tool_calls", reply
    (call,) = reply.choices[0].message.tool_calls or []
    tool = {"add": ADD_TOOL, "forecast": FORECAST_TOOL}[call.function.name]
    if choice != "required":
        assert call.function.name == "forecast"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

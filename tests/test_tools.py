"""Tool calling: parsing (unit), and the demo model's calls through the real server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from model_host.demo.corpus import ADD_TOOL, WEATHER_TOOL
from sanic_serve.parsing.assembler import ChoiceAssembler, MarkupOutput
from sanic_serve.parsing.tool_parsers import HermesToolParser
from tests.openapi import validate
from tests.server import ServerProcess

MODEL = "hfserve-demo"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def parse_in_pieces(text: str, size: int) -> tuple[str, list[tuple[str, str]]]:
    p = HermesToolParser()
    content, calls = "", []
    for i in range(0, len(text), size):
        out = p.feed(text[i : i + size])
        content += out.content
        calls += [(c.name, c.arguments) for c in out.calls]
    out = p.finish()
    return content + out.content, calls + [(c.name, c.arguments) for c in out.calls]


def test_hermes_parser_is_split_independent() -> None:
    text = (
        'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call> done'
    )
    whole = parse_in_pieces(text, len(text))
    assert whole == ("Sure.  done", [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Oslo"}')])
    for size in (1, 2, 3, 7, 13):
        assert parse_in_pieces(text, size) == whole


def test_hermes_parser_keeps_bad_calls_as_text() -> None:
    assert parse_in_pieces("a <tool_call>not json</tool_call> b", 4) == (
        "a <tool_call>not json</tool_call> b",
        [],
    )
    assert parse_in_pieces("x <tool_c", 2) == ("x <tool_c", [])
    # a call cut off by the length limit, JSON complete: still a call
    assert parse_in_pieces('<tool_call>{"name": "f", "arguments": {}}', 5) == ("", [("f", "{}")])


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    out = ChoiceAssembler(MarkupOutput(HermesToolParser()), parallel_tool_calls=False)
    out.feed(
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    out.finish()
    assert [c.name for c in out.calls] == ["a"]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def test_tool_call_non_stream_and_stream_agree(server: ServerProcess) -> None:
    c = client(server)
    whole = c.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(
        c.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], temperature=0, stream=True)
    )
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "<tool_call>" not in content and content == ""
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    streamed_args = "".join(d.function.arguments or "" for d in deltas)
    assert streamed_args == call.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_tool_result_conversation_continues(server: ServerProcess) -> None:
    c = client(server)
    first = c.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER_TOOL, ADD_TOOL], temperature=0
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"weather": "sunny, 22 C"})},
    ]
    final = c.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL, ADD_TOOL], temperature=0
    )
    assert final.choices[0].message.content == "The weather in Paris is sunny, 22 C."
    assert final.choices[0].finish_reason == "stop"


def test_sum_tool_call(server: ServerProcess) -> None:
    reply = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 4 plus 5?"}],
        tools=[ADD_TOOL],
        temperature=0,
    )
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 4, "b": 5}


def test_tool_choice_none_shows_the_tools(server: ServerProcess) -> None:
    hello = [{"role": "user", "content": "Hello!"}]
    reply = client(server).chat.completions.create(
        model=MODEL, messages=hello, tools=[WEATHER_TOOL], tool_choice="none", temperature=0
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == "Hello! How can I help you today?"
    # As with OpenAI, the model sees the tools (they are in the prompt); it just cannot call one.
    offered = client(server).chat.completions.create(
        model=MODEL, messages=hello, tools=[WEATHER_TOOL], temperature=0, max_tokens=1
    )
    bare = client(server).chat.completions.create(model=MODEL, messages=hello, temperature=0, max_tokens=1)
    assert reply.usage and offered.usage and bare.usage
    assert reply.usage.prompt_tokens == offered.usage.prompt_tokens > bare.usage.prompt_tokens


def streamed_reply(server: ServerProcess, **body: object) -> tuple[str, str | None, bool]:
    """Content, finish reason, and whether any call delta came, of a streamed chat reply."""
    content, finish, called = "", None, False
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json={"model": MODEL, "stream": True, **body}
    ) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice["delta"]
                content += delta.get("content") or ""
                called |= bool(delta.get("tool_calls") or delta.get("function_call"))
                finish = choice["finish_reason"] or finish
    return content, finish, called


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("nudge", [False, True])
def test_tool_choice_none_never_lets_call_markup_through(
    server: ServerProcess, demo_model: Path, stream: bool, nudge: bool
) -> None:
    """Asked for the weather, the demo model calls get_weather; with tool_choice "none" (even
    with a logit_bias pushing for the call marker) no call and no call markup come out."""
    from tokenizers import Tokenizer

    marker = Tokenizer.from_file(str(demo_model / "tokenizer.json")).token_to_id("<tool_call>")
    body: dict[str, object] = {"messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "none"}
    body |= {"temperature": 0, "max_tokens": 40}
    body |= {"logit_bias": {str(marker): 100}} if nudge else {}
    if stream:
        content, finish, called = streamed_reply(server, **body)
    else:
        choice = post_chat(server, **body).json()["choices"][0]
        content, finish = choice["message"]["content"] or "", choice["finish_reason"]
        called = bool(choice["message"].get("tool_calls"))
    assert not called and finish in ("stop", "length")
    assert "tool_call" not in content, content
    functions = post_chat(server, messages=ASK, functions=[WEATHER_TOOL["function"]], function_call="none")
    message = functions.json()["choices"][0]["message"]
    assert "function_call" not in message and "tool_call" not in (message["content"] or "")


def test_tool_choice_none_drops_a_call_the_model_writes_anyway() -> None:
    out = ChoiceAssembler(MarkupOutput(HermesToolParser()), calls_allowed=False)
    parsed = out.feed_last('Sure. <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert out.calls == [] and parsed.calls == []
    assert out.content == "Sure. " and out.finish_reason("stop") == "stop"


def test_named_tool_choice_is_enforced(server: ServerProcess) -> None:
    # "Hello!" never leads the demo model to a call on its own; a named tool_choice forces one.
    reply = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello!"}],
        tools=[WEATHER_TOOL, ADD_TOOL],
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0,
        max_tokens=60,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD_TOOL["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_gives_a_valid_call(server: ServerProcess, stream: bool) -> None:
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a joke"}],
        tools=[WEATHER_TOOL, ADD_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    if stream:
        chunks = list(client(server).chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
        deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        name = deltas[0].function.name
        arguments = "".join(d.function.arguments or "" for d in deltas)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
    else:
        reply = client(server).chat.completions.create(**kwargs)  # type: ignore[call-overload]
        (call,) = reply.choices[0].message.tool_calls or []
        name, arguments, finish = call.function.name, call.function.arguments, reply.choices[0].finish_reason
    assert finish == "tool_calls"
    tool = {"get_weather": WEATHER_TOOL, "add": ADD_TOOL}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_tool_choice_naming_an_unknown_function_is_400(server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client(server).chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert exc.value.body["param"] == "tool_choice"  # type: ignore[index]


def _run(parser_cls: type, text: str, size: int) -> tuple[str, list[tuple[str, dict]]]:
    p = parser_cls()
    content, calls = "", []
    for i in range(0, len(text), size):
        out = p.feed(text[i : i + size])
        content += out.content
        calls += [(c.name, json.loads(c.arguments)) for c in out.calls]
    out = p.finish()
    return content + out.content, calls + [(c.name, json.loads(c.arguments)) for c in out.calls]


@pytest.mark.parametrize("size", [1, 3, 100])
def test_llama3_json_parser(size: int) -> None:
    from sanic_serve.parsing.tool_parsers import Llama3JsonToolParser as P

    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert _run(P, call, size) == ("", [("get_weather", {"city": "Paris"})])
    assert _run(P, "<|python_tag|>" + call + "; " + call, size)[1] == [("get_weather", {"city": "Paris"})] * 2
    assert _run(P, "Plain answer {not a call}", size) == ("Plain answer {not a call}", [])
    assert _run(P, "{broken json", size) == ("{broken json", [])


@pytest.mark.parametrize("size", [1, 4, 100])
def test_mistral_parser(size: int) -> None:
    from sanic_serve.parsing.tool_parsers import MistralToolParser as P

    body = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 3, "b": 4}}]'
    expected = [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    assert _run(P, "[TOOL_CALLS]" + body, size) == ("", expected)
    assert _run(P, body, size) == ("", expected)  # the marker was a special token, already dropped
    assert _run(P, "[1, 2] is a list", size) == ("[1, 2] is a list", [])


def test_parser_detection() -> None:
    from sanic_serve.parsing.tool_parsers import detect_parser

    assert detect_parser("... <tool_call> ...") == "hermes"
    assert detect_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("Environment: ipython") == "llama3_json"
    assert detect_parser("{{ messages }}") is None


def test_tool_parser_option_overrides_the_template(cache_dir: Path, demo_model: Path) -> None:
    # Hermes markup read by the Llama-3 parser is plain content: the option really is applied.
    with ServerProcess.start(cache_dir, workers=1, args=("--tool-parser", "llama3_json")) as srv:
        reply = client(srv).chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER_TOOL], temperature=0
        )
    assert reply.choices[0].message.tool_calls is None
    assert (reply.choices[0].message.content or "").startswith("<tool_call>")


# --- the deprecated functions API, served as tools ----------------------------------------------

WEATHER_FUNCTION = WEATHER_TOOL["function"]


def post_chat(server: ServerProcess, **body: object) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"model": MODEL, "temperature": 0, **body}, timeout=60
    )


def test_functions_api_call_stream_and_not(server: ServerProcess) -> None:
    whole = post_chat(server, messages=ASK, functions=[WEATHER_FUNCTION]).json()
    validate("CreateChatCompletionResponse", whole)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "function_call"
    message = choice["message"]
    assert "tool_calls" not in message and message["content"] is None
    assert message["function_call"]["name"] == "get_weather"
    assert json.loads(message["function_call"]["arguments"]) == {"city": "Paris"}

    raw = post_chat(server, messages=ASK, functions=[WEATHER_FUNCTION], stream=True).text
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["function_call"] for d in deltas if "function_call" in d]
    assert calls[0] == {"name": "get_weather", "arguments": ""}
    assert "".join(c["arguments"] for c in calls) == message["function_call"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"
    assert not any("tool_calls" in d for d in deltas)


def test_functions_api_conversation_continues(server: ServerProcess) -> None:
    first = post_chat(server, messages=ASK, functions=[WEATHER_FUNCTION]).json()
    call = first["choices"][0]["message"]["function_call"]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "function_call": call},
        {"role": "function", "name": "get_weather", "content": json.dumps({"weather": "sunny, 22 C"})},
    ]
    final = post_chat(server, messages=messages, functions=[WEATHER_FUNCTION]).json()
    assert final["choices"][0]["message"]["content"] == "The weather in Paris is sunny, 22 C."
    # the typed client reads the old shape too
    reply = client(server).chat.completions.create(
        model=MODEL,
        messages=ASK,
        functions=[WEATHER_FUNCTION],
        temperature=0,  # type: ignore[list-item]
    )
    assert reply.choices[0].message.function_call is not None
    assert reply.choices[0].message.function_call.name == "get_weather"


def test_function_call_named_and_none(server: ServerProcess) -> None:
    hello = [{"role": "user", "content": "Hello!"}]
    forced = post_chat(
        server,
        messages=hello,
        functions=[WEATHER_FUNCTION, ADD_TOOL["function"]],
        function_call={"name": "add"},
    ).json()
    assert forced["choices"][0]["finish_reason"] == "function_call"
    call = forced["choices"][0]["message"]["function_call"]
    assert call["name"] == "add"
    jsonschema.validate(json.loads(call["arguments"]), ADD_TOOL["function"]["parameters"])
    quiet = post_chat(server, messages=ASK, functions=[WEATHER_FUNCTION], function_call="none").json()
    assert "function_call" not in quiet["choices"][0]["message"]
    assert quiet["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"functions": [WEATHER_FUNCTION], "tools": [WEATHER_TOOL]}, "functions"),
        ({"functions": [WEATHER_FUNCTION], "function_call": {"name": "nope"}}, "function_call"),
        ({"function_call": {"name": "get_weather"}}, "function_call"),
        ({"functions": []}, "functions"),
    ],
)
def test_bad_functions_requests(server: ServerProcess, body: dict[str, object], param: str) -> None:
    resp = post_chat(server, messages=ASK, **body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param

"""Anthropic's Messages API end to end: the real ``anthropic`` SDK and raw HTTP against the shared
demo server, checked against chat completions for the same greedy conversation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from model_host.demo.corpus import ADD_TOOL, WEATHER_TOOL
from tests.server import ServerProcess, model_with_template

MODEL = "hfserve-demo"
# The SDK no longer has sampling parameters (Anthropic's newer models fix them); greedy rides as an extra.
GREEDY = {"temperature": 0}
TIMEOUT_S = 120.0
WEATHER = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
ADD = {
    "name": "add",
    "description": ADD_TOOL["function"]["description"],
    "input_schema": ADD_TOOL["function"]["parameters"],
}
ASK_PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def sdk(server: ServerProcess) -> Any:  # the SDK's typed params take no plain dicts
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def chat_text(server: ServerProcess, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    client: Any = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)
    return resp.choices[0].message.content or ""


def post(server: ServerProcess, body: Any, path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=TIMEOUT_S)


def sse_events(server: ServerProcess, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A raw stream's events as (event name, payload); the name must match the payload's type."""
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream(
        "POST", f"{server.base_url}/v1/messages", json={**body, "stream": True}, timeout=TIMEOUT_S
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                payload = json.loads(line[len("data: ") :])
                assert payload["type"] == name
                events.append((name, payload))
    return events


def check_order(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Anthropic's stream grammar: message_start, (ping | block start, deltas, stop)*, message_delta,
    message_stop; blocks numbered 0, 1, ... in order. Returns the blocks the deltas build."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    blocks: list[dict[str, Any]] = []
    open_index: int | None = None
    partial: dict[int, str] = {}
    for name, payload in events[1:-2]:
        if name == "ping":
            continue
        if name == "content_block_start":
            assert open_index is None and payload["index"] == len(blocks)
            open_index = payload["index"]
            blocks.append(dict(payload["content_block"]))
        elif name == "content_block_delta":
            assert payload["index"] == open_index
            delta = payload["delta"]
            if delta["type"] == "text_delta":
                blocks[-1]["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                blocks[-1]["thinking"] += delta["thinking"]
            else:
                assert delta["type"] == "input_json_delta"
                partial[payload["index"]] = partial.get(payload["index"], "") + delta["partial_json"]
        else:
            assert name == "content_block_stop" and payload["index"] == open_index, (name, payload)
            open_index = None
    assert open_index is None
    for index, joined in partial.items():
        blocks[index]["input"] = json.loads(joined)  # the pieces parse once joined
    return blocks


def test_create_equals_chat_completions(server: ServerProcess) -> None:
    msg = sdk(server).messages.create(
        model=MODEL, max_tokens=64, extra_body=GREEDY, messages=[{"role": "user", "content": "Hello!"}]
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello! How can I help you today?"
    assert msg.content[0].text == chat_text(server, [{"role": "user", "content": "Hello!"}])
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 10  # the sentence's 9 tokens and the end of turn, as chat counts
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 5


def test_system_and_history_equal_chat(server: ServerProcess) -> None:
    system = "You are a helpful assistant."
    history: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi there! What can I do for you?"}]},
        {"role": "user", "content": "Tell me a joke"},
    ]
    msg = sdk(server).messages.create(
        model=MODEL,
        max_tokens=64,
        extra_body=GREEDY,
        system=[{"type": "text", "text": system}],
        messages=history,
    )
    chat = [{"role": "system", "content": system}] + [
        {
            "role": m["role"],
            "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"],
        }
        for m in history
    ]
    assert msg.content[0].text == chat_text(server, chat)
    assert msg.content[0].text  # (the demo model knows no multi-turn chat)


def test_stream_final_message_equals_create(server: ServerProcess) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": ASK_PARIS}
    for extra in ({}, {"tools": [WEATHER, ADD], "tool_choice": {"type": "tool", "name": "get_weather"}}):
        whole = sdk(server).messages.create(**body, **extra, extra_body=GREEDY)
        with sdk(server).messages.stream(**body, **extra, extra_body=GREEDY) as stream:
            final = stream.get_final_message()
        a, b = whole.model_dump(), final.model_dump()
        for m in (a, b):
            m.pop("id")
            m["usage"]["input_tokens"] += m["usage"]["cache_read_input_tokens"]  # the prefix cache may differ
            m["usage"]["cache_read_input_tokens"] = 0
            for block in m["content"]:
                block.pop("id", None)  # tool_use ids are fresh per response
        assert a == b


def test_stream_event_order_text_and_tool(server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Count to five"}],
    }
    events = sse_events(server, body)
    blocks = check_order(events)
    assert blocks == [{"type": "text", "text": "One, two, three, four, five."}]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] > 0

    forced = {
        **body,
        "messages": ASK_PARIS,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    events = sse_events(server, forced)
    blocks = check_order(events)
    assert [b["type"] for b in blocks] == ["tool_use"]
    assert blocks[0]["name"] == "get_weather" and blocks[0]["id"].startswith("toolu_")
    jsonschema.validate(blocks[0]["input"], WEATHER["input_schema"])
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_forced_tool_call_and_tool_result_turn(server: ServerProcess) -> None:
    client = sdk(server)
    for name, question in (
        ("get_weather", ASK_PARIS),
        ("add", [{"role": "user", "content": "What is 2 plus 3?"}]),
    ):
        msg = client.messages.create(
            model=MODEL,
            max_tokens=64,
            extra_body=GREEDY,
            messages=question,
            tools=[WEATHER, ADD],
            tool_choice={"type": "tool", "name": name},
        )
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert len(uses) == 1 and uses[0].name == name, msg.content
        schema = (WEATHER if name == "get_weather" else ADD)["input_schema"]
        jsonschema.validate(uses[0].input, schema)
        assert msg.stop_reason == "tool_use"
    weather = client.messages.create(
        model=MODEL,
        max_tokens=64,
        extra_body=GREEDY,
        messages=ASK_PARIS,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    call = next(b for b in weather.content if b.type == "tool_use")
    assert call.input == {"city": "Paris"}
    turn = [
        *ASK_PARIS,
        {"role": "assistant", "content": [b.model_dump() for b in weather.content]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": json.dumps({"weather": "sunny, 22 C"}),
                }
            ],
        },
    ]
    reply = client.messages.create(
        model=MODEL, max_tokens=64, extra_body=GREEDY, messages=turn, tools=[WEATHER]
    )
    assert reply.stop_reason == "end_turn"
    assert reply.content[0].text == "The weather in Paris is sunny, 22 C."


def test_count_tokens_equals_billed_input(server: ServerProcess) -> None:
    client = sdk(server)
    for extra in ({}, {"system": "You are a helpful assistant.", "tools": [WEATHER, ADD]}):
        counted = client.messages.count_tokens(model=MODEL, messages=ASK_PARIS, **extra)
        msg = client.messages.create(
            model=MODEL, max_tokens=8, extra_body=GREEDY, messages=ASK_PARIS, **extra
        )
        assert counted.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    bare = client.messages.count_tokens(model=MODEL, messages=ASK_PARIS)
    with_tools = client.messages.count_tokens(model=MODEL, messages=ASK_PARIS, tools=[WEATHER])
    assert with_tools.input_tokens > bare.input_tokens  # the tools are part of the prompt


def test_stop_sequences_and_max_tokens(server: ServerProcess) -> None:
    client = sdk(server)
    hello = [{"role": "user", "content": "Hello!"}]
    msg = client.messages.create(
        model=MODEL, max_tokens=64, extra_body=GREEDY, messages=hello, stop_sequences=["help"]
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "help"
    assert msg.content[0].text == "Hello! How can I "
    short = client.messages.create(model=MODEL, max_tokens=2, extra_body=GREEDY, messages=hello)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


BAD: list[tuple[str, Any, str]] = [
    ("missing max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
    (
        "tool_result without its tool_use",
        {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}],
                }
            ],
        },
        "toolu_x",
    ),
    (
        "unknown block type",
        {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}],
        },
        "messages.0.content.0",
    ),
    (
        "an image to a text model",
        {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                        }
                    ],
                }
            ],
        },
        "takes no images",
    ),
    (
        "max_tokens of the wrong type",
        {"model": MODEL, "max_tokens": "ten", "messages": [{"role": "user", "content": "Hi"}]},
        "max_tokens",
    ),
    (
        "a role Anthropic lacks",
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "system", "content": "Hi"}]},
        "role",
    ),
    (
        "a server tool",
        {
            "model": MODEL,
            "max_tokens": 8,
            "messages": ASK_PARIS,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
        "web_search_20250305",
    ),
    (
        "tool_choice naming no offered tool",
        {
            "model": MODEL,
            "max_tokens": 8,
            "messages": ASK_PARIS,
            "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "nope"},
        },
        "nope",
    ),
    ("not an object", [1, 2], "JSON object"),
]


@pytest.mark.parametrize(("what", "body", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_anthropic_400s(server: ServerProcess, what: str, body: Any, says: str) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        if what == "missing max_tokens" and path.endswith("count_tokens"):
            continue  # count_tokens takes no max_tokens
        r = post(server, body, path)
        assert r.status_code == 400, (path, r.text)
        err = r.json()
        assert err["type"] == "error" and set(err) == {"type", "error"}
        assert err["error"]["type"] == "invalid_request_error"
        assert says in err["error"]["message"], err


def test_other_errors_keep_their_shapes(server: ServerProcess) -> None:
    r = post(server, {"model": "no-such-model", "max_tokens": 8, "messages": ASK_PARIS})
    assert (
        r.status_code == 404
        and r.json()["error"]["type"] == "not_found_error"
        and r.json()["type"] == "error"
    )
    with pytest.raises(anthropic.NotFoundError):
        sdk(server).messages.create(model="no-such-model", max_tokens=8, messages=ASK_PARIS)
    r = httpx.post(f"{server.base_url}/v1/messages", content=b"{not json", timeout=TIMEOUT_S)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # The OpenAI routes keep OpenAI's shape.
    r = post(server, {"model": MODEL}, "/v1/chat/completions")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # And the server still serves.
    ok = post(
        server,
        {"model": MODEL, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "Hi there! What can I do for you?"


def test_mixed_batch_equals_lone_outputs(server: ServerProcess) -> None:
    prompts = [
        "Hello!",
        "Tell me a joke",
        "Count to five",
        "What is hfserve?",
        "Goodbye",
        "Who are you?",
        "What color is the sky?",
        "Say something nice",
    ]
    # Alone, a Messages reply is the chat reply (the tests above); so each reply below, in one mixed
    # batch, must equal the lone chat reply to its prompt.
    lone = {p: chat_text(server, [{"role": "user", "content": p}], max_tokens=64) for p in prompts}

    async def run() -> tuple[list[str], list[str]]:
        a: Any = anthropic.AsyncAnthropic(
            base_url=server.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S
        )
        o = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

        async def one_msg(p: str) -> str:
            m = await a.messages.create(
                model=MODEL, max_tokens=64, extra_body=GREEDY, messages=[{"role": "user", "content": p}]
            )
            return m.content[0].text

        async def one_chat(p: str) -> str:
            r = await o.chat.completions.create(
                model=MODEL, max_tokens=64, extra_body=GREEDY, messages=[{"role": "user", "content": p}]
            )
            return r.choices[0].message.content or ""

        return await asyncio.gather(
            asyncio.gather(*(one_msg(p) for p in prompts)), asyncio.gather(*(one_chat(p) for p in prompts))
        )

    msgs, chats = asyncio.run(run())
    assert msgs == [lone[p] for p in prompts]
    assert chats == [lone[p] for p in prompts]


SMALL_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_output_format_is_constrained_like_response_format(server: ServerProcess) -> None:
    ask = [{"role": "user", "content": "Count to five"}]
    fmt = {"type": "json_schema", "schema": SMALL_SCHEMA}
    texts = []
    for extra in ({"output_config": {"format": fmt}}, {"output_format": fmt}):
        r = post(server, {"model": MODEL, "max_tokens": 32, "temperature": 0, "messages": ask, **extra})
        assert r.status_code == 200, r.text
        texts.append(r.json()["content"][0]["text"])
    jsonschema.validate(json.loads(texts[0]), SMALL_SCHEMA)
    response_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": SMALL_SCHEMA}}
    assert texts == [chat_text(server, ask, max_tokens=32, response_format=response_format)] * 2


def test_thinking_on_a_model_without_reasoning_is_a_400(server: ServerProcess) -> None:
    body = {"model": MODEL, "max_tokens": 2048, "messages": ASK_PARIS}
    r = post(server, {**body, "thinking": {"type": "enabled", "budget_tokens": 1024}})
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert "no thinking control" in r.json()["error"]["message"] and "reasoning_effort" not in r.text
    # Disabled is the default, and fine anywhere.
    assert post(server, {**body, "max_tokens": 16, "thinking": {"type": "disabled"}}).status_code == 200
    short = post(server, {**body, "max_tokens": 1024, "thinking": {"type": "enabled", "budget_tokens": 1024}})
    assert short.status_code == 400 and "budget_tokens" in short.json()["error"]["message"]


def test_blocks_hold_whitespace_and_number_blocks() -> None:
    from sanic_serve.messages.blocks import Blocks
    from sanic_serve.parsing.tool_parsers import Parsed, ToolCall

    blocks = Blocks()
    events = blocks.feed(Parsed(content="\n"))  # whitespace alone opens nothing yet
    assert events == []
    events += blocks.feed(Parsed(reasoning="hmm"))
    events += blocks.feed(Parsed(content=" "))
    events += blocks.feed(Parsed(content="Hi"))
    events += blocks.feed(Parsed(content="\n", calls=[ToolCall("call_1", "add", '{"a": 1, "b": 2}')]))
    events += blocks.close()
    assert [b["type"] for b in blocks.blocks] == ["thinking", "text", "tool_use"]
    assert blocks.blocks[1]["text"] == " Hi\n" and blocks.blocks[2]["input"] == {"a": 1, "b": 2}
    assert check_order([("message_start", {}), *events, ("message_delta", {}), ("message_stop", {})]) == [
        {**b, "id": b.get("id")} if b["type"] == "tool_use" else b for b in blocks.blocks
    ]
    only_call = Blocks()
    only_call.feed(Parsed(content="  \n"))
    only_call.feed(Parsed(calls=[ToolCall("call_2", "add", "{}")]))
    assert [b["type"] for b in only_call.blocks] == ["tool_use"]  # no whitespace-only text block


def test_pings_while_no_token_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    from sanic_serve.messages import route

    monkeypatch.setattr(route, "PING_INTERVAL_S", 0.05)

    async def slow() -> Any:
        await asyncio.sleep(0.3)
        yield "first"
        yield "second"

    async def collect() -> list[Any]:
        return [item async for item in route._next_or_ping(slow())]

    items = asyncio.run(collect())
    assert items[-2:] == ["first", "second"]
    assert len(items) >= 4 and all(i is None for i in items[:-2])  # pings while the first waited


def test_too_large_body_is_an_anthropic_413(server: ServerProcess) -> None:
    # Over the generation routes' limit: 16 MiB, raised to fit one 20 MB image as a data URL.
    big = b'{"model": "x", "pad": "' + b"a" * (29 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{server.base_url}/v1/messages", content=big, timeout=TIMEOUT_S)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "request_too_large"


def test_conversation_maps_onto_chat_messages() -> None:
    from sanic_serve.messages.request import parse_messages_request
    from sanic_serve.messages.translate import to_chat

    body = {
        "model": MODEL,
        "max_tokens": 8,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "What is 2 plus 3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "add them", "signature": "s"},
                    {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "5"}],
                    },
                    {"type": "text", "text": "Thanks"},
                ],
            },
            {"role": "assistant", "content": "2 plus 3"},
        ],
        "tools": [ADD],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["."],
    }
    chat = to_chat(parse_messages_request(body))
    assert [m.for_template() for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "content": "5", "tool_call_id": "toolu_1"},  # results first, then the text
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "2 plus 3"},
    ]
    assert chat.continue_final_message and not chat.add_generation_prompt  # the last turn is a prefill
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.stop == ["."] and chat.max_tokens == 8
    assert chat.tools is not None and chat.tools[0].function.parameters == ADD["input_schema"]


def test_an_error_after_the_stream_began_is_an_error_event() -> None:
    from types import SimpleNamespace

    from sanic_serve.choices import Choice
    from sanic_serve.errors import Overloaded
    from sanic_serve.generation import Delta
    from sanic_serve.messages import route
    from sanic_serve.parsing.assembler import ChoiceAssembler

    class Gen:
        prompt_tokens, cached_tokens, completion_tokens = 5, 0, 1
        finish_reason = stop_sequence = None

        async def deltas(self) -> Any:
            yield Delta("Hel")
            raise Overloaded("The server is busy.")

    sent: list[bytes] = []

    class Response:
        async def send(self, data: bytes) -> None:
            sent.append(data)

        async def eof(self) -> None:
            sent.append(b"<eof>")

    async def respond(**kwargs: Any) -> Response:
        return Response()

    choice = Choice(0, Gen(), ChoiceAssembler())  # type: ignore[arg-type]
    asyncio.run(route._stream(SimpleNamespace(respond=respond), MODEL, choice))  # type: ignore[arg-type]
    text = b"".join(sent).decode()
    names = [line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "error"]
    last = json.loads(text.split("event: error\ndata: ")[1].split("\n")[0])
    assert last == {"type": "error", "error": {"type": "overloaded_error", "message": "The server is busy."}}
    assert sent[-1] == b"<eof>"


# --- thinking, end to end ------------------------------------------------------------------------
# The demo model's template has no reasoning; a copy whose template opens ``<think>`` when thinking is
# on (Qwen3's ``enable_thinking`` switch) runs on the shared server, loaded by its folder. The demo
# model never writes ``</think>``, so its whole reply is the thought: a text block after the thinking
# block is checked by ``test_blocks_hold_whitespace_and_number_blocks`` above.

ASSISTANT = "{{- '<|im_start|>assistant\\n' }}"
GENERATION_PROMPT = ASSISTANT + "{%- endif %}"
HELLO = {"role": "user", "content": "Hello!"}
THINKING = {"type": "enabled", "budget_tokens": 1024}  # Anthropic's least budget


@pytest.fixture(scope="module")
def thinking_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    def switch(template: str) -> str:
        opens = "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
        return template.replace(GENERATION_PROMPT, ASSISTANT + opens + "{%- endif %}") + (
            "{#- answers follow </think> -#}"  # what marks a template as one that reasons
        )

    return str(model_with_template(demo_model, tmp_path_factory.mktemp("messages") / "thinking", switch))


def test_thinking_block_stream_and_replay(server: ServerProcess, thinking_model: str) -> None:
    body: dict[str, Any] = {"model": thinking_model, "max_tokens": 1100, "messages": [HELLO], **GREEDY}
    plain = post(server, body)
    assert plain.status_code == 200, plain.text
    assert [b["type"] for b in plain.json()["content"]] == ["text"]  # thinking off: no thought
    body["thinking"] = THINKING
    r = post(server, body)
    assert r.status_code == 200, r.text
    whole = r.json()
    content = whole["content"]
    assert content[0]["type"] == "thinking" and isinstance(content[0]["signature"], str)
    assert content[0]["thinking"] == "Hello! How can I help you today?"
    assert [b["type"] for b in content[1:]] in ([], ["text"])  # a text block may only follow the thought
    assert whole["stop_reason"] == "end_turn" and whole["usage"]["output_tokens"] > 0

    events = sse_events(server, body)
    deltas = [p["delta"] for n, p in events if n == "content_block_delta"]
    thoughts = [d["thinking"] for d in deltas if d["type"] == "thinking_delta"]
    assert thoughts and "".join(thoughts) == content[0]["thinking"]
    assert check_order(events) == content  # the stream's blocks are the message's

    with sdk(server).messages.stream(
        **{k: body[k] for k in ("model", "max_tokens", "messages", "thinking")}, extra_body=GREEDY
    ) as stream:
        final = stream.get_final_message().model_dump()

    def comparable(m: dict[str, Any]) -> dict[str, Any]:
        usage = {k: v for k, v in m["usage"].items() if v is not None}
        usage["input_tokens"] += usage.pop("cache_read_input_tokens", 0)  # the prefix cache may differ
        usage.pop("cache_creation_input_tokens", None)
        return {**{k: v for k, v in m.items() if v is not None and k != "id"}, "usage": usage}

    assert comparable(final) == comparable(whole)

    # The thought replayed in the history, as Anthropic's clients send it back, is accepted.
    replay = {
        **body,
        "messages": [HELLO, {"role": "assistant", "content": content}, {"role": "user", "content": "Hi"}],
    }
    again = post(server, replay)
    assert again.status_code == 200, again.text
    assert again.json()["content"][0]["type"] == "thinking"

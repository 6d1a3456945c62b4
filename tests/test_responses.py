"""``POST /v1/responses`` end to end on the demo model: bodies and stream events against OpenAI's
schemas, the event rules, function calls round-tripping, structured output, incomplete responses,
logprobs, reasoning items, 400s naming the field, and the OpenAI SDK unmodified."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.openapi import validate
from tests.responses_helpers import (
    ADD,
    GREEDY,
    WEATHER,
    check_events,
    create,
    output_text,
    stream,
    without_ids,
)
from tests.server import ServerProcess, model_with_template


def test_text_non_stream_and_stream_agree(server: ServerProcess) -> None:
    body = {**GREEDY, "input": "Hello!", "metadata": {"k": "v"}, "user": "u1"}
    whole = create(server.base_url, body)
    assert whole["status"] == "completed" and whole["object"] == "response"
    assert output_text(whole) == "Hello! How can I help you today?"
    message = whole["output"][0]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["annotations"] == [] and message["content"][0]["logprobs"] == []
    assert whole["metadata"] == {"k": "v"} and whole["user"] == "u1" and whole["store"] is True
    usage = whole["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0
    events = stream(server.base_url, body)
    final = check_events(events)
    kinds = [e["type"] for e in events]
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(e["logprobs"] == [] for e in events if e["type"] == "response.output_text.delta")
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    # The streamed response is the non-stream body, apart from ids and times.
    assert without_ids(final) == without_ids(whole)


def test_function_call_stream_and_round_trip(server: ServerProcess) -> None:
    body = {**GREEDY, "input": "What is the weather in Paris?", "tools": [WEATHER, ADD]}
    whole = create(server.base_url, body)
    [call] = whole["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["call_id"].startswith("call_") and call["id"] != call["call_id"]
    events = stream(server.base_url, body)
    final = check_events(events)
    assert [e["type"] for e in events[2:-1]] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert (
        events[2]["item"]["arguments"] == "" and events[2]["item"]["call_id"] == final["output"][0]["call_id"]
    )
    assert without_ids(final) == without_ids(whole)
    # The client runs the function and sends the whole history back: its output as a string or as parts.
    result = json.dumps({"weather": "sunny, 22 C"})
    for output in (result, [{"type": "input_text", "text": result}]):
        history = [
            {"role": "user", "content": "What is the weather in Paris?"},
            call,
            {"type": "function_call_output", "call_id": call["call_id"], "output": output},
        ]
        answer = create(server.base_url, {**body, "input": history})
        assert output_text(answer) == "The weather in Paris is sunny, 22 C."


def test_structured_output_json_schema(server: ServerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "place", "schema": schema, "strict": True}
    body = {
        **GREEDY,
        "input": "What is the weather in Paris?",
        "text": {"format": fmt},
        "max_output_tokens": 60,
    }
    whole = create(server.base_url, body)
    assert whole["status"] == "completed"
    value = json.loads(output_text(whole))
    assert set(value) == {"city", "n"} and isinstance(value["n"], int)
    assert whole["text"]["format"]["type"] == "json_schema" and whole["text"]["format"]["name"] == "place"
    final = check_events(stream(server.base_url, body))
    assert without_ids(final) == without_ids(whole)


def test_max_output_tokens_gives_incomplete(server: ServerProcess) -> None:
    body = {**GREEDY, "input": "Write a long story", "max_output_tokens": 5}
    whole = create(server.base_url, body)
    assert whole["status"] == "incomplete"
    assert whole["incomplete_details"] == {"reason": "max_output_tokens"}
    assert whole["usage"]["output_tokens"] == 5
    assert whole["output"][0]["status"] == "incomplete"
    events = stream(server.base_url, body)
    final = check_events(events)
    assert events[-1]["type"] == "response.incomplete"
    assert without_ids(final) == without_ids(whole)


def test_logprobs_on_request(server: ServerProcess) -> None:
    body = {**GREEDY, "input": "Hello!", "top_logprobs": 2, "include": ["message.output_text.logprobs"]}
    whole = create(server.base_url, body)
    part = whole["output"][0]["content"][0]
    assert part["logprobs"], "logprobs were asked for"
    assert "".join(lp["token"] for lp in part["logprobs"]) == part["text"]
    assert all(len(lp["top_logprobs"]) == 2 for lp in part["logprobs"])
    events = stream(server.base_url, body)
    check_events(events)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(lp["token"] for d in deltas for lp in d["logprobs"]) == part["text"]


def test_reasoning_item(server: ServerProcess, demo_model: Path, tmp_path: Path) -> None:
    def open_thinking(template: str) -> str:
        opened = template.replace(
            "{{- '<|im_start|>assistant\\n' }}{%- endif %}",
            "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}",
        )
        return opened + "{#- answers follow </think> -#}"

    folder = model_with_template(demo_model, tmp_path / "thinking-model", open_thinking)
    body = {"model": str(folder), "input": "Hello!", "temperature": 0, "max_output_tokens": 12}
    whole = create(server.base_url, body)
    reasoning = whole["output"][0]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert reasoning["content"][0]["type"] == "reasoning_text" and reasoning["content"][0]["text"]
    assert whole["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    events = stream(server.base_url, body)
    final = check_events(events)
    assert "response.reasoning_text.delta" in {e["type"] for e in events}
    assert without_ids(final) == without_ids(whole)
    # A reasoning item is accepted back as input, with the rest of the turn.
    replay = {
        **body,
        "input": [{"role": "user", "content": "Hello!"}, *whole["output"], {"role": "user", "content": "Hi"}],
    }
    assert create(server.base_url, replay)["status"] in ("completed", "incomplete")


def test_every_emitted_item_type_is_accepted_back(server: ServerProcess) -> None:
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is 2 plus 3?"}]},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "add"}],
        },
        {
            "type": "mcp_list_tools",
            "id": "mcpl_1",
            "server_label": "calc",
            "tools": [
                {"name": "add", "input_schema": {"type": "object"}, "annotations": None, "description": None}
            ],
            "error": None,
        },
        {
            "type": "mcp_approval_request",
            "id": "mcpr_1",
            "server_label": "calc",
            "name": "add",
            "arguments": '{"a": 2, "b": 3}',
        },
        {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True},
        {
            "type": "mcp_call",
            "id": "mcp_1",
            "server_label": "calc",
            "name": "add",
            "arguments": '{"a": 2, "b": 3}',
            "output": "5",
            "error": None,
            "status": "completed",
            "approval_request_id": "mcpr_1",
        },
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "2 plus 3 is 5.", "annotations": [], "logprobs": []}],
        },
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": '{"weather": "sunny, 22 C"}'},
    ]
    whole = create(server.base_url, {**GREEDY, "input": items, "tools": [WEATHER], "max_output_tokens": 40})
    # The model read what chat's model reads for the same conversation: same greedy text.
    add_call = {
        "id": "mcp_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
    }
    weather_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "", "tool_calls": [add_call]},
        {"role": "tool", "tool_call_id": "mcp_1", "name": "add", "content": "5"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [weather_call]},
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "name": "get_weather",
            "content": '{"weather": "sunny, 22 C"}',
        },
    ]
    tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    chat = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={**GREEDY, "messages": messages, "tools": [tool], "max_tokens": 40},
        timeout=180,
    ).json()
    assert output_text(whole) == chat["choices"][0]["message"]["content"]
    assert whole["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]


def test_hosted_tools_are_skipped_not_refused(server: ServerProcess) -> None:
    tools = [
        {"type": "web_search"},
        {"type": "namespace", "name": "ns", "description": "Weather", "tools": [WEATHER]},
    ]
    whole = create(server.base_url, {**GREEDY, "input": "What is the weather in Paris?", "tools": tools})
    assert whole["output"][0]["type"] == "function_call" and whole["output"][0]["name"] == "get_weather"


def test_tool_choice_none_and_named(server: ServerProcess) -> None:
    body = {**GREEDY, "input": "What is the weather in Paris?", "tools": [WEATHER, ADD]}
    none = create(server.base_url, {**body, "tool_choice": "none", "max_output_tokens": 30})
    assert all(item["type"] == "message" for item in none["output"])
    named = create(server.base_url, {**body, "tool_choice": {"type": "function", "name": "add"}})
    assert [i["name"] for i in named["output"]] == ["add"]
    assert set(json.loads(named["output"][0]["arguments"])) == {"a", "b"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        (
            {"tools": [{"type": "mcp", "server_label": "x", "connector_id": "connector_gmail"}]},
            "tools[0].connector_id",
        ),
        ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, "input[0].call_id"),
        ({"previous_response_id": "resp_does_not_exist"}, "previous_response_id"),
        ({"background": True, "store": False}, "background"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 10**9}, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"include": ["nonsense"]}, "include"),
        ({"model": "no-such-model"}, "model"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),  # the demo template has no control
        (
            {"tool_choice": "required", "text": {"format": {"type": "json_object"}}, "tools": [WEATHER]},
            "tool_choice",
        ),
    ],
)
def test_bad_requests_name_the_field(server: ServerProcess, extra: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/responses", json={**GREEDY, "input": "Hello!", **extra}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert set(error) == {"message", "type", "param", "code"}
    if param == "previous_response_id":
        assert error["code"] == "previous_response_not_found"
    r = httpx.post(
        f"{server.base_url}/v1/responses",
        json={**GREEDY, "input": "Hello!", "stream": True, **extra},
        timeout=60,
    )
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param


def test_closing_the_stream_frees_the_host(server: ServerProcess) -> None:
    body = {
        **GREEDY,
        "input": "Write a long story",
        "ignore_eos": True,
        "max_output_tokens": 1500,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=120) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 6:
                break
    server.wait_for(lambda s: s["running"] == 0, timeout_s=60)


def test_openai_sdk_create_and_stream(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=180)
    whole = client.responses.create(model="hfserve-demo", input="Hello!", temperature=0)
    assert whole.output_text == "Hello! How can I help you today?"
    assert whole.status == "completed" and whole.usage is not None
    seen = []
    with client.responses.stream(model="hfserve-demo", input="Hello!", temperature=0) as events:
        for event in events:
            seen.append(event.type)
        final = events.get_final_response()
    assert final.output_text == whole.output_text
    assert "response.output_text.delta" in seen and seen[-1] == "response.completed"
    # The SDK's accumulator rebuilt the same response (it adds its own ``parsed`` to text parts).
    assert [i.type for i in final.output] == [i.type for i in whole.output]
    assert final.usage == whole.usage and final.status == whole.status
    call = client.responses.create(
        model="hfserve-demo",
        input="What is 2 plus 3?",
        tools=[ADD],  # type: ignore[list-item]
        temperature=0,
    )
    assert call.output[0].type == "function_call" and json.loads(call.output[0].arguments) == {"a": 2, "b": 3}
    validate("Response", whole.model_dump(mode="json", exclude_unset=True))
    assert time.time() - whole.created_at < 600


def test_previous_response_id_chain_equals_the_full_history(server: ServerProcess) -> None:
    """Each turn may land on any of the four workers: the chain lives in the shared store. A
    function call and its output round-trip through it; old instructions are not carried over."""
    body = {**GREEDY, "tools": [WEATHER], "max_output_tokens": 40}
    first = create(
        server.base_url, {**body, "input": "What is the weather in Paris?", "instructions": "Be brief."}
    )
    [call] = first["output"]
    result = {
        "type": "function_call_output",
        "call_id": call["call_id"],
        "output": '{"weather": "sunny, 22 C"}',
    }
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        call,
        result,
    ]
    previous = first["id"]
    turn_input: list[dict[str, Any]] = [result]
    for follow_up in ("Hello!", "Thank you", "What is 2 plus 3?"):
        chained = create(server.base_url, {**body, "input": turn_input, "previous_response_id": previous})
        whole = create(server.base_url, {**body, "input": history})
        assert chained["previous_response_id"] == previous and chained["instructions"] is None
        assert output_text(chained) == output_text(whole) and output_text(chained)
        # The same prompt, token for token: the first turn's instructions are not in it.
        assert chained["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
        history += [*chained["output"], {"role": "user", "content": follow_up}]
        turn_input = [{"role": "user", "content": follow_up}]
        previous = chained["id"]
    assert (
        output_text(create(server.base_url, {**body, "input": history[:3]}))
        == "The weather in Paris is sunny, 22 C."
    )

"""Server-side MCP tools of ``/v1/responses``, end to end: a real ``hfserve start`` with
``--mcp-config`` (a stdio server) and ``--mcp-allow-private``, real MCP servers that record every
call they run (``tests/mcp_counting_server.py``), the demo model calling their tools."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.mcp_servers import closed_port_url, counting_server, read_calls, silent_server, stdio_spec
from tests.openapi import validate
from tests.responses_helpers import check_events, create, output_text, stream, without_ids
from tests.server import ServerProcess, free_port, hfserve_cmd, server_env

MCP_TIMEOUT_S = 8
SECRET = "sk-mcp-7d3e9b21c4f0a8"


@dataclass
class Env:
    server: ServerProcess
    url: str  # the counting server over streamable HTTP
    http_calls: Path
    stdio_calls: Path
    db: Path

    @property
    def base(self) -> str:
        return self.server.base_url


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, demo_model: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("responses-mcp")
    config = tmp / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"local": stdio_spec(tmp / "stdio_calls.jsonl")}}))
    args = (
        "--mcp-allow-private",
        "--mcp-config",
        str(config),
        "--mcp-timeout-s",
        str(MCP_TIMEOUT_S),
        "--responses-db",
        str(tmp / "responses.sqlite3"),
    )
    with (
        counting_server(tmp / "http_calls.jsonl") as url,
        ServerProcess.start(cache_dir, workers=2, args=args) as server,
    ):
        yield Env(server, url, tmp / "http_calls.jsonl", tmp / "stdio_calls.jsonl", tmp / "responses.sqlite3")


def mcp_tool(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "demo", "server_url": url, **fields}


def ask(text: str, *tools: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "hfserve-demo", "input": text, "temperature": 0, "tools": list(tools), **fields}


def types(response: dict[str, Any]) -> list[str]:
    return [item["type"] for item in response["output"]]


def mcp_event_types(events: list[dict[str, Any]]) -> list[str]:
    """The MCP items' events, with the item's type on added/done."""
    out = []
    for event in events:
        if event["type"] in ("response.output_item.added", "response.output_item.done"):
            if event["item"]["type"].startswith("mcp"):
                out.append(f"{event['type']}:{event['item']['type']}")
        elif event["type"].startswith("response.mcp"):
            out.append(event["type"])
    return out


def without_parsed(body: Any) -> Any:
    if isinstance(body, list):
        return [without_parsed(b) for b in body]
    if isinstance(body, dict):
        return {k: without_parsed(v) for k, v in body.items() if k != "parsed"}
    return body


def test_an_mcp_tool_runs_and_the_answer_uses_its_result(env: Env) -> None:
    body = ask(
        "What is the weather in Paris?",
        mcp_tool(env.url, require_approval="never", authorization=SECRET),
    )
    before = len(read_calls(env.http_calls))
    whole = create(env.base, body)
    assert types(whole) == ["mcp_list_tools", "mcp_call", "message"]
    listing, call, _ = whole["output"]
    assert {t["name"] for t in listing["tools"]} == {"get_weather", "add", "slow"}
    assert listing["server_label"] == "demo" and "error" not in listing
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["status"] == "completed" and call["error"] is None
    assert json.loads(call["output"]) == {"weather": "sunny, 22 C"}
    assert output_text(whole) == "The weather in Paris is sunny, 22 C."
    assert whole["status"] == "completed"
    calls = read_calls(env.http_calls)[before:]
    assert calls == [
        {
            "tool": "get_weather",
            "args": {"city": "Paris"},
            "authorization": f"Bearer {SECRET}",
            "x_test": None,
        }
    ]
    # The echoed tool keeps its label and URL, never the secret.
    assert whole["tools"][0]["server_url"] == env.url and "authorization" not in whole["tools"][0]

    events = stream(env.base, body)
    final = check_events(events)
    assert without_ids(final) == without_ids(whole)
    assert mcp_event_types(events) == [
        "response.output_item.added:mcp_list_tools",
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.output_item.done:mcp_list_tools",
        "response.output_item.added:mcp_call",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_item.done:mcp_call",
    ]
    assert len(read_calls(env.http_calls)) == before + 2


def test_the_openai_sdk_reads_mcp_items(env: Env) -> None:
    client = OpenAI(base_url=f"{env.base}/v1", api_key="unused", timeout=180)
    tools: Any = [mcp_tool(env.url, require_approval="never")]
    created = client.responses.create(
        model="hfserve-demo", input="What is 4 plus 5?", tools=tools, temperature=0
    )
    assert [item.type for item in created.output] == ["mcp_list_tools", "mcp_call", "message"]
    call: Any = created.output[1]
    assert (call.name, call.output, call.error) == ("add", "9", None)
    assert created.output_text == "4 plus 5 is 9."
    with client.responses.stream(
        model="hfserve-demo", input="What is 4 plus 5?", tools=tools, temperature=0
    ) as events:
        seen = [event.type for event in events]
        streamed = events.get_final_response()
    assert "response.mcp_call.completed" in seen
    # The SDK's accumulator adds its own ``parsed`` fields; everything else is the same response.
    assert without_parsed(without_ids(streamed.model_dump(mode="json", exclude_unset=True))) == without_ids(
        created.model_dump(mode="json", exclude_unset=True)
    )
    assert client.responses.retrieve(created.id).output_text == "4 plus 5 is 9."


def test_a_stdio_server_of_the_config_is_used_by_label(env: Env) -> None:
    before = len(read_calls(env.stdio_calls))
    tool = {"type": "mcp", "server_label": "local", "require_approval": "never"}
    whole = create(env.base, ask("What is 4 plus 5?", tool))
    assert types(whole) == ["mcp_list_tools", "mcp_call", "message"]
    assert whole["output"][1]["output"] == "9" and whole["output"][1]["server_label"] == "local"
    assert output_text(whole) == "4 plus 5 is 9."
    final = check_events(stream(env.base, ask("What is 10 plus 7?", tool)))
    assert final["output"][1]["output"] == "17" and output_text(final) == "10 plus 7 is 17."
    assert [c["args"] for c in read_calls(env.stdio_calls)[before:]] == [{"a": 4, "b": 5}, {"a": 10, "b": 7}]


def test_require_approval_always_runs_nothing_until_approved(env: Env) -> None:
    tool = mcp_tool(env.url)  # require_approval: "always", OpenAI's default
    before = len(read_calls(env.http_calls))
    asked = create(env.base, ask("What is the weather in Tokyo?", tool))
    assert types(asked) == ["mcp_list_tools", "mcp_approval_request"]
    request = asked["output"][1]
    assert request["name"] == "get_weather" and json.loads(request["arguments"]) == {"city": "Tokyo"}
    events = stream(env.base, ask("What is the weather in Tokyo?", tool))
    assert types(check_events(events)) == ["mcp_list_tools", "mcp_approval_request"]
    assert len(read_calls(env.http_calls)) == before, "a call reached the server before approval"

    approve = {"type": "mcp_approval_response", "approval_request_id": request["id"], "approve": True}
    approved = create(
        env.base,
        {**ask("", tool), "input": [approve], "previous_response_id": asked["id"]},
    )
    # The listing is in the chain already: not listed again.
    assert types(approved) == ["mcp_call", "message"]
    assert approved["output"][0]["approval_request_id"] == request["id"]
    assert json.loads(approved["output"][0]["output"]) == {"weather": "cloudy, 18 C"}
    assert output_text(approved) == "The weather in Tokyo is cloudy, 18 C."
    assert [c["args"] for c in read_calls(env.http_calls)[before:]] == [{"city": "Tokyo"}]

    # The same through the full history, streamed; an approval already run is not run again.
    history = [{"role": "user", "content": "What is the weather in Tokyo?"}, *asked["output"], approve]
    replayed = check_events(stream(env.base, {**ask("", tool), "input": history}))
    assert types(replayed) == ["mcp_call", "message"]
    assert output_text(replayed) == "The weather in Tokyo is cloudy, 18 C."
    again = create(env.base, {**ask("", tool), "input": [*history, *replayed["output"]]})
    assert "mcp_call" not in types(again)
    assert len(read_calls(env.http_calls)) == before + 2


def test_a_denied_call_runs_nothing(env: Env) -> None:
    tool = mcp_tool(env.url)
    before = len(read_calls(env.http_calls))
    asked = create(env.base, ask("What is 2 plus 3?", tool))
    assert types(asked) == ["mcp_list_tools", "mcp_approval_request"]
    deny = {
        "type": "mcp_approval_response",
        "approval_request_id": asked["output"][1]["id"],
        "approve": False,
    }
    denied = create(env.base, {**ask("", tool), "input": [deny], "previous_response_id": asked["id"]})
    assert "mcp_call" not in types(denied) and denied["status"] == "completed"
    assert len(read_calls(env.http_calls)) == before


def test_only_allowed_tools_are_offered(env: Env) -> None:
    tool = mcp_tool(env.url, require_approval="never", allowed_tools=["add"])
    whole = create(env.base, ask("What is 4 plus 5?", tool))
    assert [t["name"] for t in whole["output"][0]["tools"]] == ["add"]
    assert types(whole) == ["mcp_list_tools", "mcp_call", "message"]
    approval_by_name = mcp_tool(env.url, require_approval={"never": {"tool_names": ["get_weather"]}})
    assert types(create(env.base, ask("What is 2 plus 3?", approval_by_name)))[-1] == "mcp_approval_request"


def test_a_server_that_is_down_or_hangs_gives_a_failed_listing(env: Env) -> None:
    started = time.monotonic()
    down = create(env.base, ask("What is the weather in Paris?", mcp_tool(closed_port_url())))
    assert time.monotonic() - started < 60
    assert down["status"] == "completed" and types(down)[0] == "mcp_list_tools"
    assert down["output"][0]["error"] == "Could not connect to the MCP server 'demo'."
    assert down["output"][0]["tools"] == []
    with silent_server() as url:
        started = time.monotonic()
        events = stream(env.base, ask("What is the weather in Paris?", mcp_tool(url)))
        elapsed = time.monotonic() - started
    hung = check_events(events)
    assert MCP_TIMEOUT_S - 1 < elapsed < MCP_TIMEOUT_S + 45
    assert f"did not answer within {MCP_TIMEOUT_S} s" in hung["output"][0]["error"]
    assert "response.mcp_list_tools.failed" in [e["type"] for e in events]


def test_a_failing_tool_is_a_failed_call_item(env: Env) -> None:
    whole = create(env.base, ask("What is 1 plus 1?", mcp_tool(env.url, require_approval="never")))
    assert types(whole)[:2] == ["mcp_list_tools", "mcp_call"]
    call = whole["output"][1]
    assert call["status"] == "failed" and call["output"] is None
    assert call["error"]["type"] == "mcp_tool_execution_error"
    validate("MCPToolCall", call)


def test_mcp_fields_that_cannot_work_are_400s(env: Env) -> None:
    for tool, param in (
        ({"type": "mcp", "server_label": "x", "connector_id": "connector_gmail"}, "tools[0].connector_id"),
        ({"type": "mcp", "server_label": "nowhere"}, "tools[0].server_url"),
        (mcp_tool(env.url, require_approval="sometimes"), "tools[0].require_approval"),
        (mcp_tool(env.url, headers={"X": 1}), "tools[0].headers"),
    ):
        r = httpx.post(f"{env.base}/v1/responses", json=ask("Hello!", tool), timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_the_authorization_is_in_no_body_row_or_log_line(env: Env) -> None:
    secret = "sk-only-here-51b0e7aa93"
    header_secret = "hdr-only-here-77c1"
    tool = mcp_tool(env.url, authorization=secret, headers={"X-Test": header_secret})
    bodies = [json.dumps(create(env.base, ask("What is the weather in Berlin?", tool)))]
    asked = json.loads(bodies[0])
    approve = {
        "type": "mcp_approval_response",
        "approval_request_id": asked["output"][-1]["id"],
        "approve": True,
    }
    r = httpx.post(
        f"{env.base}/v1/responses",
        json={**ask("", tool), "input": [approve], "previous_response_id": asked["id"], "stream": True},
        timeout=180,
    )
    bodies.append(r.text)
    approved = check_events(
        [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    )
    assert output_text(approved) == "The weather in Berlin is windy, 10 C."
    down = mcp_tool(closed_port_url(), authorization=secret, require_approval="never")
    bodies.append(json.dumps(create(env.base, ask("Hello!", down))))
    for rid in (asked["id"], approved["id"]):
        bodies.append(httpx.get(f"{env.base}/v1/responses/{rid}", timeout=30).text)
        bodies.append(httpx.get(f"{env.base}/v1/responses/{rid}/input_items", timeout=30).text)
    # It was sent to the MCP server ...
    sent = read_calls(env.http_calls)[-1]
    assert (sent["authorization"], sent["x_test"]) == (f"Bearer {secret}", header_secret)
    # ... and kept nowhere else.
    stored = b"".join(p.read_bytes() for p in env.db.parent.glob(env.db.name + "*"))
    log = env.server.log_text()
    for value in (secret, header_secret):
        assert all(value not in body for body in bodies)
        assert value.encode() not in stored
        assert value not in log


def test_tool_choice_mcp_forces_a_call_of_that_server(env: Env) -> None:
    tool = mcp_tool(env.url, require_approval="never")
    choice = {"type": "mcp", "server_label": "demo", "name": "add"}
    before = len(read_calls(env.http_calls))
    whole = create(env.base, {**ask("Hello!", tool), "tool_choice": choice})
    assert types(whole)[:2] == ["mcp_list_tools", "mcp_call"]
    assert whole["output"][1]["name"] == "add" and whole["output"][1]["status"] == "completed"
    assert [c["tool"] for c in read_calls(env.http_calls)[before:]][:1] == ["add"]


def test_function_tools_stay_the_clients_beside_mcp_tools(env: Env) -> None:
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    before = len(read_calls(env.http_calls))
    whole = create(
        env.base, ask("What is the weather in Paris?", weather, mcp_tool(env.url, require_approval="never"))
    )
    # The client's get_weather wins the name: the call is the client's to run, and ends the response.
    assert types(whole) == ["mcp_list_tools", "function_call"]
    assert whole["output"][1]["name"] == "get_weather"
    assert len(read_calls(env.http_calls)) == before


def test_an_unusable_mcp_config_stops_the_start_with_one_line(tmp_path: Path, cache_dir: Path) -> None:
    bad_config = tmp_path / "mcp.json"
    bad_config.write_text('{"mcpServers": {"x": {"args": []}}}')
    done = subprocess.run(
        [*hfserve_cmd(), "start", "--port", str(free_port()), "--mcp-config", str(bad_config)],
        env=server_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"error: {bad_config}: server 'x' needs a 'command' or a 'url'"


def test_a_background_response_runs_its_mcp_call(env: Env) -> None:
    tool = mcp_tool(env.url, require_approval="never")
    r = httpx.post(
        f"{env.base}/v1/responses",
        json={**ask("What is the weather in London?", tool), "background": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("queued", "in_progress")
    deadline = time.monotonic() + 120
    while True:
        polled = httpx.get(f"{env.base}/v1/responses/{r.json()['id']}", timeout=30).json()
        if polled["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert polled["status"] == "completed"
    validate("Response", polled)
    assert types(polled) == ["mcp_list_tools", "mcp_call", "message"]
    assert output_text(polled) == "The weather in London is rainy, 14 C."

"""The MCP ServerTools of /v1/responses with a fake gateway (no servers): what is listed, offered,
run, held for approval, and in which order the events go out."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sanic_serve.mcp.gateway import CallOutcome, MCPFailure, http_error
from sanic_serve.mcp.settings import MCPSettings
from sanic_serve.mcp.tool_spec import MCPToolSpec, parse_mcp_tool
from sanic_serve.responses.items import mcp_error_text, to_messages
from sanic_serve.responses.mcp_tools import MCPServerTools

TOOLS: list[dict[str, Any]] = [
    {
        "name": "get_weather",
        "description": "Get the weather",
        "input_schema": {"type": "object"},
        "annotations": {"readOnlyHint": True},
    },
    {
        "name": "add",
        "description": "Add two integers",
        "input_schema": {"type": "object"},
        "annotations": None,
    },
]


class FakeGateway:
    def __init__(self, fail_listing: bool = False) -> None:
        self.listed: list[str] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_listing = fail_listing

    async def list_tools(self, spec: MCPToolSpec) -> list[dict[str, Any]]:
        self.listed.append(spec.label)
        if self.fail_listing:
            raise MCPFailure(
                "Could not connect to the MCP server 'demo'.", http_error(502, "Could not connect.")
            )
        return [dict(t) for t in TOOLS]

    async def call_tool(self, spec: MCPToolSpec, name: str, arguments: dict[str, Any]) -> CallOutcome:
        self.calls.append((name, arguments))
        return CallOutcome("9", None)


class Recorder:
    """The ``Emitter`` the turn loop hands over, recording what goes out."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.items: list[dict[str, Any]] = []

    def add(self, item: dict[str, Any]) -> int:
        self.items.append(dict(item))
        self.log.append(("added", item["type"]))
        return len(self.items) - 1

    def event(self, event: dict[str, Any]) -> None:
        assert event["item_id"] == self.items[event["output_index"]]["id"]
        self.log.append(("event", event["type"]))

    def done(self, output_index: int, item: dict[str, Any]) -> None:
        assert item["id"] == self.items[output_index]["id"]
        self.items[output_index] = item
        self.log.append(("done", item["type"]))


def tools_of(*fields: dict[str, Any], gateway: Any = None) -> tuple[MCPServerTools, Any]:
    settings = MCPSettings(allow_private=True)
    specs = [
        parse_mcp_tool(
            {"type": "mcp", "server_label": "demo", "server_url": "http://h.example/mcp", **f}, "t", settings
        )
        for f in fields
    ]
    gateway = gateway or FakeGateway()
    return MCPServerTools(specs, gateway, {"client_fn"}), gateway


def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": name,
        "arguments": json.dumps(arguments),
    }


def test_listing_offers_the_allowed_tools_and_runs_calls_with_their_events() -> None:
    tools, gateway = tools_of({"require_approval": "never", "allowed_tools": ["add"]})
    emit = Recorder()
    items, functions = asyncio.run(tools.prepare([], emit))
    assert [i["type"] for i in items] == ["mcp_list_tools"] and [t["name"] for t in items[0]["tools"]] == [
        "add"
    ]
    assert [f["function"]["name"] for f in functions] == ["add"]
    assert tools.owns("add") and not tools.owns("get_weather") and not tools.owns("client_fn")
    assert tools.choice_functions({"type": "mcp", "server_label": "demo"}) == ["add"]
    assert tools.choice_functions({"type": "mcp", "server_label": "other"}) == []
    out, again = asyncio.run(tools.run_calls([call("add", {"a": 4, "b": 5})], emit))
    assert again and gateway.calls == [("add", {"a": 4, "b": 5})]
    assert out[0]["type"] == "mcp_call" and out[0]["output"] == "9" and out[0]["status"] == "completed"
    assert emit.log == [
        ("added", "mcp_list_tools"),
        ("event", "response.mcp_list_tools.in_progress"),
        ("event", "response.mcp_list_tools.completed"),
        ("done", "mcp_list_tools"),
        ("added", "mcp_call"),
        ("event", "response.mcp_call_arguments.delta"),
        ("event", "response.mcp_call_arguments.done"),
        ("event", "response.mcp_call.in_progress"),
        ("event", "response.mcp_call.completed"),
        ("done", "mcp_call"),
    ]
    assert emit.items[1]["arguments"] == json.dumps({"a": 4, "b": 5})


def test_a_listing_in_the_context_is_not_listed_again() -> None:
    tools, gateway = tools_of({})
    context = [{"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "demo", "tools": TOOLS}]
    items, functions = asyncio.run(tools.prepare(context, Recorder()))
    assert items == [] and gateway.listed == [] and len(functions) == 2
    failed = [{**context[0], "error": "down"}]  # a failed listing is tried again
    asyncio.run(tools_of({}, gateway=gateway)[0].prepare(failed, Recorder()))
    assert gateway.listed == ["demo"]


def test_a_failed_listing_offers_nothing() -> None:
    tools, _ = tools_of({}, gateway=FakeGateway(fail_listing=True))
    emit = Recorder()
    items, functions = asyncio.run(tools.prepare([], emit))
    assert functions == [] and items[0]["error"] == "Could not connect to the MCP server 'demo'."
    assert ("event", "response.mcp_list_tools.failed") in emit.log


def test_approval_holds_the_call_and_an_approval_runs_it_once() -> None:
    tools, gateway = tools_of({"require_approval": {"never": {"read_only": True}}})
    asyncio.run(tools.prepare([], Recorder()))
    out, again = asyncio.run(tools.run_calls([call("add", {"a": 2, "b": 3})], Recorder()))
    assert not again and gateway.calls == [] and out[0]["type"] == "mcp_approval_request"
    out, again = asyncio.run(tools.run_calls([call("get_weather", {"city": "Paris"})], Recorder()))
    assert again and gateway.calls == [("get_weather", {"city": "Paris"})]  # read-only: no approval

    request = {
        "type": "mcp_approval_request",
        "id": "mcpr_1",
        "server_label": "demo",
        "name": "add",
        "arguments": '{"a": 2, "b": 3}',
    }
    approval = {
        "type": "mcp_approval_response",
        "id": "mcpa_1",
        "approval_request_id": "mcpr_1",
        "approve": True,
    }
    fresh, gateway = tools_of({})
    items, _ = asyncio.run(fresh.prepare([request, approval], Recorder()))
    assert gateway.calls == [("add", {"a": 2, "b": 3})]
    ran = items[-1]
    assert ran["type"] == "mcp_call" and ran["approval_request_id"] == "mcpr_1"
    again_tools, gateway = tools_of({})
    asyncio.run(again_tools.prepare([request, approval, ran], Recorder()))
    assert gateway.calls == []  # already run: not again
    denied = {**approval, "approve": False}
    asyncio.run(again_tools.prepare([request, denied], Recorder()))
    assert gateway.calls == []


def test_an_approval_for_a_server_not_in_the_request_fails_without_a_call() -> None:
    tools, gateway = tools_of({})
    request = {
        "type": "mcp_approval_request",
        "id": "mcpr_1",
        "server_label": "gone",
        "name": "add",
        "arguments": "{}",
    }
    approval = {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}
    items, _ = asyncio.run(tools.prepare([request, approval], Recorder()))
    assert gateway.calls == [] and items[-1]["status"] == "failed"
    assert "not among this request's tools" in items[-1]["error"]["message"]


def test_bad_arguments_fail_the_call_without_reaching_the_server() -> None:
    tools, gateway = tools_of({"require_approval": "never"})
    asyncio.run(tools.prepare([], Recorder()))
    bad = {**call("add", {}), "arguments": "[1, 2]"}
    out, _ = asyncio.run(tools.run_calls([bad], Recorder()))
    assert (
        gateway.calls == []
        and out[0]["status"] == "failed"
        and out[0]["error"]["type"] == "mcp_protocol_error"
    )


def test_the_model_reads_an_mcp_error_as_words() -> None:
    execution = {
        "type": "mcp_tool_execution_error",
        "content": [{"type": "text", "text": "Error executing tool add"}],
    }
    assert mcp_error_text(execution) == "Error executing tool add"
    assert mcp_error_text(http_error(502, "Could not connect.")) == "Error: Could not connect."
    item = {
        "type": "mcp_call",
        "id": "mcp_1",
        "server_label": "demo",
        "name": "add",
        "arguments": "{}",
        "output": None,
        "error": http_error(504, "No answer within 8 s."),
    }
    messages = to_messages([{"type": "message", "role": "user", "content": "What is 1 plus 1?"}, item], None)
    assert messages[-1] == {
        "role": "tool",
        "tool_call_id": "mcp_1",
        "name": "add",
        "content": "Error: No answer within 8 s.",
    }


def test_allowed_tools_matches_mcp_tools_by_their_server() -> None:
    from sanic_serve.responses.request import parse_responses_request
    from sanic_serve.responses.turn import allowed

    tools, _ = tools_of({})
    _, functions = asyncio.run(tools.prepare([], Recorder()))
    mcp = {"type": "mcp", "server_label": "demo", "server_url": "http://h.example/mcp"}

    def offered(*entries: dict[str, Any]) -> list[str]:
        choice = {"type": "allowed_tools", "mode": "auto", "tools": list(entries)}
        fn = {"type": "function", "name": "client_fn"}
        req = parse_responses_request({"model": "m", "input": "x", "tools": [fn, mcp], "tool_choice": choice})
        client = [t["function"]["name"] for t in allowed(req, req.function_tools())]
        return client + [t["function"]["name"] for t in allowed(req, functions, tools.choice_functions)]

    assert offered({"type": "mcp", "server_label": "demo"}) == ["get_weather", "add"]
    assert offered({"type": "mcp", "server_label": "demo", "name": "add"}) == ["add"]
    assert offered({"type": "function", "name": "client_fn"}) == ["client_fn"]  # no MCP tool with it


class ScriptedRun:
    """The turn loop with the model replaced: each turn 'calls' the next scripted server calls; the
    planner records the tool choice of each turn and may find a later turn too long."""

    def __init__(
        self, monkeypatch: Any, script: list[list[str]], overflow_at: int | None = None, **fields: Any
    ):
        from sanic_serve.errors import InvalidRequest
        from sanic_serve.responses import run as run_module
        from sanic_serve.responses.events import ResponseBuilder, response_body
        from sanic_serve.responses.items import prepare_context
        from sanic_serve.responses.request import parse_responses_request

        body = {"model": "m", "input": "x", "tools": [{"type": "mcp", "server_label": "demo"}], **fields}
        self.req = parse_responses_request(body)
        self.tools, self.gateway = tools_of({"require_approval": "never"})
        self.choices: list[Any] = []
        script_iter = iter(script)

        async def plan(
            app_ctx: Any, bundle: Any, req: Any, messages: Any, offered: Any, choice: Any, *rest: Any
        ) -> Any:
            self.choices.append(choice)
            if overflow_at is not None and len(self.choices) == overflow_at:
                raise InvalidRequest(
                    "This model's maximum context length is 64 tokens.", code="context_length_exceeded"
                )
            return object()

        async def generate(turn: Any, server_calls: list[dict[str, Any]]) -> Any:
            for n, name in enumerate(next(script_iter, [])):
                server_calls.append({**call(name, {"a": n, "b": 1}), "id": f"fc_{n}", "call_id": f"c{n}"})
            return
            yield

        monkeypatch.setattr(run_module, "plan_turn", plan)
        self.builder = ResponseBuilder(response_body(self.req, "resp_1", 1, "in_progress"))
        self.run = run_module._Run(
            self.req, prepare_context(self.req, None), None, None, self.tools, self.builder
        )
        self.run._generate = generate  # type: ignore[method-assign]

    def events(self) -> list[dict[str, Any]]:
        async def drain() -> list[dict[str, Any]]:
            b = self.builder
            out = [
                b.event("response.created", response=b.snapshot("in_progress")),
                b.event("response.in_progress", response=b.snapshot("in_progress")),
            ]
            out += [e async for e in self.run.turns(None, [])]
            return [*out, self.run.terminal()]

        return asyncio.run(drain())


def test_calls_past_max_tool_calls_leave_a_failed_item_and_reach_no_server(monkeypatch: Any) -> None:
    from tests.responses_helpers import check_events

    scripted = ScriptedRun(monkeypatch, [["add", "add", "get_weather"], []], max_tool_calls=1)
    final = check_events(scripted.events())
    calls = [i for i in final["output"] if i["type"] == "mcp_call"]
    assert [c["status"] for c in calls] == ["completed", "failed", "failed"]
    assert scripted.gateway.calls == [("add", {"a": 0, "b": 1})]  # only the one within the limit
    assert all("max_tool_calls (1)" in c["error"]["message"] for c in calls[1:])
    assert [c["name"] for c in calls] == ["add", "add", "get_weather"]
    assert scripted.choices[-1] == "none"  # the next turn reads the refusals and may call no more
    assert final["status"] == "completed"


def test_a_later_turn_out_of_context_ends_incomplete_saying_so(monkeypatch: Any) -> None:
    from tests.responses_helpers import check_events

    scripted = ScriptedRun(monkeypatch, [["add"], []], overflow_at=2)
    events = scripted.events()
    final = check_events(events)
    assert events[-1]["type"] == "response.incomplete" and final["status"] == "incomplete"
    assert final["incomplete_details"] == {}  # not max_output_tokens: that budget was not hit
    assert "no longer fits" in final["error"]["message"] and "context length" in final["error"]["message"]
    assert [i["type"] for i in final["output"]] == ["mcp_list_tools", "mcp_call"]  # kept

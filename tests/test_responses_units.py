"""Responses API parts that need no server: request validation, input items -> chat messages,
context from a stored chain, the event builder (against the spec), and the server-tools seam."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from sanic_serve.errors import InvalidRequest
from sanic_serve.responses.events import ResponseBuilder, TurnWriter, response_body, usage_body
from sanic_serve.responses.items import DECLINED_TEXT, prepare_context, to_messages
from sanic_serve.responses.request import parse_responses_request
from sanic_serve.responses.run import Emitter, _Run
from tests.responses_helpers import check_events


@dataclass
class Turn:
    input_items: list[dict[str, Any]]
    output_items: list[dict[str, Any]]
    instructions: str | None = None
    status: str = "completed"
    response_id: str = "resp_x"


@dataclass
class FakeStore:
    chains: dict[str, list[Turn]] = field(default_factory=dict)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def chain(self, response_id: str) -> list[Any] | None:
        return self.chains.get(response_id)

    def item(self, item_id: str) -> dict[str, Any] | None:
        return self.items.get(item_id)


def request(**fields: Any) -> Any:
    return parse_responses_request({"model": "m", **fields})


def test_string_input_is_one_user_message_with_an_id() -> None:
    ctx = prepare_context(request(input="Hi", instructions="Be brief."), None)
    [item] = ctx.input_items
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "Hi"}]
    assert to_messages(ctx.items, ctx.instructions) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_chain_rebuilds_context_without_old_instructions() -> None:
    first_in = [
        {"type": "message", "id": "msg_a", "role": "user", "content": [{"type": "input_text", "text": "Q1"}]}
    ]
    first_out = [
        {"type": "function_call", "id": "fc_a", "call_id": "call_a", "name": "f", "arguments": "{}"},
    ]
    second_in = [{"type": "function_call_output", "id": "fco_a", "call_id": "call_a", "output": "42"}]
    second_out = [
        {
            "type": "message",
            "id": "msg_b",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "A"}],
        }
    ]
    store = FakeStore({"resp_2": [Turn(first_in, first_out, "old"), Turn(second_in, second_out, "older")]})
    ctx = prepare_context(request(input="Q2", previous_response_id="resp_2", instructions="new"), store)
    assert [i["id"] for i in ctx.items[:4]] == ["msg_a", "fc_a", "fco_a", "msg_b"]
    assert len(ctx.input_items) == 1
    messages = to_messages(ctx.items, ctx.instructions)
    assert messages[0] == {"role": "system", "content": "new"}  # only this request's instructions
    assert "old" not in str(messages)
    assert messages[2]["tool_calls"][0]["id"] == "call_a"
    assert messages[3] == {"role": "tool", "tool_call_id": "call_a", "content": "42", "name": "f"}
    with pytest.raises(InvalidRequest) as err:
        prepare_context(request(input="Q", previous_response_id="resp_gone"), store)
    assert (err.value.param, err.value.code) == ("previous_response_id", "previous_response_not_found")


def test_item_reference_is_resolved_from_the_store() -> None:
    store = FakeStore(items={"msg_x": {"type": "message", "id": "msg_x", "role": "user", "content": "Hi"}})
    ctx = prepare_context(request(input=[{"type": "item_reference", "id": "msg_x"}]), store)
    assert ctx.items[0]["id"] == "msg_x"
    with pytest.raises(InvalidRequest) as err:
        prepare_context(request(input=[{"type": "item_reference", "id": "msg_nope"}]), store)
    assert err.value.param == "input[0].id"


def test_one_turn_becomes_one_assistant_message() -> None:
    items = [
        {"type": "message", "role": "user", "content": "Q"},
        {
            "type": "reasoning",
            "id": "rs",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "hmm"}],
        },
        {"type": "message", "role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "one"}]},
        {"type": "function_call_output", "call_id": "c2", "output": "two"},
    ]
    ctx = prepare_context(request(input=items), None)
    messages = to_messages(ctx.items, None)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["reasoning_content"] == "hmm" and messages[1]["content"] == "Let me look."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert messages[2]["content"] == "one" and messages[3]["name"] == "g"


def test_mcp_items_read_as_calls_and_a_declined_call_says_so() -> None:
    items = [
        {"role": "user", "content": "Q"},
        {"type": "mcp_list_tools", "id": "l1", "server_label": "s", "tools": []},
        {
            "type": "mcp_call",
            "id": "mcp_1",
            "server_label": "s",
            "name": "add",
            "arguments": "{}",
            "output": "5",
        },
        {
            "type": "mcp_call",
            "id": "mcp_2",
            "server_label": "s",
            "name": "add",
            "arguments": "{}",
            "error": "down",
        },
        {"type": "mcp_approval_request", "id": "r1", "server_label": "s", "name": "add", "arguments": "{}"},
        {"type": "mcp_approval_response", "approval_request_id": "r1", "approve": False},
    ]
    messages = to_messages(prepare_context(request(input=items), None).items, None)
    tools = [m for m in messages if m["role"] == "tool"]
    assert [t["content"] for t in tools] == ["5", "Error: down", DECLINED_TEXT]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
        ({"input": [{"type": "mcp_approval_response", "approval_request_id": "r"}]}, "input[0].approve"),
        ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0]"),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"input": "x", "n": 2}, "n"),
    ],
)
def test_invalid_requests(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare_context(request(**fields), None)
    assert err.value.param == param


def test_events_of_every_item_kind_validate_against_the_spec() -> None:
    req = request(input="Hi", tools=[{"type": "mcp", "server_label": "s", "authorization": "secret-token"}])
    builder = ResponseBuilder(response_body(req, "resp_1", 1, "in_progress"))
    events = [
        builder.event("response.created", response=builder.snapshot("in_progress")),
        builder.event("response.in_progress", response=builder.snapshot("in_progress")),
    ]
    writer = TurnWriter(builder)
    events += writer.reasoning("think ")
    events += writer.reasoning("more")
    events += writer.content("Hel", [])
    entry = {"token": "lo", "logprob": -0.1, "bytes": [108, 111], "top_logprobs": []}
    events += writer.content("lo", [entry])
    events += writer.function_call("call_1", "f", '{"a": 1}')
    events += writer.close()
    approval = {
        "type": "mcp_approval_request",
        "id": "mcpr_1",
        "server_label": "s",
        "name": "f",
        "arguments": "{}",
    }
    index, added = builder.add(approval)
    events += [added, builder.done(index, approval)]
    usage = usage_body(3, 0, 5, 2)
    events.append(builder.event("response.completed", response=builder.final("completed", usage)))
    final = check_events(events)
    assert [i["type"] for i in final["output"]] == [
        "reasoning",
        "message",
        "function_call",
        "mcp_approval_request",
    ]
    assert final["output"][1]["content"][0]["logprobs"] == [entry]
    assert "secret-token" not in str(events)


class SlowTools:
    """Server tools that emit an item and an event while they work, and return one more item."""

    async def prepare(self, context_items: list[dict[str, Any]], emit: Emitter) -> Any:
        return [], []

    async def run_calls(
        self, calls: list[dict[str, Any]], emit: Emitter
    ) -> tuple[list[dict[str, Any]], bool]:
        item = {"type": "mcp_call", "id": "mcp_1", "server_label": "s", "name": "f", "arguments": "{}"}
        index = emit.add({**item, "status": "in_progress"})
        emit.event({"type": "response.mcp_call.in_progress", "output_index": index, "item_id": "mcp_1"})
        await asyncio.sleep(0.01)
        emit.event({"type": "response.mcp_call.completed", "output_index": index, "item_id": "mcp_1"})
        done = {**item, "status": "completed", "output": "ok", "error": None}
        emit.done(index, done)
        listing = {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "s", "tools": []}
        return [done, listing], True

    def owns(self, function_name: str) -> bool:
        return True

    def choice_functions(self, tool_choice: dict[str, Any]) -> list[str]:
        return []


def test_server_tool_events_stream_in_order() -> None:
    req = request(input="Hi")
    builder = ResponseBuilder(response_body(req, "resp_1", 1, "in_progress"))
    run = _Run(req, prepare_context(req, None), None, None, SlowTools(), builder)  # type: ignore[arg-type]

    async def drain() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        result: list[Any] = []
        tools = SlowTools()
        async for event in run._drive(lambda emit: tools.run_calls([], emit), result):
            out.append(event)
        assert result == [True]
        return out

    events = asyncio.run(drain())
    assert [e["type"] for e in events] == [
        "response.output_item.added",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_item.done",
        "response.output_item.added",  # the listing was returned, not emitted: the loop emits it
        "response.output_item.done",
    ]
    assert [e["sequence_number"] for e in events] == list(range(6))
    assert [i["id"] for i in builder.output] == ["mcp_1", "mcpl_1"]


def test_a_failure_is_an_error_event_then_response_failed() -> None:
    req = request(input="Hi")
    builder = ResponseBuilder(response_body(req, "resp_1", 1, "in_progress"))
    run = _Run(req, prepare_context(req, None), None, None, SlowTools(), builder)  # type: ignore[arg-type]
    events = [
        builder.event("response.created", response=builder.snapshot("in_progress")),
        builder.event("response.in_progress", response=builder.snapshot("in_progress")),
    ]
    writer = TurnWriter(builder)
    events += writer.content("partial", [])
    events += writer.close("incomplete")  # as the turn loop closes it when the host fails

    async def fail() -> list[dict[str, Any]]:
        return [e async for e in run.failed("Generation failed (request id x).", "generation_failed", None)]

    events += asyncio.run(fail())
    failed = events[-1]["response"]
    assert events[-2]["type"] == "error" and events[-1]["type"] == "response.failed"
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert (
        failed["output"][0]["status"] == "incomplete"
        and failed["output"][0]["content"][0]["text"] == "partial"
    )
    for event in events:
        from tests.responses_helpers import validate_event

        validate_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


# -- chains through a running response ---------------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "in_progress"])
def test_a_chain_through_a_running_response_is_a_400(status: str) -> None:
    done = Turn([], [], response_id="resp_1")
    running = Turn([], [], status=status, response_id="resp_2")
    store = FakeStore({"resp_2": [done, running], "resp_3": [running, Turn([], [], response_id="resp_3")]})
    for previous in ("resp_2", "resp_3"):  # the running one last, or earlier in the chain
        with pytest.raises(InvalidRequest) as err:
            prepare_context(request(input="Q", previous_response_id=previous), store)
        assert err.value.param == "previous_response_id" and err.value.status == 400
        assert "resp_2" in err.value.message and status in err.value.message


# -- malformed tools and items: a 400 naming the field, never another exception ----------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "namespace", "name": "n", "tools": ["x"]}]}, "tools[0].tools[0]"),
        ({"tools": [{"type": "namespace", "name": "n", "tools": 5}]}, "tools[0].tools"),
        ({"tools": [{"type": "namespace", "tools": []}]}, "tools[0].name"),
        (
            {"tools": [{"type": "namespace", "name": "n", "tools": [{"type": "namespace"}]}]},
            "tools[0].tools[0]",
        ),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": 5}}, "tool_choice.tools"),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": ["f"]}}, "tool_choice.tools"),
        ({"tool_choice": {"type": "mcp", "server_label": ["s"]}}, "tool_choice"),
        ({"tool_choice": {"type": "function", "name": ["f"]}}, "tool_choice.name"),
        ({"input": [{"type": "mcp_list_tools", "server_label": "s", "tools": "abc"}]}, "input[0].tools"),
        ({"input": [{"type": "mcp_list_tools", "server_label": "s", "tools": [1]}]}, "input[0].tools[0]"),
        (
            {"input": [{"type": "mcp_list_tools", "server_label": "s", "tools": [{}]}]},
            "input[0].tools[0].name",
        ),
        (
            {
                "input": [
                    {
                        "type": "mcp_list_tools",
                        "server_label": "s",
                        "tools": [{"name": "a", "input_schema": 1}],
                    }
                ]
            },
            "input[0].tools[0].input_schema",
        ),
        ({"input": [{"type": "item_reference", "id": ["x"]}]}, "input[0].id"),
        ({"input": [{"role": "user", "content": [5]}]}, "input[0].content[0]"),
        ({"input": [{"type": "reasoning", "summary": [], "content": "think"}]}, "input[0].content"),
        (
            {
                "input": [
                    {"type": "mcp_call", "server_label": "s", "name": "f", "arguments": "{}", "output": 5}
                ]
            },
            "input[0].output",
        ),
    ],
)
def test_malformed_tools_and_items_are_400s(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare_context(request(**{"input": "x", **fields}), None)
    assert err.value.param == param


VALID_ITEMS: list[dict[str, Any]] = [
    {"type": "message", "id": "msg_1", "role": "user", "status": "completed", "content": "Q"},
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "c1",
        "name": "f",
        "arguments": "{}",
        "namespace": "n",
    },
    {"type": "function_call_output", "id": "fco_1", "call_id": "c1", "output": "ok", "status": "completed"},
    {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "t"}]},
    {"type": "mcp_list_tools", "id": "l1", "server_label": "s", "tools": [{"name": "t", "input_schema": {}}]},
    {
        "type": "mcp_call",
        "id": "mcp_1",
        "server_label": "s",
        "name": "t",
        "arguments": "{}",
        "output": "5",
        "error": None,
        "approval_request_id": None,
        "status": "completed",
    },
    {"type": "mcp_approval_request", "id": "r1", "server_label": "s", "name": "t", "arguments": "{}"},
    {
        "type": "mcp_approval_response",
        "id": "a1",
        "approval_request_id": "r1",
        "approve": False,
        "reason": "no",
    },
]
WRONG_VALUES: list[Any] = [5, 1.5, True, None, "x", [], [5], ["x"], {}, {"a": 1}]


@pytest.mark.parametrize("kind", [item["type"] for item in VALID_ITEMS])
def test_every_item_type_with_wrong_typed_fields_is_a_400_or_read(kind: str) -> None:
    """Each field of each input item type replaced by values of other types: the request is a 400
    naming that item, or it is read (into the model's messages, and by the MCP tools) without a
    fault. Never another exception, which would be a 500."""
    from tests.test_responses_mcp_units import Recorder, tools_of

    base = next(item for item in VALID_ITEMS if item["type"] == kind)
    prepare_context(request(input=VALID_ITEMS), None)  # the unbroken items are accepted
    refused = 0
    for field_name in base:
        for value in WRONG_VALUES:
            broken = (
                [*VALID_ITEMS[:1], {**base, field_name: value}]
                if kind != "message"
                else [{**base, field_name: value}]
            )
            if kind == "function_call_output":
                broken = [VALID_ITEMS[1], *broken]
            where = len(broken) - 1
            try:
                ctx = prepare_context(request(input=broken), None)
            except InvalidRequest as exc:
                assert exc.param is not None and exc.param.startswith(f"input[{where}]"), (field_name, value)
                refused += 1
                continue
            to_messages(ctx.items, None)
            mcp, _ = tools_of({"server_label": "s"})
            asyncio.run(mcp.prepare(ctx.items, Recorder()))
    assert refused > 0


# -- namespaces ------------------------------------------------------------------------------------


def namespace(name: str, *functions: str) -> dict[str, Any]:
    tools = [{"type": "function", "name": f, "parameters": {"type": "object"}} for f in functions]
    return {"type": "namespace", "name": name, "description": f"The {name} system.", "tools": tools}


def test_the_same_function_in_two_namespaces_is_two_tools_named_for_the_model() -> None:
    req = request(input="x", tools=[namespace("crm", "lookup"), namespace("erp", "lookup")])
    offered = [t["function"]["name"] for t in req.function_tools()]
    assert offered == ["crm__lookup", "erp__lookup"]
    assert req.function_tools()[0]["function"]["description"] == "The crm system."
    assert req.function_origin("erp__lookup") == ("erp", "lookup")
    assert req.function_origin("other") == (None, "other")
    with pytest.raises(InvalidRequest) as err:  # a clash of the names the model sees is still a 400
        request(input="x", tools=[namespace("crm", "lookup"), {"type": "function", "name": "crm__lookup"}])
    assert err.value.param == "tools[1].name"


def test_a_namespaced_call_carries_its_namespace_and_replays_under_the_models_name() -> None:
    req = request(input="x", tools=[namespace("crm", "lookup")])
    builder = ResponseBuilder(response_body(req, "resp_1", 1, "in_progress"))
    events = [
        builder.event("response.created", response=builder.snapshot("in_progress")),
        builder.event("response.in_progress", response=builder.snapshot("in_progress")),
    ]
    events += TurnWriter(builder).function_call("call_1", "lookup", "{}", "crm")
    events.append(
        builder.event("response.completed", response=builder.final("completed", usage_body(1, 0, 1, 0)))
    )
    final = check_events(events)  # the spec's FunctionToolCall.namespace
    call = final["output"][0]
    assert (call["name"], call["namespace"]) == ("lookup", "crm")
    replay = [
        {"role": "user", "content": "x"},
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": "1"},
    ]
    messages = to_messages(prepare_context(request(input=replay), None).items, None)
    assert messages[1]["tool_calls"][0]["function"]["name"] == "crm__lookup"
    assert messages[2]["name"] == "crm__lookup"


def test_a_tool_choice_names_a_namespaced_function() -> None:
    from sanic_serve.responses.request import chosen_function

    tools = [namespace("crm", "lookup"), namespace("erp", "lookup", "post")]
    for choice, model_name in [
        ({"type": "function", "name": "lookup", "namespace": "erp"}, "erp__lookup"),
        ({"type": "function", "name": "crm__lookup"}, "crm__lookup"),
        ({"type": "function", "name": "post"}, "erp__post"),  # in one namespace only
    ]:
        assert chosen_function(request(input="x", tools=tools, tool_choice=choice), choice) == model_name
    with pytest.raises(InvalidRequest, match="more than one namespace"):
        request(input="x", tools=tools, tool_choice={"type": "function", "name": "lookup"})


# -- allowed_tools -----------------------------------------------------------------------------


def test_allowed_tools_lets_through_only_the_functions_it_names() -> None:
    from sanic_serve.responses.turn import allowed

    choice = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "a"}]}
    tools = [{"type": "function", "name": n} for n in ("a", "b")]
    req = request(input="x", tools=tools, tool_choice=choice)
    assert [t["function"]["name"] for t in allowed(req, req.function_tools())] == ["a"]
    mcp_functions = [{"type": "function", "function": {"name": "a"}}]  # an MCP tool named like a function
    assert allowed(req, mcp_functions, lambda entry: ["a"]) == []  # a function entry names no MCP tool
    with pytest.raises(InvalidRequest) as err:
        request(input="x", tools=tools, tool_choice={**choice, "tools": [{"type": "function", "name": "z"}]})
    assert err.value.param == "tool_choice.tools[0]"


# -- mcp tools: validated once, by tool_spec ------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "param", "code"),
    [
        ({"type": "mcp"}, "tools[0].server_label", None),
        (
            {"type": "mcp", "server_label": "s", "connector_id": "x"},
            "tools[0].connector_id",
            "unsupported_parameter",
        ),
        (
            {"type": "mcp", "server_label": "s", "tunnel_id": "x"},
            "tools[0].tunnel_id",
            "unsupported_parameter",
        ),
    ],
)
def test_mcp_tools_are_checked_by_tool_spec(tool: dict[str, Any], param: str, code: str | None) -> None:
    from types import SimpleNamespace

    from sanic_serve.responses.run import server_tools_for

    req = request(input="x", tools=[tool])  # the request alone does not check mcp tools
    with pytest.raises(InvalidRequest) as err:
        server_tools_for(req, SimpleNamespace())
    assert (err.value.param, err.value.code) == (param, code)


# -- the stream is stored before its terminal event goes out ---------------------------------------


def test_a_stream_is_stored_before_its_terminal_event_is_sent() -> None:
    from types import SimpleNamespace

    from sanic_serve.responses import route

    req = request(input="Hi", stream=True)
    builder = ResponseBuilder(response_body(req, "resp_1", 1, "in_progress"))
    saved: list[str] = []
    sent: list[tuple[bytes, list[str]]] = []

    class Store:
        def save(self, response: dict[str, Any], items: list[Any], previous_response_id: Any) -> None:
            saved.append(response["id"])

        async def call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

    class Sink:
        async def send(self, data: bytes) -> None:
            sent.append((data, list(saved)))

        async def eof(self) -> None:
            pass

    async def respond(**kwargs: Any) -> Sink:
        assert kwargs["headers"] == route.SSE_HEADERS
        return Sink()

    async def events() -> Any:
        yield builder.event("response.created", response=builder.snapshot("in_progress"))
        yield builder.event("response.completed", response=builder.final("completed", usage_body(1, 0, 0, 0)))

    fake = SimpleNamespace(app=SimpleNamespace(ctx=SimpleNamespace(responses=Store())), respond=respond)
    asyncio.run(route._stream(fake, req, prepare_context(req, None), events()))  # type: ignore[arg-type]
    assert [b"response.completed" in data for data, _ in sent] == [False, True]
    assert sent[0][1] == [] and sent[1][1] == ["resp_1"]  # saved by the time the end was sent

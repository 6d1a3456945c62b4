"""The MCP tools of a Responses request, run by the server (the ``ServerTools`` of ``run.py``).

- ``prepare``: each server's tools are listed once (an ``mcp_list_tools`` item), unless the context
  already holds a listing of that label, which is used instead; the allowed ones are offered to the
  model as functions. Calls approved since the last response (an ``mcp_approval_response`` with
  ``approve: true`` answering an ``mcp_approval_request`` of the context, and not run yet) run now,
  so the model's next turn sees their results.
- ``run_calls``: the model's calls of those functions run on their server (``mcp_call`` with its
  ``output`` or ``error``) unless the tool needs approval (``require_approval``, ``"always"`` by
  default): then an ``mcp_approval_request`` ends the response and nothing reaches the server.

Streaming: ``output_item.added``, ``response.mcp_list_tools.in_progress`` / ``completed`` /
``failed``, ``response.mcp_call_arguments.delta`` / ``done``, ``response.mcp_call.in_progress`` /
``completed`` / ``failed``, ``output_item.done``, in that order per item.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sanic_serve.mcp.gateway import CallOutcome, MCPFailure, MCPGateway, protocol_error
from sanic_serve.mcp.settings import MCPSettings
from sanic_serve.mcp.tool_spec import MCPToolSpec, parse_mcp_tool
from sanic_serve.responses.items import new_item_id
from sanic_serve.responses.request import ResponsesRequest
from sanic_serve.responses.server_tools import Emitter

log = logging.getLogger(__name__)


def mcp_server_tools(req: ResponsesRequest, app_ctx: Any) -> MCPServerTools:
    """The request's ``mcp`` tools, validated (a 400 naming ``tools[i].field``), on the worker's
    gateway (``app_ctx.mcp``, made on first use)."""
    config = getattr(app_ctx, "config", None)
    settings: MCPSettings = getattr(config, "mcp", None) or MCPSettings()
    specs = [
        parse_mcp_tool(tool, f"tools[{i}]", settings)
        for i, tool in enumerate(req.tools)
        if isinstance(tool, dict) and tool.get("type") == "mcp"
    ]
    gateway = getattr(app_ctx, "mcp", None)
    if gateway is None:
        gateway = app_ctx.mcp = MCPGateway(settings)
    functions = {t["function"]["name"] for t in req.function_tools()}
    return MCPServerTools(specs, gateway, functions)


class MCPServerTools:
    def __init__(self, specs: list[MCPToolSpec], gateway: MCPGateway, function_names: set[str]) -> None:
        self._specs = {s.label: s for s in specs}
        self._gateway = gateway
        self._function_names = function_names  # the client's own functions win a name clash
        self._owner: dict[
            str, tuple[MCPToolSpec, dict[str, Any] | None]
        ] = {}  # name -> (server, annotations)

    # -- ServerTools ------------------------------------------------------------------------------
    async def prepare(
        self, context_items: list[dict[str, Any]], emit: Emitter
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        items: list[dict[str, Any]] = []
        functions: list[dict[str, Any]] = []
        for spec in self._specs.values():
            listing = _last_listing(context_items, spec.label)
            if listing is None:
                listing = await self._list(spec, emit)
                items.append(listing)
            for tool in listing.get("tools") or []:
                # Replayed listings were checked as input (items.py); a stored one is ours.
                offered = self._offer(spec, tool) if isinstance(tool, dict) else None
                if offered is not None:
                    functions.append(offered)
        for request in _approved_pending(context_items):
            items.append(await self._approved(request, emit))
        return items, functions

    async def run_calls(
        self, calls: list[dict[str, Any]], emit: Emitter
    ) -> tuple[list[dict[str, Any]], bool]:
        items: list[dict[str, Any]] = []
        waiting = False
        for call in calls:
            spec, annotations = self._owner[call["name"]]
            if spec.needs_approval(call["name"], annotations):
                item = {
                    "type": "mcp_approval_request",
                    "id": new_item_id("mcp_approval_request"),
                    "server_label": spec.label,
                    "name": call["name"],
                    "arguments": call["arguments"],
                }
                emit.done(emit.add(item), item)
                items.append(item)
                waiting = True
            else:
                items.append(await self._call(spec, call["name"], call["arguments"], None, emit))
        # A call waiting for approval ends the response; the others' results feed the next turn.
        return items, not waiting

    async def refuse(self, calls: list[dict[str, Any]], why: str, emit: Emitter) -> list[dict[str, Any]]:
        """Calls that are not run (past ``max_tool_calls``): each a failed ``mcp_call`` saying why,
        so nothing the model asked for vanishes; nothing reaches the server."""
        items = []
        for call in calls:
            spec, _ = self._owner[call["name"]]
            items.append(self._failed_call(spec.label, call["name"], call["arguments"], None, why, emit))
        return items

    def owns(self, function_name: str) -> bool:
        return function_name in self._owner

    def choice_functions(self, tool_choice: dict[str, Any]) -> list[str]:
        label, name = tool_choice.get("server_label"), tool_choice.get("name")
        names = [n for n, (spec, _) in self._owner.items() if spec.label == label]
        return [n for n in names if n == name] if name else names

    # -- the work -------------------------------------------------------------------------------
    def _offer(self, spec: MCPToolSpec, tool: dict[str, Any]) -> dict[str, Any] | None:
        name = tool.get("name")
        annotations = tool.get("annotations")
        if not isinstance(name, str) or not spec.allows(name, annotations):
            return None
        if name in self._function_names or name in self._owner:
            log.warning("MCP tool %r of %r not offered: another tool has that name", name, spec.label)
            return None
        self._owner[name] = (spec, annotations)
        description = tool.get("description") or ""
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
            },
        }

    async def _list(self, spec: MCPToolSpec, emit: Emitter) -> dict[str, Any]:
        item: dict[str, Any] = {
            "type": "mcp_list_tools",
            "id": new_item_id("mcp_list_tools"),
            "server_label": spec.label,
            "tools": [],
        }
        index = emit.add(dict(item))
        emit.event(
            {"type": "response.mcp_list_tools.in_progress", "item_id": item["id"], "output_index": index}
        )
        try:
            tools = await self._gateway.list_tools(spec)
        except MCPFailure as failure:
            item["error"] = failure.message
            emit.event(
                {"type": "response.mcp_list_tools.failed", "item_id": item["id"], "output_index": index}
            )
        else:
            # The listing shows what the model is offered: the tools allowed_tools lets through.
            item["tools"] = [t for t in tools if spec.allows(t["name"], t.get("annotations"))]
            emit.event(
                {"type": "response.mcp_list_tools.completed", "item_id": item["id"], "output_index": index}
            )
        emit.done(index, item)
        return item

    async def _approved(self, request: dict[str, Any], emit: Emitter) -> dict[str, Any]:
        """Run a call the client approved, exactly as it was asked for."""
        label, name = str(request["server_label"]), str(request["name"])
        spec = self._specs.get(label)
        if spec is None:
            why = f"The MCP server {label!r} is not among this request's tools, so the call was not run."
            return self._failed_call(label, name, request["arguments"], request["id"], why, emit)
        if not spec.allows(name, _annotations_in(self._owner, name, spec)):
            why = f"The tool {name!r} is not allowed by this request's allowed_tools, so it was not run."
            return self._failed_call(label, name, request["arguments"], request["id"], why, emit)
        return await self._call(spec, name, request["arguments"], request["id"], emit)

    async def _call(
        self, spec: MCPToolSpec, name: str, arguments: str, approval_id: str | None, emit: Emitter
    ) -> dict[str, Any]:
        item: dict[str, Any] = {
            "type": "mcp_call",
            "id": new_item_id("mcp_call"),
            "server_label": spec.label,
            "name": name,
            "arguments": "",
            "status": "in_progress",
            "approval_request_id": approval_id,
            "output": None,
            "error": None,
        }
        index = emit.add(dict(item))
        where = {"item_id": item["id"], "output_index": index}
        emit.event({"type": "response.mcp_call_arguments.delta", **where, "delta": arguments})
        emit.event({"type": "response.mcp_call_arguments.done", **where, "arguments": arguments})
        emit.event({"type": "response.mcp_call.in_progress", **where})
        item["arguments"] = arguments
        parsed = _arguments(arguments)
        if isinstance(parsed, str):
            outcome = CallOutcome(None, protocol_error(-32602, parsed))
        else:
            outcome = await self._gateway.call_tool(spec, name, parsed)
        item["status"] = "failed" if outcome.failed else "completed"
        item["output"], item["error"] = outcome.output, outcome.error
        emit.event({"type": f"response.mcp_call.{item['status']}", **where})
        emit.done(index, item)
        return item

    def _failed_call(
        self, label: str, name: str, arguments: str, approval_id: str | None, why: str, emit: Emitter
    ) -> dict[str, Any]:
        item = {
            "type": "mcp_call",
            "id": new_item_id("mcp_call"),
            "server_label": label,
            "name": name,
            "arguments": arguments,
            "status": "failed",
            "approval_request_id": approval_id,
            "output": None,
            "error": protocol_error(-32600, why),
        }
        index = emit.add(item)
        emit.event({"type": "response.mcp_call.failed", "item_id": item["id"], "output_index": index})
        emit.done(index, item)
        return item


def _last_listing(items: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
    """The context's latest successful listing of ``label``: its tools are not listed again."""
    for item in reversed(items):
        if (
            item.get("type") == "mcp_list_tools"
            and item.get("server_label") == label
            and not item.get("error")
        ):
            return item
    return None


def _approved_pending(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Approval requests of the context that an ``approve: true`` answers and no ``mcp_call`` has
    run yet, in the order they were asked."""
    requests = {i["id"]: i for i in items if i.get("type") == "mcp_approval_request" and "id" in i}
    ran = {i.get("approval_request_id") for i in items if i.get("type") == "mcp_call"}
    approved: list[str] = []
    for item in items:
        if item.get("type") != "mcp_approval_response" or item.get("approve") is not True:
            continue
        request_id = item.get("approval_request_id")
        if request_id not in requests:
            log.warning("an mcp_approval_response answers no approval request of the context; ignored")
        elif request_id not in ran and request_id not in approved:
            approved.append(str(request_id))
    return [requests[r] for r in approved]


def _annotations_in(owner: dict[str, tuple[MCPToolSpec, Any]], name: str, spec: MCPToolSpec) -> Any:
    found = owner.get(name)
    return found[1] if found is not None and found[0] is spec else None


def _arguments(arguments: str) -> dict[str, Any] | str:
    """The call's arguments as an object, or why they are not one."""
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return "The tool call's arguments are not valid JSON."
    if not isinstance(parsed, dict):
        return "The tool call's arguments must be a JSON object."
    return parsed

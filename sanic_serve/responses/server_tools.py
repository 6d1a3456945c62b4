"""The seam between the turn loop (``sanic_serve.responses.run``) and the tools the server runs
itself (MCP, ``sanic_serve.responses.mcp_tools``): what the loop hands them (an ``Emitter``) and
what they answer (``ServerTools``)."""

from __future__ import annotations

from typing import Any, Protocol

from sanic_serve.responses.request import ResponsesRequest


class Emitter(Protocol):
    """How server tools stream their own items and events while they work. Events go out live, in
    order with everything else, with their ``sequence_number`` filled in."""

    def add(self, item: dict[str, Any]) -> int:
        """Emit ``response.output_item.added`` for a new output item (e.g. an ``mcp_call`` with
        ``status: "in_progress"``); returns its ``output_index``."""
        ...

    def event(self, event: dict[str, Any]) -> None:
        """Emit any other event (``response.mcp_call.in_progress``, ...): a dict with ``type`` and
        its fields, without ``sequence_number``."""
        ...

    def done(self, output_index: int, item: dict[str, Any]) -> None:
        """Emit ``response.output_item.done``: ``item`` is the item's final form in the output."""
        ...


class ServerTools(Protocol):
    """Tools the server runs itself. Items they return that were not already emitted through the
    ``Emitter`` (matched by ``id``) are emitted by the loop as ``output_item.added`` / ``.done``."""

    async def prepare(
        self, context_items: list[dict[str, Any]], emit: Emitter
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Before the first turn, given the whole context (the chain and this request's input):
        output items to emit first (``mcp_list_tools``, an approved call's ``mcp_call``), and extra
        function definitions, in chat ``tools`` shape, to offer the model."""
        ...

    async def run_calls(
        self, calls: list[dict[str, Any]], emit: Emitter
    ) -> tuple[list[dict[str, Any]], bool]:
        """The model's calls of this turn that ``owns``: ``function_call``-shaped dicts (``id``,
        ``call_id``, ``name``, ``arguments``). Returns the output items (``mcp_call``,
        ``mcp_approval_request``) and whether to generate another turn in this response."""
        ...

    async def refuse(self, calls: list[dict[str, Any]], why: str, emit: Emitter) -> list[dict[str, Any]]:
        """Calls of this turn that ``owns`` and that are not run (past ``max_tool_calls``): their
        output items, each saying ``why`` (nothing is sent to a server)."""
        ...

    def owns(self, function_name: str) -> bool: ...

    def choice_functions(self, tool_choice: dict[str, Any]) -> list[str]:
        """The function names a ``{"type": "mcp", "server_label", "name"?}`` tool choice allows."""
        ...


class NoServerTools:
    """No tool runs on the server: ``mcp`` tools are skipped (logged at parse time)."""

    async def prepare(
        self, context_items: list[dict[str, Any]], emit: Emitter
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return [], []

    async def run_calls(
        self, calls: list[dict[str, Any]], emit: Emitter
    ) -> tuple[list[dict[str, Any]], bool]:
        return [], False

    async def refuse(self, calls: list[dict[str, Any]], why: str, emit: Emitter) -> list[dict[str, Any]]:
        return []

    def owns(self, function_name: str) -> bool:
        return False

    def choice_functions(self, tool_choice: dict[str, Any]) -> list[str]:
        return []


def server_tools_for(req: ResponsesRequest, app_ctx: Any) -> ServerTools:
    """The server tools of this request: its ``mcp`` tools (``sanic_serve.responses.mcp_tools``),
    validated here, so a malformed one is a 400 before the first event."""
    if not req.mcp_tools():
        return NoServerTools()
    from sanic_serve.responses.mcp_tools import mcp_server_tools  # imports the MCP SDK: only when used

    return mcp_server_tools(req, app_ctx)

"""One response as a stream of events: the turn loop, and its seam for server-side tools.

THE INTERFACE the POST route, background runs and server-side tools share::

    response_events(req, context, app_ctx, *, response_id, created_at, server_tools=None)
        -> AsyncIterator[dict]

- ``req``: the parsed ``ResponsesRequest`` (``sanic_serve.responses.request.parse_responses_request``).
- ``context``: the ``PreparedContext`` (``sanic_serve.responses.items.prepare_context(req, store)``):
  the stored chain behind ``previous_response_id`` and this request's input items, ids assigned,
  ``item_reference`` resolved; ``context.input_items`` is what ``ResponseStore.save`` stores as this
  request's input.
- ``app_ctx``: the worker's ``app.ctx`` (``client``, ``models``, ``config``, and ``responses``, the
  store, when there is one).
- ``response_id`` / ``created_at``: ``new_response_id()`` and ``int(time.time())`` unless the caller
  already handed them out (a background response is returned as ``queued`` before it runs).
- ``server_tools``: the tools the server runs itself (MCP); None picks ``server_tools_for(req, app_ctx)``.

It yields spec-valid ``ResponseStreamEvent`` dicts, ``sequence_number`` 0, 1, 2, ...: first
``response.created`` and ``response.in_progress``, last exactly one terminal event
(``response.completed``, ``response.incomplete``, or ``error`` then ``response.failed``) whose
``response`` is the full final Response body. A request that cannot start at all (unknown model,
prompt over the context, queue full) raises ``APIError`` before the first event, so an HTTP caller can
still answer with its status. Closing the generator (``aclose()``, a cancelled task) aborts the
generation in the model host at once.

Non-stream: drain it and return the terminal event's ``response``. Stream: each event as SSE.
Background: drained into the store.

Turns: the model generates; its calls of request ``function`` tools become ``function_call`` items
(client-side: the response ends after that turn); calls of server tools go to
``ServerTools.run_calls``, whose items (``mcp_call`` with its output, ``mcp_approval_request``) become
context of the next turn, generated in the same response, up to ``max_tool_calls``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from sanic_serve.responses.items import PreparedContext
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

    def owns(self, function_name: str) -> bool:
        return False

    def choice_functions(self, tool_choice: dict[str, Any]) -> list[str]:
        return []


def server_tools_for(req: ResponsesRequest, app_ctx: Any) -> ServerTools:
    """The server tools of this request (the MCP gateway plugs in here)."""
    return NoServerTools()


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


async def response_events(
    req: ResponsesRequest,
    context: PreparedContext,
    app_ctx: Any,
    *,
    response_id: str | None = None,
    created_at: int | None = None,
    server_tools: ServerTools | None = None,
) -> AsyncIterator[dict[str, Any]]:
    raise NotImplementedError
    yield {}  # pragma: no cover

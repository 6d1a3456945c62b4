"""The Response body, its output items, and the ``ResponseStreamEvent`` sequence that builds them.

One ``ResponseBuilder`` per response numbers every event (``sequence_number`` 0, 1, 2, ...) and
keeps the output items; a ``TurnWriter`` turns one model turn's parsed text into items and events
(reasoning, then message text, then calls), opening an item when its first text arrives and closing
it when the next kind starts. The final body is built from the same items as the events, so a
streamed response rebuilds the non-stream body exactly.
"""

from __future__ import annotations

import time
from typing import Any

from sanic_serve.responses.items import new_item_id
from sanic_serve.responses.partial import TERMINAL_EVENTS as TERMINAL_EVENTS  # defined once, there
from sanic_serve.responses.request import ResponsesRequest


def echoed_tools(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's tools as the response shows them: an MCP tool's ``authorization`` and
    ``headers`` are secrets and never leave the request."""
    out = []
    for tool in req.tools:
        shown = {k: v for k, v in tool.items() if k not in ("authorization", "headers")}
        if tool.get("type") == "function":  # the spec's FunctionTool has these, null when not given
            shown = {"description": None, "parameters": None, "strict": None, **shown}
        out.append(shown)
    return out


def _text_param(req: ResponsesRequest) -> dict[str, Any]:
    fmt = req.text.format
    out: dict[str, Any] = {"type": fmt.type}
    if fmt.type == "json_schema":
        out.update({"name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict})
        if fmt.description is not None:
            out["description"] = fmt.description
    return {"format": out, "verbosity": req.text.verbosity or "medium"}


def response_body(
    req: ResponsesRequest,
    response_id: str,
    created_at: int,
    status: str = "queued",
    *,
    temperature: float | None = None,
    top_p: float | None = None,
) -> dict[str, Any]:
    """A Response with no output yet (``queued`` or ``in_progress``): what a background request
    answers at once, and what ``response.created`` carries."""
    reasoning = req.reasoning
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": req.background,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "model": req.model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": reasoning.effort, "summary": reasoning.summary} if reasoning else None,
        "service_tier": req.service_tier or "default",
        "store": req.store,
        "temperature": temperature if temperature is not None else req.temperature,
        "text": _text_param(req),
        "tool_choice": req.tool_choice,
        "tools": echoed_tools(req),
        "top_logprobs": req.top_logprobs or 0,
        "top_p": top_p if top_p is not None else req.top_p,
        "truncation": req.truncation or "disabled",
        "metadata": req.metadata or {},
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
    }
    if req.user is not None:  # a string when present (the spec has no null for it)
        body["user"] = req.user
    return body


class ResponseBuilder:
    """The response being generated: its numbered events and its output items."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.output: list[dict[str, Any]] = []
        self._sequence = 0

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        out = {"type": type_, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return out

    def numbered(self, event: dict[str, Any]) -> dict[str, Any]:
        """An event built elsewhere (server tools), numbered in turn."""
        return self.event(
            event["type"], **{k: v for k, v in event.items() if k not in ("type", "sequence_number")}
        )

    def snapshot(self, status: str) -> dict[str, Any]:
        return {**self.body, "status": status, "output": [dict(i) for i in self.output]}

    def add(self, item: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, self.event("response.output_item.added", output_index=index, item=dict(item))

    def done(self, index: int, item: dict[str, Any]) -> dict[str, Any]:
        self.output[index] = item
        return self.event("response.output_item.done", output_index=index, item=dict(item))

    def final(
        self,
        status: str,
        usage: dict[str, Any] | None,
        *,
        incomplete_reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = self.snapshot(status)
        body["usage"] = usage
        # An incomplete response always has details; a reason only when one of the spec's fits.
        details = {"reason": incomplete_reason} if incomplete_reason else {}
        body["incomplete_details"] = details if status == "incomplete" else None
        body["error"] = error
        body["completed_at"] = int(time.time()) if status == "completed" else None
        return body


class TurnWriter:
    """One model turn's output as items and events. Fed parsed pieces in order; every method
    returns the events to send now."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self._b = builder
        self._open: str | None = None  # "reasoning" or "message"
        self._index = -1
        self._item: dict[str, Any] = {}
        self._text = ""
        self._logprobs: list[dict[str, Any]] = []
        self.reasoning_text = ""  # all of this turn's thought (its tokens count as reasoning)

    def reasoning(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        events = self._switch("reasoning")
        self._text += text
        self.reasoning_text += text
        events.append(self._b.event("response.reasoning_text.delta", **self._where(), delta=text))
        return events

    def content(self, text: str, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not text:
            return []
        events = self._switch("message")
        self._text += text
        self._logprobs += logprobs
        where = self._where()
        events.append(self._b.event("response.output_text.delta", **where, delta=text, logprobs=logprobs))
        return events

    def function_call(
        self, call_id: str, name: str, arguments: str, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """A complete call (calls are parsed whole): added, its arguments, done. ``name`` is the
        client's own name of the function, and ``namespace`` its namespace, if it has one."""
        events = self.close()
        item: dict[str, Any] = {
            "type": "function_call",
            "id": new_item_id("function_call"),
            "call_id": call_id,
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        if namespace is not None:
            item["namespace"] = namespace
        index, added = self._b.add(item)
        events.append(added)
        where = {"item_id": item["id"], "output_index": index}
        if arguments:
            events.append(self._b.event("response.function_call_arguments.delta", **where, delta=arguments))
        events.append(
            self._b.event("response.function_call_arguments.done", **where, name=name, arguments=arguments)
        )
        events.append(self._b.done(index, {**item, "arguments": arguments, "status": "completed"}))
        return events

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """Close the open item (its text ``done`` events, its part, the item)."""
        if self._open is None:
            return []
        where = self._where()
        events = []
        if self._open == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": self._text}
            events.append(self._b.event("response.reasoning_text.done", **where, text=self._text))
            item = {**self._item, "content": [part], "status": status}
        else:
            part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": self._logprobs}
            events.append(
                self._b.event("response.output_text.done", **where, text=self._text, logprobs=self._logprobs)
            )
            item = {**self._item, "content": [part], "status": status}
        events.append(self._b.event("response.content_part.done", **where, part=part))
        events.append(self._b.done(self._index, item))
        self._open, self._text, self._logprobs = None, "", []
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._item["id"], "output_index": self._index, "content_index": 0}

    def _switch(self, kind: str) -> list[dict[str, Any]]:
        if self._open == kind:
            return []
        events = self.close()
        if kind == "reasoning":
            self._item = {"type": "reasoning", "id": new_item_id("reasoning"), "summary": [], "content": []}
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            self._item = {
                "type": "message",
                "id": new_item_id("message"),
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._item["status"] = "in_progress"
        self._open = kind
        self._index, added = self._b.add(self._item)
        events.append(added)
        events.append(self._b.event("response.content_part.added", **self._where(), part=part))
        return events


def usage_body(
    input_tokens: int, cached_tokens: int, output_tokens: int, reasoning_tokens: int
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }

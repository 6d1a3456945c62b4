"""A stream cut short: the output as far as its events got, and the events that end it properly.

A background run that is cancelled, interrupted by a worker's shutdown, or found orphaned has sent
(and stored) events up to some point: items added but not done, a text part still open. A replay of
it must still follow the stream rules (every item added is done; exactly one terminal event), so the
open items are closed here with status ``incomplete`` (their text as far as it got) and the stream
ends with a terminal event:

- cancelled: ``response.completed`` carrying ``status: "cancelled"``. The spec has no cancelled
  stream event (``response.cancelled`` is a webhook), and the OpenAI SDK's stream accumulator gives
  a final response only for ``response.completed``; the body's ``status`` says what happened.
- interrupted or failed: ``error`` then ``response.failed``, as any failed response ends.
"""

from __future__ import annotations

from typing import Any

import orjson

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TEXT_DELTAS = ("response.output_text.delta", "response.reasoning_text.delta")
_ARGUMENT_DELTAS = ("response.function_call_arguments.delta", "response.mcp_call_arguments.delta")


class PartialOutput:
    """Fed a response's events in order; knows its output items so far and which are still open."""

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}  # by output_index, as far as they got
        self.open: set[int] = set()  # added, not done
        self.last_sequence = -1
        self.final: dict[str, Any] | None = None  # the response of the terminal event, once seen
        self.errored = False  # an ``error`` event was seen

    def feed(self, event: dict[str, Any]) -> None:
        self.last_sequence = max(self.last_sequence, int(event.get("sequence_number", -1)))
        kind, index = event["type"], event.get("output_index")
        if kind in TERMINAL_EVENTS:
            self.final = event["response"]
        elif kind == "error":
            self.errored = True
        elif kind == "response.output_item.added" and index is not None:
            self.items[index] = orjson.loads(orjson.dumps(event["item"]))  # a copy we may extend
            self.open.add(index)
        elif kind == "response.output_item.done" and index is not None:
            self.items[index] = orjson.loads(orjson.dumps(event["item"]))
            self.open.discard(index)
        elif index not in self.open:
            return
        elif kind == "response.content_part.added":
            self.items[index].setdefault("content", []).append(dict(event["part"]))
        elif kind in _TEXT_DELTAS:
            parts = self.items[index].get("content") or []
            position = int(event.get("content_index", 0))
            if position < len(parts):
                parts[position]["text"] = parts[position].get("text", "") + event.get("delta", "")
        elif kind in _ARGUMENT_DELTAS:
            item = self.items[index]
            item["arguments"] = item.get("arguments", "") + event.get("delta", "")

    def output(self) -> list[dict[str, Any]]:
        """The output items in order, the open ones marked ``incomplete``."""
        return [self._closed(i) if i in self.open else self.items[i] for i in sorted(self.items)]

    def ending(
        self, response: dict[str, Any], status: str, error: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """The events that close the open items and end the stream as ``status`` (``cancelled`` or
        ``failed``, with ``error``), numbered after the last event fed; none when it had ended. The
        response carried by the terminal event is ``response`` with the output so far."""
        if self.final is not None:
            return []
        events: list[dict[str, Any]] = []

        def add(kind: str, **fields: Any) -> None:
            self.last_sequence += 1
            events.append({"type": kind, "sequence_number": self.last_sequence, **fields})

        for index in sorted(self.open):
            item = self._closed(index)
            where = {"item_id": item.get("id"), "output_index": index}
            for position, part in enumerate(item.get("content") or []):
                at = {**where, "content_index": position}
                if part.get("type") == "output_text":
                    add("response.output_text.done", **at, text=part.get("text", ""), logprobs=[])
                elif part.get("type") == "reasoning_text":
                    add("response.reasoning_text.done", **at, text=part.get("text", ""))
                add("response.content_part.done", **at, part=part)
            if item.get("type") == "function_call":
                add(
                    "response.function_call_arguments.done",
                    **where,
                    name=item.get("name", ""),
                    arguments=item.get("arguments", ""),
                )
            add("response.output_item.done", output_index=index, item=item)
        body = {**response, "status": status, "output": self.output(), "error": error}
        if status == "failed":
            if not self.errored:
                error = error or {"code": "server_error", "message": "The response failed."}
                add("error", code=error.get("code"), message=error.get("message", ""), param=None)
            add("response.failed", response=body)
        else:
            add("response.completed", response=body)
        for event in events:
            self.feed(event)
        return events

    def _closed(self, index: int) -> dict[str, Any]:
        item = orjson.loads(orjson.dumps(self.items[index]))
        if "status" in item:
            item["status"] = "incomplete"
        for part in item.get("content") or []:
            if part.get("type") == "output_text":
                part.setdefault("annotations", [])
                part.setdefault("logprobs", [])
        return dict(item)


def cut_short(
    body: dict[str, Any],
    events: list[dict[str, Any]],
    stored_output: list[dict[str, Any]],
    error: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A stored run found orphaned (its worker gone): the events that end its stream as failed,
    and the response it ends with (its output as far as its events got, or the stored output
    when it has no events). A stream that had ended already (its worker died before saving the
    end) keeps the end it had."""
    partial = PartialOutput()
    for event in events:
        partial.feed(event)
    if not partial.items:
        for index, item in enumerate(stored_output):
            partial.items[index] = dict(item)
            if item.get("status") == "in_progress":
                partial.open.add(index)
    ending = partial.ending(body, "failed", error)
    assert partial.final is not None  # ending() always ends the stream
    return ending, dict(partial.final)

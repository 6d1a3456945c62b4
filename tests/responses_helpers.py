"""Helpers for Responses API tests: spec validation of bodies and events, the event rules, and
reading a stream (shared by the core, store and MCP tests)."""

from __future__ import annotations

import functools
import json
from typing import Any

import httpx

from model_host.demo.corpus import ADD_TOOL, WEATHER_TOOL
from tests.openapi import _spec, validate

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
GREEDY = {"model": "hfserve-demo", "temperature": 0}
# The demo model's two tools (as it was trained on them), in the Responses API's flat shape.
WEATHER: dict[str, Any] = {"type": "function", **WEATHER_TOOL["function"]}
ADD: dict[str, Any] = {"type": "function", **ADD_TOOL["function"]}


@functools.cache
def event_schemas() -> dict[str, str]:
    """Each ``ResponseStreamEvent`` variant's ``type`` -> its schema's name."""
    schemas = _spec()["components"]["schemas"]
    out = {}
    variants = schemas["ResponseStreamEvent"]
    for ref in variants.get("anyOf") or variants.get("oneOf"):
        name = ref["$ref"].rsplit("/", 1)[-1]
        enum = schemas[name]["properties"]["type"].get("enum") or []
        for value in enum:
            out[value] = name
    return out


def validate_event(event: dict[str, Any]) -> None:
    name = event_schemas().get(event["type"])
    assert name is not None, f"no spec schema for event type {event['type']!r}"
    validate(name, event)


def read_sse(text: str) -> list[dict[str, Any]]:
    """The events of a Responses stream; each ``event:`` line names its data's ``type``."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line]
        if not lines:
            continue
        names = [line[7:] for line in lines if line.startswith("event: ")]
        data = "".join(line[6:] for line in lines if line.startswith("data: "))
        assert data != "[DONE]", "the Responses API ends with its terminal event, not [DONE]"
        event = json.loads(data)
        assert names == [event["type"]], block
        events.append(event)
    return events


def stream(base_url: str, body: dict[str, Any], timeout_s: float = 180.0) -> list[dict[str, Any]]:
    r = httpx.post(f"{base_url}/v1/responses", json={**body, "stream": True}, timeout=timeout_s)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return read_sse(r.text)


def create(base_url: str, body: dict[str, Any], timeout_s: float = 180.0) -> dict[str, Any]:
    r = httpx.post(f"{base_url}/v1/responses", json=body, timeout=timeout_s)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    validate("Response", out)
    return out


def check_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Assert the stream rules; returns the final response. Every event validates against its
    spec schema; ``sequence_number`` counts from 0 by one; created and in_progress come first;
    exactly one terminal event, last (after ``error`` when failed); items are added before their
    events and done after them, at real output positions, with one id throughout; text and
    argument deltas join to their ``done`` values; the final output is the items as done."""
    for event in events:
        validate_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    terminals = [e for e in events if e["type"] in TERMINAL]
    assert len(terminals) == 1 and events[-1] is terminals[0]
    if terminals[0]["type"] == "response.failed":
        assert events[-2]["type"] == "error"
    final: dict[str, Any] = terminals[0]["response"]
    rid = events[0]["response"]["id"]
    assert all(e["response"]["id"] == rid for e in events if "response" in e)
    added: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    texts: dict[tuple[str, int, int, str], str] = {}
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            index = event["output_index"]
            assert index == len(added), "items are added at the next output position"
            added[index] = event["item"]
            continue
        if kind == "response.output_item.done":
            index = event["output_index"]
            assert index in added and index not in done
            assert event["item"]["id"] == added[index]["id"] and event["item"]["type"] == added[index]["type"]
            if "call_id" in added[index]:
                assert event["item"]["call_id"] == added[index]["call_id"]
            done[index] = event["item"]
            continue
        if "output_index" not in event:
            continue
        index = event["output_index"]
        assert index in added and index not in done, f"{kind} outside its item"
        if "item_id" in event:
            assert event["item_id"] == added[index]["id"]
        if kind.endswith(".delta"):
            key = (kind[: -len(".delta")], index, event.get("content_index", 0), event["item_id"])
            texts[key] = texts.get(key, "") + event["delta"]
        elif kind.endswith(".done") and not kind.startswith("response.content_part"):
            key = (kind[: -len(".done")], index, event.get("content_index", 0), event["item_id"])
            value = event.get("text", event.get("arguments"))
            if value is not None:
                assert texts.get(key, "") == value, f"{kind}: deltas do not join to the done value"
    assert sorted(added) == sorted(done) == list(range(len(final["output"])))
    assert [done[i] for i in range(len(done))] == final["output"]
    validate("Response", final)
    return final


def without_ids(body: Any) -> Any:
    """A response with its ids and times blanked, to compare two runs of the same request."""
    if isinstance(body, list):
        return [without_ids(b) for b in body]
    if not isinstance(body, dict):
        return body
    # cached_tokens: a second run of the same prompt finds it in the prefix cache.
    skip = {"id", "call_id", "created_at", "completed_at", "item_id", "cached_tokens"}
    return {k: ("*" if k in skip else without_ids(v)) for k, v in body.items()}


def output_text(response: dict[str, Any]) -> str:
    return "".join(
        part["text"]
        for item in response["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )

"""Send hostile cases concurrently and judge every answer by the rules every route must keep: no
5xx, no hang, error objects in OpenAI's shape, and 2xx bodies that match OpenAI's schemas."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema

from tests.hostile.cases import CHAT, COMPLETIONS, Case
from tests.openapi import validate

PER_REQUEST_TIMEOUT_S = 30.0
# What an internal error looks like when it leaks: a traceback, a source path, an exception repr.
_LEAK = re.compile(
    r"Traceback \(most recent call last\)|File \"/|site-packages|\b[A-Z]\w*(Error|Exception)\('"
)
_STREAM_SCHEMA = {CHAT: "CreateChatCompletionStreamResponse", COMPLETIONS: "CreateCompletionResponse"}
_BODY_SCHEMA = {CHAT: "CreateChatCompletionResponse", COMPLETIONS: "CreateCompletionResponse"}


@dataclass
class Answer:
    case: Case
    status: int | None
    problem: str | None  # None: the answer kept every rule
    param: str | None = None  # an error's ``param``

    def __str__(self) -> str:
        return f"{self.case.label!r} -> {self.status}: {self.problem}"


def _schema_for(path: str) -> str | None:
    if path in _BODY_SCHEMA:
        return _BODY_SCHEMA[path]
    if path == "/v1/models":
        return "ListModelsResponse"
    if path.startswith("/v1/models/"):
        return "Model"
    return None


def error_problem(body: Any) -> str | None:
    """Why ``body`` is not a proper OpenAI error object, or None."""
    try:
        validate("ErrorResponse", body)
    except jsonschema.ValidationError as exc:
        return f"not an error object: {exc.message}"
    err = body["error"]
    if not err["message"]:
        return "empty error message"
    if _LEAK.search(err["message"]):
        return f"internal detail leaked: {err['message'][:200]}"
    return None


def _as_documented(body: dict[str, Any]) -> dict[str, Any]:
    """A text completion with the two places where OpenAI's API (and hfserve, README) answers
    otherwise than its published schema filled in, so that the rest is judged: a streamed chunk's
    ``finish_reason`` is null until the last one (the spec reuses the whole response's schema), and
    an echoed prompt's first token has null for its logprob and alternatives."""
    choices = []
    for c in body.get("choices", []):
        c = {**c, "finish_reason": c.get("finish_reason") or "stop"}
        lp = c.get("logprobs")
        if isinstance(lp, dict):
            c["logprobs"] = {
                **lp,
                "token_logprobs": [0.0 if v is None else v for v in lp.get("token_logprobs") or []],
                "top_logprobs": [{} if v is None else v for v in lp.get("top_logprobs") or []],
            }
        choices.append(c)
    return {**body, "choices": choices}


def stream_problem(path: str, text: str) -> str | None:
    events = [e for e in text.split("\n\n") if e.strip()]
    schema = _STREAM_SCHEMA.get(path)
    if schema is not None:  # OpenAI's streams end so; /load_model's (transformers serve's) do not
        if not events or events[-1].strip() != "data: [DONE]":
            return f"stream does not end with [DONE]: {text[-200:]!r}"
        events = events[:-1]
    for ev in events:
        if not ev.startswith("data: "):
            return f"not an SSE data event: {ev[:100]!r}"
        payload = json.loads(ev[len("data: ") :])
        if "error" in payload:
            # An error after the headers went out. Only the queue filling up while a request's
            # choices are admitted one by one may do that (a 429 had the headers been unsent).
            if payload["error"].get("type") != "rate_limit_error":
                return f"in-band error in a stream: {payload['error']}"
            continue
        if schema == "CreateCompletionResponse":
            payload = _as_documented(payload)
        if schema is not None:
            try:
                validate(schema, payload)
            except jsonschema.ValidationError as exc:
                return f"stream chunk off-schema: {exc.message[:200]}"
    return None


def judge(case: Case, resp: httpx.Response) -> str | None:
    status = resp.status_code
    if status >= 500:
        return f"server error: {resp.text[:300]}"
    if case.method == "HEAD":
        return None  # no body to judge
    ctype = resp.headers.get("content-type", "")
    if status >= 400:
        if status == 429 and not resp.headers.get("retry-after"):
            return "429 without Retry-After"
        try:
            body = resp.json()
        except ValueError:
            return f"error body is not JSON: {resp.text[:200]!r}"
        return error_problem(body)
    if ctype.startswith("text/event-stream"):
        return stream_problem(resp.request.url.path, resp.text)
    try:
        body = resp.json()
    except ValueError:
        return f"2xx body is not JSON: {resp.text[:200]!r}"
    # The path as sent: the client resolves dot segments (``/v1/models/../../health``).
    schema = _schema_for(resp.request.url.path)
    if schema == "CreateCompletionResponse":
        body = _as_documented(body)
    if schema is not None:
        try:
            validate(schema, body)
        except jsonschema.ValidationError as exc:
            return f"2xx body off-schema ({schema}): {exc.message[:200]}"
    return None


async def _send(client: httpx.AsyncClient, case: Case) -> Answer:
    try:
        resp = await client.request(case.method, case.path, content=case.body, headers=case.headers)
    except httpx.TimeoutException:
        return Answer(case, None, f"no answer within {PER_REQUEST_TIMEOUT_S} s")
    except httpx.HTTPError as exc:
        return Answer(case, None, f"transport failure: {type(exc).__name__}: {exc}")
    answer = Answer(case, resp.status_code, judge(case, resp))
    if resp.status_code >= 400 and answer.problem is None and case.method != "HEAD":
        answer.param = resp.json()["error"]["param"]
    return answer


async def _run(base_url: str, cases: list[Case], concurrency: int) -> list[Answer]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=PER_REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one(case: Case) -> Answer:
            async with gate:
                return await _send(client, case)

        return list(await asyncio.gather(*(one(c) for c in cases)))


def send_all(base_url: str, cases: list[Case], concurrency: int = 32) -> list[Answer]:
    return asyncio.run(_run(base_url, cases, concurrency))

"""The hostile requests: valid requests mutated field by field (fields from OpenAI's spec plus
hfserve's extensions), hostile bodies and content types, and abuse of every route and method."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from tests.hostile import values as V
from tests.hostile.spec_fields import CHAT_EXTENSIONS, EXTENSIONS, FieldSpec, request_fields

MODEL = "hfserve-demo"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CHAT_BASE: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello!"}],
    "max_tokens": 2,
}
COMPLETION_BASE: dict[str, Any] = {"model": MODEL, "prompt": "Hello!", "max_tokens": 2}


@dataclass
class Case:
    label: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    stream: bool = False


def _case(label: str, path: str, body: Any, stream: bool = False) -> Case:
    if stream and isinstance(body, dict):
        body = {**body, "stream": True}
    return Case(label, "POST", path, V.encode(body), stream=stream)


def _valid_value(name: str, base: dict[str, Any]) -> Any:
    """A value the field may legitimately take, to wrap and to duplicate."""
    return base.get(name, {"stream": False, "n": 1, "temperature": 0.5, "stop": ["\n\n"]}.get(name, None))


def field_cases(path: str, specs: list[FieldSpec], specific: dict[str, list[tuple[str, Any]]]) -> list[Case]:
    """Every field mutated alone: generic values from its spec, then hand-made ones; every other
    mutation goes out streamed, so that the stream path sees hostile input too."""
    base = CHAT_BASE if path == CHAT else COMPLETION_BASE
    route = "chat" if path == CHAT else "completions"
    out: list[Case] = []
    for spec in specs:
        valid = _valid_value(spec.name, base)
        mutations = V.generic_values(spec, valid) + specific.get(spec.name, [])
        for i, (label, value) in enumerate(mutations):
            body = {**base, spec.name: value}
            stream = i % 2 == 1 and spec.name not in ("stream", "stream_options")
            out.append(_case(f"{route} {spec.name} {label}", path, body, stream))
        out.append(
            _case(f"{route} {spec.name} missing", path, {k: v for k, v in base.items() if k != spec.name})
        )
        out += duplicate_key_cases(path, route, spec.name, base, valid)
    return out


def _mutations(path: str) -> list[tuple[str, str, Any]]:
    """(field, label, value) of every single-field mutation of one route."""
    specs, specific = _route_fields(path)
    base = CHAT_BASE if path == CHAT else COMPLETION_BASE
    out = []
    for spec in specs:
        for label, value in V.generic_values(spec, _valid_value(spec.name, base)) + specific.get(
            spec.name, []
        ):
            out.append((spec.name, label, value))
    return out


def pair_cases(count: int, seed: int) -> list[Case]:
    """``count`` requests with two or three fields mutated at once, drawn with ``seed``."""
    rng = random.Random(seed)
    pools = {path: _mutations(path) for path in (CHAT, COMPLETIONS)}
    out = []
    for _ in range(count):
        path = rng.choice((CHAT, COMPLETIONS))
        body = dict(CHAT_BASE if path == CHAT else COMPLETION_BASE)
        labels = []
        for name, label, value in rng.sample(pools[path], rng.choice((2, 3))):
            body[name] = value
            labels.append(f"{name}:{label}")
        out.append(_case(f"pair {path} {' + '.join(labels)}", path, body, stream=rng.random() < 0.3))
    return out


def duplicate_key_cases(path: str, route: str, name: str, base: dict[str, Any], valid: Any) -> list[Case]:
    """The field twice in one object, garbage first and last (JSON leaves the outcome to the parser)."""
    rest = json.dumps({k: v for k, v in base.items() if k != name})[1:-1]
    good = f'"{name}": {json.dumps(valid)}'
    bad = f'"{name}": {{"hostile": [1, 2]}}'
    out = []
    for label, pair in (("dup-bad-first", f"{bad}, {good}"), ("dup-bad-last", f"{good}, {bad}")):
        out.append(Case(f"{route} {name} {label}", "POST", path, f"{{{rest}, {pair}}}".encode()))
    return out


def combination_cases() -> list[Case]:
    """Fields that only mean something together."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    chat: list[tuple[str, dict[str, Any]]] = [
        ("top-logprobs-without-logprobs", {"top_logprobs": 3}),
        ("logprobs-n-max", {"logprobs": True, "top_logprobs": 20, "n": 16}),
        ("continue-final-with-user-last", {"continue_final_message": True}),
        (
            "continue-final-and-generation-prompt",
            {"continue_final_message": True, "add_generation_prompt": True},
        ),
        ("tools-and-functions", {"tools": [V.ADD_TOOL], "functions": [V.ADD_TOOL["function"]]}),
        (
            "forced-call-and-response-format",
            {"tools": [V.ADD_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
        ),
        (
            "forced-call-bad-pattern",
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"a": {"type": "string", "pattern": "("}},
                            },
                        },
                    }
                ],
                "tool_choice": "required",
            },
        ),
        (
            "forced-call-bad-ref",
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
        ),
        ("forced-call-n", {"tools": [weather], "tool_choice": "required", "n": 4, "max_tokens": 4}),
        ("function-call-without-functions", {"function_call": {"name": "add"}}),
        ("reasoning-effort", {"reasoning_effort": "high"}),
        ("modalities-audio", {"modalities": ["audio"]}),
        ("max-completion-tokens-huge", {"max_completion_tokens": 10**6}),
        ("seed-with-n", {"seed": 2**64 - 1, "n": 3, "temperature": 2}),
        ("top-k-huge", {"top_k": 2**63}),
        (
            "sampling-extremes",
            {
                "temperature": 2,
                "top_p": 5e-324,
                "min_p": 1,
                "top_k": 1,
                "repetition_penalty": 10,
                "presence_penalty": -2,
                "frequency_penalty": 2,
            },
        ),
        ("all-tokens-banned", {"logit_bias": {str(i): -100 for i in range(776)}}),
    ]
    completions: list[tuple[str, dict[str, Any]]] = [
        ("best-of-below-n", {"n": 3, "best_of": 2}),
        ("best-of-streamed", {"best_of": 3, "stream": True}),
        ("suffix-and-echo", {"suffix": "x", "echo": True}),
        ("suffix-without-fim", {"suffix": "x"}),
        ("echo-logprobs-score", {"echo": True, "logprobs": 5, "max_tokens": 0}),
        ("echo-logprobs-stream", {"echo": True, "logprobs": 5, "n": 2, "stream": True}),
        ("token-prompts-n", {"prompt": [[1, 2], [3]], "n": 3, "best_of": 5}),
        ("top-k-huge", {"top_k": 2**63}),
    ]
    out = [_case(f"chat combo {label}", CHAT, {**CHAT_BASE, **body}) for label, body in chat]
    out += [
        _case(f"completions combo {label}", COMPLETIONS, {**COMPLETION_BASE, **body})
        for label, body in completions
    ]
    return out


HOSTILE_BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("null", b"null"),
    ("array", b"[]"),
    ("number", b"1"),
    ("string", b'"hi"'),
    ("true", b"true"),
    ("truncated", b'{"model": "hfserve-demo", "messages": ['),
    ("close-brace", b"}"),
    ("nul-bytes", b"\x00" * 100),
    ("binary", bytes(range(256))),
    ("bom", b"\xef\xbb\xbf" + V.encode(CHAT_BASE)),
    ("utf16", json.dumps(CHAT_BASE).encode("utf-16")),
    ("gzip-magic", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage"),
    ("nested-100k-arrays", b"[" * 100_000),
    ("nested-100k-objects", b'{"a":' * 100_000),
    ("trailing-garbage", V.encode(CHAT_BASE) + b" trailing"),
    ("two-objects", V.encode(CHAT_BASE) * 2),
    ("single-quotes", b"{'model': 'hfserve-demo'}"),
    ("comments", b'{"model": "hfserve-demo" /* c */}'),
    ("valid", V.encode(CHAT_BASE)),
]
CONTENT_TYPES = [
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "application/json; charset=utf-16",
    "\x01garbage",
    None,
]


def body_cases() -> list[Case]:
    out = []
    for path in (CHAT, COMPLETIONS):
        for label, body in HOSTILE_BODIES:
            for ctype in CONTENT_TYPES:
                headers = {} if ctype is None else {"content-type": ctype}
                out.append(Case(f"body {path} {label} [{ctype}]", "POST", path, body, headers))
    return out


ROUTES = [CHAT, COMPLETIONS, "/v1/models", f"/v1/models/{MODEL}", "/health"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]
ODD_PATHS = [
    "/",
    "/v1",
    "/v1/",
    "/v2/models",
    "/v1/chat/completion",
    "/v1/chat/completions/",
    "//v1//models",
    "/v1/models/",
    "/v1/models/HFSERVE-DEMO",
    "/v1/models/a/b/c",
    "/v1/models/%00",
    "/v1/models/%ff%fe",
    "/v1/models/..%2f..%2fetc%2fpasswd",
    "/v1/models/../../health",
    "/v1/models/" + "m" * 4000,
    "/v1/models/%zz",
    "/v1/models/\u00e9t\u00e9",
    "/v1/embeddings",
    "/load_model",
    "/reset",
    "/health?verbose=%%%",
    "/v1/models?limit=-1&after=%00",
    "/" + "x" * 6000,
]


def route_cases() -> list[Case]:
    out = [Case(f"route {m} {p}", m, p, None, {}) for p in ROUTES for m in METHODS]
    out += [Case(f"route GET {p}", "GET", p, None, {}) for p in ODD_PATHS]
    # GET routes with a body, and POST routes with a query string.
    out += [Case(f"route GET-with-body {p}", "GET", p, b'{"x": 1}') for p in ROUTES[2:]]
    out += [
        Case(f"route POST-with-query {p}", "POST", p + "?stream=true&model=x&%zz", V.encode(CHAT_BASE))
        for p in (CHAT, COMPLETIONS)
    ]
    for path in ("/load_model", "/reset"):
        for label, body in HOSTILE_BODIES[:12]:
            out.append(Case(f"route POST {path} {label}", "POST", path, body))
        out.append(Case(f"route POST {path} model-int", "POST", path, b'{"model": 5}'))
        out.append(Case(f"route POST {path} model-missing", "POST", path, b'{"model": "nobody/nothing"}'))
    return out


def _route_fields(path: str) -> tuple[list[FieldSpec], dict[str, list[tuple[str, Any]]]]:
    if path == CHAT:
        return request_fields("CreateChatCompletionRequest") + CHAT_EXTENSIONS, V.CHAT_SPECIFIC
    return request_fields("CreateCompletionRequest") + EXTENSIONS, V.COMPLETION_SPECIFIC


def all_cases() -> list[Case]:
    return [
        *field_cases(CHAT, *_route_fields(CHAT)),
        *field_cases(COMPLETIONS, *_route_fields(COMPLETIONS)),
        *combination_cases(),
        *body_cases(),
        *route_cases(),
    ]

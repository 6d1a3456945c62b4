"""Property-based requests from OpenAI's spec (Schemathesis) against a live hfserve, restricted to
the operations hfserve implements."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, cast

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
)
from schemathesis.core.failures import FailureGroup

from tests.hostile.answers import error_problem, stream_problem
from tests.openapi import SPEC_PATH

MODEL = "hfserve-demo"
OPERATIONS = ("createChatCompletion", "createCompletion", "listModels", "retrieveModel")
MAX_TOKENS = 4
MAX_CHOICES = 2

# Checks left out, and why:
# - status_code_conformance: the spec documents only 200 (and 429) for these operations, so every
#   400 for a bad field and 404 for an unknown model, which OpenAI's API itself answers, would fail.
# - negative_data_rejection: hfserve accepts unknown fields (clients send vendor extras) and reads
#   no-op fields (user, metadata, ...) without the spec's constraints, as documented in the README.
# - positive_data_acceptance: spec-valid requests for what a text-only local server refuses by design
#   (audio, image and file parts, custom tools, models it does not serve) are 400/404, not 2xx.
# Responses in the default mode are checked against the spec's schemas, content types and headers;
# negative (spec-violating) requests only for "no 5xx", since their 4xx bodies are not in the spec.
# Streamed replies are judged by tests.hostile.answers instead: the spec documents createCompletion's
# 200 as application/json only, though OpenAI streams it as text/event-stream, as hfserve does.
POSITIVE_CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
]
NEGATIVE_CHECKS = [not_a_server_error]


@functools.cache
def _operations() -> dict[str, Any]:
    schema = schemathesis.openapi.from_path(str(SPEC_PATH)).include(operation_id=list(OPERATIONS))
    # Each result is Ok or Err; ok() raises for an operation the spec could not describe.
    ops = [cast(Any, result).ok() for result in schema.get_all_operations()]
    return {op.definition.raw["operationId"]: op for op in ops}


def _tame(case: Any, operation_id: str) -> None:
    """Keep generation cheap: few tokens and choices. Most requests name the served model (the
    rest keep the generated one and exercise the 404 path)."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if (
                isinstance(body.get(key), int)
                and not isinstance(body.get(key), bool)
                and body[key] > MAX_TOKENS
            ):
                body[key] = MAX_TOKENS
        if "max_tokens" not in body and operation_id == "createChatCompletion":
            body["max_tokens"] = MAX_TOKENS  # chat's default is the whole context
        for key in ("n", "best_of"):
            if (
                isinstance(body.get(key), int)
                and not isinstance(body.get(key), bool)
                and body[key] > MAX_CHOICES
            ):
                body[key] = MAX_CHOICES
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > MAX_CHOICES:
            body["prompt"] = body["prompt"][:MAX_CHOICES]
        if isinstance(body.get("model"), str) and len(repr(body)) % 4:
            body["model"] = MODEL
    if operation_id == "retrieveModel" and case.path_parameters and len(repr(case.path_parameters)) % 2:
        case.path_parameters["model"] = MODEL


@dataclass
class Outcome:
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def run_operation(
    base_url: str, operation_id: str, mode: GenerationMode, max_examples: int, derandomize: bool
) -> Outcome:
    """Generate and send up to ``max_examples`` requests; every failed check is collected."""
    op = _operations()[operation_id]
    outcome = Outcome()

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(mode))
    def one(case: Any) -> None:
        _tame(case, operation_id)
        streamed = isinstance(case.body, dict) and case.body.get("stream") is True
        checks = POSITIVE_CHECKS if mode is GenerationMode.POSITIVE and not streamed else NEGATIVE_CHECKS
        response = case.call(base_url=base_url, timeout=30)
        status = response.status_code
        outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
        if streamed and status == 200:
            problem = stream_problem(f"/v1{op.path}", response.text)
            if problem:
                outcome.failures.append(f"{op.label} {status}: {problem}")
        try:
            case.validate_response(response, checks=checks)
        except (FailureGroup, AssertionError) as exc:
            outcome.failures.append(f"{op.label} {status}: {str(exc)[:1500]}")
        if 400 <= status < 500:
            problem = error_problem(response.json())
            if problem:
                outcome.failures.append(f"{op.label} {status}: {problem}")

    one()
    return outcome

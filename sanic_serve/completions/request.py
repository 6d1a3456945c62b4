"""The legacy Completions request (``CreateCompletionRequest``) and its validation."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from sanic_serve.errors import InvalidRequest
from sanic_serve.protocol import MAX_CHOICES, MAX_COMPLETION_LOGPROBS, GenerationFields, parse_request


class CompletionRequest(GenerationFields):
    """The legacy ``/v1/completions``: raw prompts, no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None  # text after the insertion: a fill-in-the-middle prompt
    # Candidates generated per prompt, of which the ``n`` most likely (mean token logprob) return.
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)

    # OpenAI's default for this endpoint; 0 with ``echo`` scores a prompt without generating.
    max_tokens: int | None = Field(default=16, ge=0)

    def logprob_count(self) -> int:
        return -1 if self.logprobs is None else self.logprobs

    def prompt_logprob_count(self) -> int:
        """With ``echo``, the echoed prompt's tokens carry logprobs too (as OpenAI's legacy API
        gives them, and as evaluation harnesses read them)."""
        return self.logprob_count() if self.echo else -1

    @property
    def candidates(self) -> int:
        return max(self.best_of or 1, self.n or 1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token prompts must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        v = self.prompt
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [list(v)]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]


def parse_completion_request(body: Any) -> CompletionRequest:
    req = parse_request(CompletionRequest, body, {})
    if req.best_of is not None and req.best_of < (req.n or 1):
        raise InvalidRequest("best_of must be greater than or equal to n.", param="best_of")
    if req.stream and req.candidates > (req.n or 1):
        # The best are known only once all candidates are complete.
        raise InvalidRequest("best_of greater than n cannot be streamed.", param="best_of")
    if req.suffix and req.echo:
        # What would the echo be: the prompt, or the sentinel-wrapped infilling prompt?
        raise InvalidRequest("echo cannot be combined with suffix.", param="echo")
    return req

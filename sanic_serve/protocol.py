"""What the generation requests share: their common fields, and parsing with errors that name the field.

Fields that change the output are either honoured or refused with a 400 that names them; fields
that cannot change the output here (``user``, ``metadata``, ``store``, ...) are accepted as no-ops.
Unknown extras are accepted, since clients send vendor fields, and logged once per worker.
"""

from __future__ import annotations

import functools
import logging
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from sanic_serve.errors import InvalidRequest
from sanic_serve.generation_config import apply_generation_config

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # each choice is a full generation in the batch
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # the legacy endpoint's limit
MAX_TOP_K = 2**31 - 1


class StreamOptions(BaseModel):
    include_usage: bool | None = None


# Accepted, but cannot change what this server generates.
NO_OP_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prediction",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "web_search_options",
        "verbosity",
    }
)
# Output-changing fields this version does not implement yet: refused unless left at the default.
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "moderation": (None,),
}


@functools.cache
def _number_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` that take a number and not a boolean."""
    out = set()
    for name, info in model.model_fields.items():
        kinds = typing.get_args(info.annotation) or (info.annotation,)
        if any(k in (int, float) for k in kinds) and bool not in kinds:
            out.add(name)
    return frozenset(out)


class GenerationFields(BaseModel):
    """What chat and text completions share: the model, sampling, stopping and streaming."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # int64, as the spec says: choice i samples with seed + i, and torch takes seeds up to 2**64 - 1,
    # so a seed past that would fail in the host, and with it every request prefilled beside it.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # Common extensions (vLLM, llama.cpp, TGI).
    # 0 or -1: off. The host holds k in an int64 tensor; any k past the vocabulary is "off" anyway,
    # so a bound keeps a huge one a 400 rather than an overflow in the model host.
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    # Extension (as in vLLM): keep generating past end-of-sequence tokens, for benchmarks.
    ignore_eos: bool = False
    # Extension (as in transformers serve): GenerationConfig fields, see sanic_serve.generation_config.
    generation_config: str | dict[str, Any] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """Pydantic reads true and false as 1 and 0 for a number field (``"n": true``); JSON keeps
        them apart, and so does OpenAI's API: a 400 naming the field."""
        if isinstance(v, bool) and info.field_name in _number_fields(cls):
            raise ValueError("a number is expected, not a boolean")
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be within [-100, 100], got {value}")
        return v

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    @property
    def stop_strings(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else []

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int:
        """-1: no logprobs; 0: the sampled token's; k: and k alternatives."""
        return -1

    def prompt_logprob_count(self) -> int:
        """The same for the prompt's tokens."""
        return -1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_warned_extras: set[str] = set()


# Pydantic adds the tried union member to an error's location (``content.str``); OpenAI names the
# field alone.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            break
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


RequestT = TypeVar("RequestT", bound=GenerationFields)


def parse_request(model: type[RequestT], body: Any, unsupported: dict[str, tuple[Any, ...]]) -> RequestT:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_name(tuple(first["loc"]))
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}", param=param) from exc
    for name, value in (req.model_extra or {}).items():
        if name in unsupported:
            if value not in unsupported[name]:
                raise InvalidRequest(
                    f"'{name}' is not supported by this server yet.",
                    param=name,
                    code="unsupported_parameter",
                )
        elif name not in NO_OP_FIELDS and name not in _warned_extras:
            _warned_extras.add(name)
            log.warning("ignoring unknown request field %r", name)
    apply_generation_config(req)
    return req

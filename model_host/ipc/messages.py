"""Typed messages that cross the worker ⇄ model-host boundary.

Worker → host messages are small dataclasses tagged with :class:`MessageKind` and pickled onto a
per-worker request pipe. Host → worker traffic is :class:`TokenFrame`, a fixed binary layout written
into the worker's shared-memory ring (see :mod:`model_host.ipc.ring`). Errors cross as values
(:class:`ErrorInfo`), never as raised exceptions or bare strings.
"""

from __future__ import annotations

import enum
import json
import struct
from array import array
from dataclasses import dataclass, field


class MessageKind(enum.IntEnum):
    ADD = 1
    ABORT = 2
    WORKER_RESET = 3
    UNLOAD_MODELS = 4


class FinishReason(enum.IntEnum):
    """Why a request stopped. ``NONE`` means the frame carries more tokens and the request runs on."""

    NONE = 0
    STOP = 1  # a stop token (EOS, end-of-turn) was sampled
    LENGTH = 2  # max_tokens or the context window was reached
    ABORT = 3  # the worker asked the host to stop it
    ERROR = 4  # the frame carries an ErrorInfo


class ErrorKind(enum.IntEnum):
    MODEL_NOT_FOUND = 1
    MODEL_LOAD_FAILED = 2
    GENERATION_FAILED = 3
    ENGINE_DEAD = 4
    INVALID_REQUEST = 5
    OVERLOADED = 6


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    kind: ErrorKind
    message: str

    def encode(self) -> bytes:
        return json.dumps({"kind": int(self.kind), "message": self.message}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ErrorInfo:
        obj = json.loads(raw)
        return cls(ErrorKind(obj["kind"]), str(obj["message"]))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings; ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logprobs: int = -1  # -1: none; 0: the sampled token's; k: and the k most likely alternatives
    prompt_logprobs: int = -1  # the same for each prompt token, sent ahead of the first token
    grammar: str | None = None  # an llguidance grammar the output must match (structured output)
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: int
    worker_index: int
    epoch: int  # host epoch the worker saw; a restarted host drops adds meant for its predecessor
    model_path: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    kind: MessageKind = field(default=MessageKind.ADD, init=False)


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: int
    worker_index: int
    kind: MessageKind = field(default=MessageKind.ABORT, init=False)


@dataclass(frozen=True, slots=True)
class WorkerReset:
    """A worker (re)started: whatever its predecessor left running has no reader any more."""

    worker_index: int
    kind: MessageKind = field(default=MessageKind.WORKER_RESET, init=False)


@dataclass(frozen=True, slots=True)
class UnloadModels:
    """Unload every model except the preloaded (default or pinned) one and those with requests
    waiting or running. The host answers, once done, with a frame for ``request_id`` that finishes
    with ``STOP``: the worker waits on it like on a request."""

    request_id: int
    worker_index: int
    kind: MessageKind = field(default=MessageKind.UNLOAD_MODELS, init=False)


HostMessage = AddRequest | AbortRequest | WorkerReset | UnloadModels

# Frame header: total length, request id, finish reason, has-logprobs flag, prompt flag, token
# count, error length, prompt tokens taken from the prefix cache. Then the token ids (i32 each),
# the error (JSON), and, with the flag, one logprob record per token: its logprob (f32), the
# number of alternatives (u16), and each alternative (i32, f32).
_HEADER = struct.Struct("<IQBBBxIII")
HEADER_SIZE = _HEADER.size
_LP_HEAD = struct.Struct("<fH")
_LP_ALT = struct.Struct("<if")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The sampled token's log probability and the most likely alternatives, best first. A
    prompt's first token has no logprob (nothing predicts it): NaN."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenFrame:
    """New tokens for one request, and how it finished if it did. A ``prompt`` frame instead
    carries prompt tokens with their logprobs (``prompt_logprobs``), ahead of any new token."""

    request_id: int
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason = FinishReason.NONE
    error: ErrorInfo | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when the request asked
    prompt: bool = False
    cached_tokens: int = 0  # on a request's first frame: prompt tokens reused, not prefilled

    def encode(self) -> bytes:
        tokens = array("i", self.token_ids).tobytes()
        err = self.error.encode() if self.error is not None else b""
        lps = b""
        if self.logprobs is not None:
            parts = []
            for lp in self.logprobs:
                parts.append(_LP_HEAD.pack(lp.logprob, len(lp.top)))
                parts += [_LP_ALT.pack(tid, value) for tid, value in lp.top]
            lps = b"".join(parts)
        total = HEADER_SIZE + len(tokens) + len(err) + len(lps)
        header = _HEADER.pack(
            total,
            self.request_id,
            int(self.finish_reason),
            self.logprobs is not None,
            self.prompt,
            len(self.token_ids),
            len(err),
            self.cached_tokens,
        )
        return header + tokens + err + lps

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> TokenFrame:
        total, request_id, finish, has_lp, prompt, n_tokens, n_err, cached = _HEADER.unpack_from(raw, 0)
        tokens = array("i")
        tok_end = HEADER_SIZE + 4 * n_tokens
        tokens.frombytes(bytes(raw[HEADER_SIZE:tok_end]))
        error = ErrorInfo.decode(bytes(raw[tok_end : tok_end + n_err])) if n_err else None
        logprobs = None
        if has_lp:
            at, records = tok_end + n_err, []
            for _ in range(n_tokens):
                value, k = _LP_HEAD.unpack_from(raw, at)
                at += _LP_HEAD.size
                top = tuple(_LP_ALT.unpack_from(raw, at + i * _LP_ALT.size) for i in range(k))
                at += k * _LP_ALT.size
                records.append(TokenLogprob(value, top))
            logprobs = tuple(records)
        return cls(request_id, tuple(tokens), FinishReason(finish), error, logprobs, bool(prompt), cached)

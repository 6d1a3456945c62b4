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


HostMessage = AddRequest | AbortRequest

# Frame header: total length, request id, finish reason, token count, error length.
_HEADER = struct.Struct("<IQBxxxII")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True, slots=True)
class TokenFrame:
    """New tokens for one request, and how it finished if it did."""

    request_id: int
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason = FinishReason.NONE
    error: ErrorInfo | None = None

    def encode(self) -> bytes:
        tokens = array("i", self.token_ids).tobytes()
        err = self.error.encode() if self.error is not None else b""
        total = HEADER_SIZE + len(tokens) + len(err)
        header = _HEADER.pack(total, self.request_id, int(self.finish_reason), len(self.token_ids), len(err))
        return header + tokens + err

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> TokenFrame:
        total, request_id, finish, n_tokens, n_err = _HEADER.unpack_from(raw, 0)
        tokens = array("i")
        tok_end = HEADER_SIZE + 4 * n_tokens
        tokens.frombytes(bytes(raw[HEADER_SIZE:tok_end]))
        error = ErrorInfo.decode(bytes(raw[tok_end : tok_end + n_err])) if n_err else None
        return cls(request_id, tuple(tokens), FinishReason(finish), error)

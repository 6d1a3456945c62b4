"""What every kind of model has in common in the host: the runner interface, and the shapes of the
requests and outputs that pass through it.

A runner owns one loaded model and the requests running on it. The engine's step asks every runner
to advance what it runs (``step``), and lets one runner take new requests from the head of the
waiting queue within the step's prefill budget and free batch slots (``admit``). Everything else —
the queue and its limits, backpressure, aborts of waiting requests, model loading and unloading,
publishing frames — is the engine's and the scheduler's, written once for every kind.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from model_host.ipc.messages import AddRequest, ErrorInfo, ErrorKind, FinishReason, Task, TokenFrame
from model_host.ipc.model_kind import ModelKind

RequestKey = tuple[int, int]  # (worker index, request id): ids are unique per worker only
_MAX_ERROR_CHARS = 2000  # frames must fit the ring; tracebacks go to the log instead


@dataclass(frozen=True, slots=True)
class StepOutput:
    worker_index: int
    frame: TokenFrame


def error_output(key: RequestKey, kind: ErrorKind, message: str) -> StepOutput:
    info = ErrorInfo(kind, message[:_MAX_ERROR_CHARS])
    return StepOutput(key[0], TokenFrame(key[1], (), FinishReason.ERROR, info))


@dataclass(slots=True)
class Pending:
    """A request waiting to start, and whatever its runner prepared for it while it waited (a
    causal runner's sequence, with the part of the prompt found in the prefix cache)."""

    request: AddRequest
    prepared: Any = None
    arrived_s: float = field(default_factory=time.monotonic)  # when it joined the queue
    passed_over: int = 0  # steps in which a younger request of its model started before it

    @property
    def key(self) -> RequestKey:
        return (self.request.worker_index, self.request.request_id)

    @property
    def model_path(self) -> str:
        return self.request.model_path


class WaitingQueue(Protocol):
    """The scheduler's queue as a runner sees it during ``admit``."""

    def head(self) -> Pending | None:
        """The oldest waiting request, or None."""

    def pop(self) -> Pending:
        """Take the head: it has started (or failed, with the error in the runner's outputs)."""

    def window(self, model_path: str, limit: int) -> list[Pending]:
        """Up to ``limit`` requests from the head, oldest first, ending before the first request for
        another model (models take turns in arrival order; within one, a runner may choose)."""

    def remove(self, pending: Pending) -> None:
        """Take ``pending``, wherever it is in the queue (it started, or failed)."""

    def account(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count a started request's input tokens, and those a cache spared computing."""


class Runner(abc.ABC):
    """One loaded model of one kind and the requests running on it."""

    kind: ClassVar[ModelKind]
    tasks: ClassVar[frozenset[Task]]  # what requests to this model may ask

    def __init__(self, path: str) -> None:
        self.path = path

    @abc.abstractmethod
    def admit(self, queue: WaitingQueue, budget_tokens: int, room: int) -> list[StepOutput]:
        """Start requests for this model from the head of ``queue`` (stopping at the first for
        another model), using at most ``budget_tokens`` of computation and ``room`` new batch
        slots; always at least the head, however large, when nothing else was taken. A runner
        still busy with an earlier admission (``prefilling``) goes on with that instead."""

    @abc.abstractmethod
    def step(self, admitting: bool = False) -> list[StepOutput]:
        """Advance every running request by one step (one token, one batch of vectors).
        ``admitting``: this runner may start new requests in this step's admission (it may leave
        work for it, to do in ``end_step``)."""

    @abc.abstractmethod
    def abort(self, key: RequestKey) -> bool:
        """Drop a running request; False when it is not here."""

    @abc.abstractmethod
    def keys(self) -> list[RequestKey]:
        """Every request running here."""

    @property
    @abc.abstractmethod
    def num_running(self) -> int:
        """Batch slots taken."""

    @property
    def prefilling(self) -> bool:
        """Part-way through an admission that takes several steps (a prompt longer than the prefill
        budget): this runner gets the next step's budget before anyone new is admitted."""
        return False

    def has_work(self) -> bool:
        return self.num_running > 0

    def end_step(self) -> list[StepOutput]:
        """After admission: work of this step that ``step`` left for it (a causal runner's decode
        that no admitted prompt shared a forward with); most kinds have none."""
        return []

    def look_ahead(self, waiting: Iterable[Pending]) -> None:  # noqa: B027 (optional: most kinds do nothing)
        """See the waiting queue (oldest first) before admission, to start preparing this model's
        requests ahead of their turn (a vision model's image processing); most kinds do not."""

    def drop_all(self) -> list[RequestKey]:
        """Forget every running request (after a failure that may have left state inconsistent);
        returns their keys."""
        keys = self.keys()
        for key in keys:
            self.abort(key)
        return keys

    @abc.abstractmethod
    def close(self) -> None:
        """Release the model (unload); the runner is not used afterwards."""

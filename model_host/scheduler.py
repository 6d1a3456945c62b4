"""The waiting queue and the limits every kind of request shares.

Requests wait in one FIFO queue, whatever their model. Each step the scheduler chooses the one runner
that may start new requests: a runner still part-way through a long admission first, else the runner
of the request at the head of the queue (loading its model on first use). That runner takes what fits
the step's prefill budget and free batch slots from the head, up to the first request for another
model; a causal runner may start a younger request past one that does not fit the step, a bounded
number of times (:mod:`model_host.runners.causal`). A request the host cannot serve (its
model does not load, its model does another task) leaves the queue with an error frame.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from model_host.errors import ModelLoadError
from model_host.ipc.messages import (
    WHISPER_FRAMES,
    AddRequest,
    Embed,
    ErrorKind,
    Generate,
    Payload,
    Transcribe,
    request_ref,
)
from model_host.ipc.settings import HostSettings
from model_host.runners.base import Pending, RequestKey, Runner, StepOutput, error_output

log = logging.getLogger(__name__)

# What a failed request is told; the exception's own text stays in the log next to the request's
# reference (``request_ref``): it may name files or internals no client should see.
LOAD_FAILED = "the model could not be loaded"


class Scheduler:
    def __init__(self, settings: HostSettings, prefill_budget_tokens: int) -> None:
        self.max_batch_size = settings.max_batch_size
        self.max_queue = settings.max_queue
        self.budget_tokens = prefill_budget_tokens
        self._waiting: deque[Pending] = deque()
        self.prompt_tokens_total = 0  # prompt tokens admitted, every kind
        self.cached_tokens_total = 0  # of which taken from a prefix cache instead of computed

    # -- the queue, as runners see it --------------------------------------------------------------
    def head(self) -> Pending | None:
        return self._waiting[0] if self._waiting else None

    def pop(self) -> Pending:
        return self._waiting.popleft()

    def window(self, model_path: str, limit: int) -> list[Pending]:
        found: list[Pending] = []
        for pending in self._waiting:
            if pending.model_path != model_path or len(found) >= limit:
                break
            found.append(pending)
        return found

    def remove(self, pending: Pending) -> None:
        # By identity: a dataclass compares field by field, payloads (images, audio) included.
        at = next(i for i, p in enumerate(self._waiting) if p is pending)
        del self._waiting[at]

    def account(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens_total += prompt_tokens
        self.cached_tokens_total += cached_tokens

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting(self) -> Iterator[Pending]:
        """Every waiting request, oldest first (for runners that prepare requests ahead)."""
        return iter(self._waiting)

    # -- requests arriving and leaving -----------------------------------------------------------
    def add(self, request: AddRequest, num_running: int) -> StepOutput | None:
        """Queue a request; an error frame instead when it is refused (queue full, nothing to do)."""
        key = (request.worker_index, request.request_id)
        refusal = _refusal(request.payload)
        if refusal is not None:
            return error_output(key, ErrorKind.INVALID_REQUEST, refusal)
        # ``max_queue`` counts requests that wait for a batch slot: those that will start at the
        # next step (free slots) are not queued behind anyone, so 0 means "no waiting room".
        free_slots = max(0, self.max_batch_size - num_running)
        if len(self._waiting) >= self.max_queue + free_slots:
            return error_output(key, ErrorKind.OVERLOADED, "the server is busy: too many waiting requests")
        self._waiting.append(Pending(request))
        return None

    def abort(self, key: RequestKey) -> bool:
        for pending in self._waiting:
            if pending.key == key:
                self.remove(pending)
                return True
        return False

    def keys(self) -> list[RequestKey]:
        return [p.key for p in self._waiting]

    def clear(self) -> list[RequestKey]:
        keys = self.keys()
        self._waiting.clear()
        return keys

    def models_waiting(self) -> set[str]:
        return {p.model_path for p in self._waiting}

    # -- the step --------------------------------------------------------------------------------
    def may_admit(self, runner: Runner, num_running: int) -> bool:
        """Whether ``runner`` may start requests this step: it is part-way through a long prompt,
        or the queue's head is for its model and a batch slot is free."""
        if runner.prefilling:
            return True
        head = self.head()
        return head is not None and head.model_path == runner.path and num_running < self.max_batch_size

    def admit(
        self, runners: Iterable[Runner], load: Callable[[str], Runner], num_running: int
    ) -> list[StepOutput]:
        """Let one runner start what fits this step; returns the frames of what it started and of
        the requests that could not be served."""
        outputs: list[StepOutput] = []
        room = self.max_batch_size - num_running
        owner = next((r for r in runners if r.prefilling), None)
        while owner is None and self._waiting and room > 0:
            head = self._waiting[0]
            try:
                runner = load(head.model_path)
            except ModelLoadError as exc:
                log.error("model load failed for %s: %s", request_ref(*head.key), exc, exc_info=exc)
                self.pop()
                outputs.append(error_output(head.key, ErrorKind.MODEL_LOAD_FAILED, LOAD_FAILED))
                continue
            if head.request.task not in runner.tasks:
                self.pop()
                message = f"this model serves {', '.join(t.name.lower() for t in runner.tasks)} requests"
                outputs.append(error_output(head.key, ErrorKind.INVALID_REQUEST, message))
                continue
            owner = runner
        if owner is not None and (owner.prefilling or room > 0):
            outputs += owner.admit(self, self.budget_tokens, room)
        return outputs


def _refusal(payload: Payload) -> str | None:
    """What no runner can do anything with (the workers refuse it first)."""
    if isinstance(payload, Generate) and not payload.prompt_token_ids:
        return "the prompt is empty"
    if isinstance(payload, Embed):
        # No inputs at all would never finish: the embedding runner ends a request with the frame
        # of its last input, and would hold the head of the queue meanwhile.
        if not payload.inputs:
            return "there are no inputs"
        if not all(payload.inputs):
            return "an input is empty"
    if isinstance(payload, Transcribe):
        if payload.n_windows < 1 or payload.n_mels < 1:
            return "there is no audio"
        if len(payload.features) != payload.n_windows * payload.n_mels * WHISPER_FRAMES * 4:
            return "the features do not have the shape (n_windows, n_mels, 3000) of float32"
        return payload.window_starts_problem()
    return None

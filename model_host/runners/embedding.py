"""The embedding runner: the inputs of many requests encoded together.

An embedding request is all prefill: each of its inputs becomes one row of a padded, length-sorted
forward pass, and its vector goes out in a frame the same step. ``admit`` takes requests from the
head of the queue while their rows fit the step's token budget (rows × the longest row, as the
padded pass costs); a request with more rows than one step takes is finished over the next steps
(``prefilling``), so running chat streams still get their decode step in between.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from model_host.embedding import EmbeddingModel
from model_host.ipc.messages import Embed, ErrorKind, FinishReason, Task, TokenFrame, request_ref
from model_host.ipc.model_kind import ModelKind
from model_host.runners.base import RequestKey, Runner, StepOutput, WaitingQueue, error_output

log = logging.getLogger(__name__)

ENCODING_FAILED = "embedding failed"  # the exception's text goes to the log, not to clients


@dataclass(eq=False)
class _Job:
    key: RequestKey
    inputs: tuple[tuple[int, ...], ...]
    pending: set[int] = field(default_factory=set)  # inputs not yet encoded

    def __post_init__(self) -> None:
        self.pending = set(range(len(self.inputs)))

    @property
    def done(self) -> bool:
        return not self.pending


class EmbeddingRunner(Runner):
    kind: ClassVar[ModelKind] = ModelKind.EMBEDDING
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.EMBED})

    def __init__(self, path: str, model: EmbeddingModel) -> None:
        super().__init__(path)
        self.model = model
        self._jobs: deque[_Job] = deque()  # admitted, not yet fully encoded; oldest first

    @property
    def num_running(self) -> int:
        return len(self._jobs)

    @property
    def prefilling(self) -> bool:
        return bool(self._jobs)

    def keys(self) -> list[RequestKey]:
        return [job.key for job in self._jobs]

    def abort(self, key: RequestKey) -> bool:
        for job in self._jobs:
            if job.key == key:
                self._jobs.remove(job)
                return True
        return False

    def close(self) -> None:
        self._jobs.clear()
        del self.model

    def step(self, admitting: bool = False) -> list[StepOutput]:
        return []  # nothing runs between admissions: every row is encoded in the step that takes it

    def admit(self, queue: WaitingQueue, budget_tokens: int, room: int) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        # ``room`` is the free slots, after those this runner's unfinished jobs already hold: only
        # jobs started now count against it.
        started = 0
        while room > started and (head := queue.head()) is not None and head.model_path == self.path:
            payload = head.request.payload
            assert isinstance(payload, Embed)
            reason = self._refusal(payload)
            queue.pop()
            if reason is not None:
                outputs.append(error_output(head.key, ErrorKind.INVALID_REQUEST, reason))
                continue
            queue.account(sum(len(ids) for ids in payload.inputs), 0)
            self._jobs.append(_Job(head.key, payload.inputs))
            started += 1
        return outputs + self._encode(budget_tokens)

    def _refusal(self, payload: Embed) -> str | None:
        """Why this model cannot embed the inputs (the HTTP side checks first; this keeps a bad
        message from failing everyone else's batch)."""
        try:
            self.model.check([list(ids) for ids in payload.inputs])
        except ValueError as exc:
            return str(exc)
        return None

    def _pass(self, budget_tokens: int) -> list[tuple[_Job, int]]:
        """The rows of one padded pass: the oldest waiting row (so no row waits behind later ones
        for long), then the other waiting rows shortest first, while rows × the longest fit the
        budget. Rows of like length share a pass and little is spent on padding; admitting every
        waiting request of this model gives the pass rows to choose from."""
        oldest = next((job for job in self._jobs if job.pending), None)
        if oldest is None:
            return []
        first = min(oldest.pending)
        others = sorted(
            (len(job.inputs[i]), n, i, job)
            for n, job in enumerate(self._jobs)
            for i in job.pending
            if not (job is oldest and i == first)
        )
        rows = [(oldest, first)]
        width = len(oldest.inputs[first])
        for length, _, i, job in others:
            if (len(rows) + 1) * max(width, length) > budget_tokens:
                break
            rows.append((job, i))
            width = max(width, length)
        return rows

    def _encode(self, budget_tokens: int) -> list[StepOutput]:
        """One forward over the rows that fit, then one frame per row; the frame of a request's
        last row to be encoded finishes it."""
        rows = self._pass(budget_tokens)
        if not rows:
            return []
        try:
            vectors = self.model.encode([list(job.inputs[i]) for job, i in rows])
        except Exception:  # a failing pass ends the requests in it, not the host
            failed = {job.key: job for job, _ in rows}
            log.exception("embedding failed for %s", ", ".join(request_ref(*k) for k in failed))
            for job in failed.values():
                self._jobs.remove(job)
            return [error_output(k, ErrorKind.GENERATION_FAILED, ENCODING_FAILED) for k in failed]
        outputs = []
        for (job, i), vector in zip(rows, vectors, strict=True):
            job.pending.discard(i)
            outputs.append(self._frame(job, i, vector))
        self._jobs = deque(job for job in self._jobs if not job.done)
        return outputs

    @staticmethod
    def _frame(job: _Job, index: int, vector: torch.Tensor) -> StepOutput:
        raw = vector.to(device="cpu", dtype=torch.float32).numpy().astype("<f4").tobytes()
        reason = FinishReason.STOP if job.done else FinishReason.NONE
        return StepOutput(job.key[0], TokenFrame(job.key[1], (), reason, vector=raw, index=index))

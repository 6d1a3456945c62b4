"""The generation engine: one ``step()`` advances every running request by one token.

Requests join between steps (prefill, then their first token) and leave the moment they finish or
are aborted. Each request keeps its own KV cache, so a request's tokens never depend on what else is
running: greedy output is exactly that of a lone ``generate()``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from model_host.ipc.messages import (
    AddRequest,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    SamplingParams,
    TokenFrame,
)
from model_host.registry import LoadedModel, ModelLoadError, ModelRegistry
from model_host.sampling import make_generator, sample

log = logging.getLogger(__name__)

RequestKey = tuple[int, int]  # (worker index, request id): ids are unique per worker only


@dataclass(frozen=True, slots=True)
class StepOutput:
    worker_index: int
    frame: TokenFrame


@dataclass
class _Sequence:
    key: RequestKey
    model_path: str
    prompt: list[int]
    params: SamplingParams
    model: LoadedModel | None = None
    generator: torch.Generator | None = None
    cache: Any = None
    generated: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


class Engine:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[RequestKey, _Sequence] = {}
        self.aborted_total = 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def add(self, req: AddRequest) -> None:
        key = (req.worker_index, req.request_id)
        self._waiting.append(_Sequence(key, req.model_path, list(req.prompt_token_ids), req.sampling))

    def abort(self, key: RequestKey) -> bool:
        if self._running.pop(key, None) is not None:
            self.aborted_total += 1
            return True
        for seq in self._waiting:
            if seq.key == key:
                self._waiting.remove(seq)
                self.aborted_total += 1
                return True
        return False

    def abort_worker(self, worker_index: int) -> int:
        """Drop every request of a worker that went away (its pipe closed)."""
        keys = [k for k in self._running if k[0] == worker_index]
        keys += [s.key for s in self._waiting if s.key[0] == worker_index]
        return sum(self.abort(k) for k in keys)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        decoding = list(self._running.values())
        while self._waiting:
            seq = self._waiting.popleft()
            out = self._guarded(seq, self._prefill)
            outputs.append(out)
            if out.frame.finish_reason is FinishReason.NONE:
                self._running[seq.key] = seq
        for seq in decoding:
            out = self._guarded(seq, self._decode)
            outputs.append(out)
            if out.frame.finish_reason is not FinishReason.NONE:
                self._running.pop(seq.key, None)
        return outputs

    # -- per-sequence work -----------------------------------------------------------------------
    def _guarded(self, seq: _Sequence, work: Any) -> StepOutput:
        """Run one piece of work; a failure ends this request with an error frame, nothing else."""
        try:
            token = work(seq)
        except ModelLoadError as exc:
            return self._error(seq, ErrorKind.MODEL_LOAD_FAILED, str(exc))
        except Exception as exc:  # a bad request must never take the host down
            log.exception("generation failed for request %s", seq.key)
            return self._error(seq, ErrorKind.GENERATION_FAILED, f"{type(exc).__name__}: {exc}")
        return StepOutput(seq.key[0], TokenFrame(seq.key[1], (token,), self._finish_reason(seq)))

    def _error(self, seq: _Sequence, kind: ErrorKind, message: str) -> StepOutput:
        seq.cache = None
        frame = TokenFrame(seq.key[1], (), FinishReason.ERROR, ErrorInfo(kind, message))
        return StepOutput(seq.key[0], frame)

    def _prefill(self, seq: _Sequence) -> int:
        seq.model = self.registry.get(seq.model_path)
        if len(seq.prompt) >= seq.model.max_context:
            raise ValueError(
                f"prompt of {len(seq.prompt)} tokens does not fit the context of {seq.model.max_context}"
            )
        seq.generator = make_generator(seq.params, seq.model.device)
        ids = torch.tensor([seq.prompt], device=seq.model.device)
        return self._forward(seq, ids)

    def _decode(self, seq: _Sequence) -> int:
        assert seq.model is not None
        ids = torch.tensor([[seq.generated[-1]]], device=seq.model.device)
        return self._forward(seq, ids)

    def _forward(self, seq: _Sequence, ids: torch.Tensor) -> int:
        assert seq.model is not None
        kwargs = {seq.model.cache_arg: seq.cache}
        out = seq.model.model(input_ids=ids, use_cache=True, **kwargs)
        seq.cache = out[seq.model.cache_arg]
        token = sample(out.logits[:, -1, :], [seq.params], [seq.generator])[0]
        seq.generated.append(token)
        return token

    def _finish_reason(self, seq: _Sequence) -> FinishReason:
        assert seq.model is not None
        if seq.generated[-1] in seq.params.stop_token_ids:
            reason = FinishReason.STOP
        elif len(seq.generated) >= seq.params.max_new_tokens or seq.length >= seq.model.max_context:
            reason = FinishReason.LENGTH
        else:
            return FinishReason.NONE
        seq.cache = None  # free the KV memory now, not when the dict entry goes
        return reason

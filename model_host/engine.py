"""The generation engine: iteration-level (continuous) batching.

Each ``step()`` runs one forward pass per running batch (normally one), so every running request
gets one token; then it admits waiting requests: a group of prompts is prefilled together, within a
per-step token budget, and joins the running batch. Requests leave the batch the moment they finish
or are aborted. A prompt longer than the budget is prefilled in chunks, one per step, so it never
stalls the others for long.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import torch

from model_host.batch import DecodeBatch, Sequence
from model_host.ipc.messages import (
    AddRequest,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    TokenFrame,
    TokenLogprob,
)
from model_host.prefix_cache import PrefixCache
from model_host.registry import LoadedModel, ModelLoadError, ModelRegistry

log = logging.getLogger(__name__)

RequestKey = tuple[int, int]  # (worker index, request id): ids are unique per worker only
_MAX_ERROR_CHARS = 2000  # frames must fit the ring; tracebacks go to the log instead
_PROMPT_TOKENS_PER_FRAME = 256  # about 14 KB of prompt logprobs per frame at 5 alternatives


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_size: int = 64  # running requests, all models together
    max_batch_tokens: int = 2048  # prompt tokens prefilled per step
    max_queue: int = 256  # requests waiting to start
    prefix_cache_bytes: int = 0  # KV of finished requests kept for prompts that start the same


@dataclass(frozen=True, slots=True)
class StepOutput:
    worker_index: int
    frame: TokenFrame


def _error(seq: Sequence, kind: ErrorKind, message: str) -> StepOutput:
    info = ErrorInfo(kind, message[:_MAX_ERROR_CHARS])
    return StepOutput(seq.key[0], TokenFrame(seq.key[1], (), FinishReason.ERROR, info))


class Engine:
    def __init__(self, registry: ModelRegistry, limits: SchedulerLimits | None = None) -> None:
        self.registry = registry
        self.limits = limits or SchedulerLimits()
        self._waiting: deque[Sequence] = deque()
        self._batches: list[DecodeBatch] = []
        self._chunking: Sequence | None = None
        self.aborted_total = 0
        self.prefix_cache = (
            PrefixCache(self.limits.prefix_cache_bytes) if self.limits.prefix_cache_bytes else None
        )
        self.prompt_tokens_total = 0  # prompt tokens admitted
        self.cached_tokens_total = 0  # of which taken from the prefix cache instead of prefilled

    @property
    def num_running(self) -> int:
        return sum(len(b) for b in self._batches) + (self._chunking is not None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._batches or self._chunking)

    def add(self, req: AddRequest) -> StepOutput | None:
        """Queue a request; returns an immediate error frame when the queue is full."""
        seq = Sequence(
            (req.worker_index, req.request_id), req.model_path, list(req.prompt_token_ids), req.sampling
        )
        # Requests that will start at the next step (free batch slots) are not queued behind anyone.
        free_slots = max(0, self.limits.max_batch_size - self.num_running)
        if len(self._waiting) >= self.limits.max_queue + free_slots:
            return _error(seq, ErrorKind.OVERLOADED, "the server is busy: too many waiting requests")
        self._waiting.append(seq)
        return None

    def abort(self, key: RequestKey) -> bool:
        for seq in self._waiting:
            if seq.key == key:
                self._waiting.remove(seq)
                return self._count_abort()
        if self._chunking is not None and self._chunking.key == key:
            self._chunking = None
            return self._count_abort()
        for batch in self._batches:
            keep = [i for i, s in enumerate(batch.seqs) if s.key != key]
            if len(keep) < len(batch):
                self._shrink(batch, keep)
                return self._count_abort()
        return False

    def abort_worker(self, worker_index: int) -> int:
        """Drop every request of a worker that went away for good."""
        keys = [s.key for s in self._waiting] + [s.key for b in self._batches for s in b.seqs]
        if self._chunking is not None:
            keys.append(self._chunking.key)
        return sum(self.abort(k) for k in keys if k[0] == worker_index)

    def unload_idle_models(self, keep: tuple[str, ...]) -> list[str]:
        """Unload every loaded model but those in ``keep`` and those with requests waiting or
        running (their batches and sequences hold the model); their prefix-cache entries go too.
        Returns the paths unloaded."""
        busy = {s.model_path for s in self._waiting} | {b.model.path for b in self._batches}
        if self._chunking is not None:
            busy.add(self._chunking.model_path)
        unloaded = []
        for path in self.registry.loaded():
            if path in keep or path in busy:
                continue
            if self.prefix_cache is not None:
                self.prefix_cache.drop_model(path)
            self.registry.unload(path)
            unloaded.append(path)
        return unloaded

    def _count_abort(self) -> bool:
        self.aborted_total += 1
        return True

    def _shrink(self, batch: DecodeBatch, keep: list[int]) -> None:
        batch.filter(keep)
        if not len(batch) and batch in self._batches:  # a new batch is not in the list yet
            self._batches.remove(batch)

    def fail_all(self, message: str) -> list[StepOutput]:
        """End every request with an error frame and start clean: the way out when a step failed
        in a way that may have left the batches inconsistent."""
        seqs = list(self._waiting) + [s for b in self._batches for s in b.seqs]
        if self._chunking is not None:
            seqs.append(self._chunking)
        self._waiting.clear()
        self._batches.clear()
        self._chunking = None
        return [_error(s, ErrorKind.GENERATION_FAILED, message) for s in seqs]

    # -- the step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for batch in list(self._batches):
            try:
                sampled = batch.sample(batch.decode())
            except Exception as exc:  # a failing forward ends that batch's requests, not the host
                log.exception("decode step failed")
                outputs += [_error(s, ErrorKind.GENERATION_FAILED, repr(exc)) for s in batch.seqs]
                self._batches.remove(batch)
                continue
            outputs += self._emit(batch, *sampled)
        for batch, logits in self._admit(outputs):
            outputs += self._prompt_frames(batch)
            logits = self._end_empty_requests(batch, logits, outputs)
            if len(batch):
                outputs += self._emit(batch, *batch.sample(logits))
            if not len(batch):
                continue
            host = next((b for b in self._batches if b.can_join(batch)), None)
            if host is not None:
                host.concatenate(batch)
            else:
                self._batches.append(batch)
        return outputs

    def _emit(
        self, batch: DecodeBatch, tokens: list[int], logprobs: list[TokenLogprob | None]
    ) -> list[StepOutput]:
        """One frame per row; finished rows leave the batch at once."""
        outputs: list[StepOutput] = []
        keep: list[int] = []
        for i, (seq, token, lp) in enumerate(zip(batch.seqs, tokens, logprobs, strict=True)):
            params = seq.params
            if token in params.stop_token_ids:
                reason = FinishReason.STOP
            elif len(seq.generated) >= params.max_new_tokens or seq.length >= batch.model.max_context:
                reason = FinishReason.LENGTH
            else:
                reason = FinishReason.NONE
                keep.append(i)
            if reason is not FinishReason.NONE and self.prefix_cache is not None and batch.joinable:
                self.prefix_cache.store(seq.model_path, *batch.row_kv(i))
            cached = seq.cached_tokens if len(seq.generated) == 1 else 0  # said once, first
            frame = TokenFrame(
                seq.key[1], (token,), reason, None, None if lp is None else (lp,), cached_tokens=cached
            )
            outputs.append(StepOutput(seq.key[0], frame))
        self._shrink(batch, keep)
        return outputs

    @staticmethod
    def _prompt_frames(batch: DecodeBatch) -> list[StepOutput]:
        """Prompt logprobs, for the requests that asked, in frames of bounded size."""
        outputs: list[StepOutput] = []
        for seq in batch.seqs:
            if not seq.wants_prompt_logprobs:
                continue
            records = [TokenLogprob(math.nan), *seq.prompt_logprobs]  # nothing predicts token 0
            seq.prompt_logprobs = []
            for at in range(0, len(seq.prompt), _PROMPT_TOKENS_PER_FRAME):
                part = slice(at, at + _PROMPT_TOKENS_PER_FRAME)
                frame = TokenFrame(
                    seq.key[1], tuple(seq.prompt[part]), logprobs=tuple(records[part]), prompt=True
                )
                outputs.append(StepOutput(seq.key[0], frame))
        return outputs

    def _end_empty_requests(
        self, batch: DecodeBatch, logits: torch.Tensor, outputs: list[StepOutput]
    ) -> torch.Tensor:
        """``max_tokens: 0`` (a prompt scored, nothing generated) ends right after its prefill."""
        keep = [i for i, s in enumerate(batch.seqs) if s.params.max_new_tokens > 0]
        if len(keep) == len(batch):
            return logits
        for seq in batch.seqs:
            if seq.params.max_new_tokens <= 0:
                frame = TokenFrame(seq.key[1], (), FinishReason.LENGTH, cached_tokens=seq.cached_tokens)
                outputs.append(StepOutput(seq.key[0], frame))
        self._shrink(batch, keep)
        return logits[keep]

    # -- admission -------------------------------------------------------------------------------
    def _admit(self, outputs: list[StepOutput]) -> list[tuple[DecodeBatch, torch.Tensor]]:
        """Prefill what the limits allow this step. Failures become error frames in ``outputs``.
        New prompts are prefilled together; a prompt whose start is in the prefix cache is
        prefilled on its own, from there."""
        if self._chunking is not None:
            return self._continue_chunking(outputs)
        budget = self.limits.max_batch_tokens
        room = self.limits.max_batch_size - self.num_running
        group: list[Sequence] = []
        admitted: list[tuple[DecodeBatch, torch.Tensor]] = []
        model: LoadedModel | None = None
        while self._waiting and room > len(group) + len(admitted):
            seq = self._waiting[0]
            if model is not None and seq.model_path != model.path:
                break  # one model per prefill; the next step takes the others
            candidate = self._ready(seq, outputs)
            if candidate is None:
                continue
            todo = len(seq.prompt) - self._reuse_prefix(seq)
            if todo > budget:
                if group or admitted:
                    break
                self._chunking = self._take(seq)
                return self._continue_chunking(outputs)
            model = candidate
            budget -= todo
            if seq.prefilled:
                admitted += self._prefill_rest(model, self._take(seq), outputs)
            else:
                group.append(self._take(seq))
        if group:
            assert model is not None
            try:
                admitted.append(DecodeBatch.prefill(model, group))
            except Exception as exc:
                log.exception("prefill failed")
                outputs += [_error(s, ErrorKind.GENERATION_FAILED, repr(exc)) for s in group]
        return admitted

    def _ready(self, seq: Sequence, outputs: list[StepOutput]) -> LoadedModel | None:
        """The model of the first waiting request, once the request is known to be servable;
        None when it is not (it leaves the queue with an error frame)."""
        try:
            model = self.registry.get(seq.model_path)
        except ModelLoadError as exc:
            self._waiting.popleft()
            outputs.append(_error(seq, ErrorKind.MODEL_LOAD_FAILED, str(exc)))
            return None
        if len(seq.prompt) >= model.max_context:
            self._waiting.popleft()
            message = (
                f"prompt of {len(seq.prompt)} tokens does not fit the model's context of {model.max_context}"
            )
            outputs.append(_error(seq, ErrorKind.INVALID_REQUEST, message))
            return None
        if seq.params.grammar and seq.matcher is None:
            try:
                seq.matcher = model.matcher(seq.params.grammar, seq.params.stop_token_ids)
            except Exception as exc:  # a grammar the decoder cannot build: this request's error
                self._waiting.popleft()
                outputs.append(
                    _error(seq, ErrorKind.INVALID_REQUEST, f"cannot enforce the output format: {exc}")
                )
                return None
        return model

    def _take(self, seq: Sequence) -> Sequence:
        self._waiting.popleft()
        self.prompt_tokens_total += len(seq.prompt)
        self.cached_tokens_total += seq.cached_tokens
        return seq

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Start ``seq`` from the longest prefix of its prompt in the prefix cache; returns how
        many prompt tokens that covers. Prompt logprobs need every position's logits: no reuse."""
        if seq.prefilled or self.prefix_cache is None or seq.wants_prompt_logprobs:
            return seq.prefilled
        found = self.prefix_cache.match(seq.model_path, seq.prompt)
        if found is not None:
            from transformers.cache_utils import DynamicCache

            seq.prefilled, layers = found
            seq.cached_tokens = seq.prefilled
            seq.prefill_cache = DynamicCache(ddp_cache_data=layers)  # copies: the entry stays intact
        return seq.prefilled

    def _prefill_rest(
        self, model: LoadedModel, seq: Sequence, outputs: list[StepOutput]
    ) -> list[tuple[DecodeBatch, torch.Tensor]]:
        try:
            done = DecodeBatch.prefill_chunk(model, seq, len(seq.prompt) - seq.prefilled)
        except Exception as exc:
            log.exception("prefill after a cached prefix failed")
            outputs.append(_error(seq, ErrorKind.GENERATION_FAILED, repr(exc)))
            return []
        assert done is not None  # the whole rest fits this step
        return [done]

    def _continue_chunking(self, outputs: list[StepOutput]) -> list[tuple[DecodeBatch, torch.Tensor]]:
        seq = self._chunking
        assert seq is not None
        try:
            model = self.registry.get(seq.model_path)
            done = DecodeBatch.prefill_chunk(model, seq, self.limits.max_batch_tokens)
        except Exception as exc:
            log.exception("chunked prefill failed")
            self._chunking = None
            load_failed = isinstance(exc, ModelLoadError)
            kind = ErrorKind.MODEL_LOAD_FAILED if load_failed else ErrorKind.GENERATION_FAILED
            outputs.append(_error(seq, kind, str(exc)))
            return []
        if done is None:
            return []
        self._chunking = None
        return [done]

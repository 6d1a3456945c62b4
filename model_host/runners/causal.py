"""The causal-LM runner: padded-batch continuous batching of one model.

``step`` runs one forward pass per running batch (normally one), so every running request gets one
token. ``admit`` prefills a group of new prompts together, within the step's token budget, and the
group joins the running batch. Requests leave the batch the moment they finish or are aborted. A
prompt longer than the budget is prefilled in chunks, one per step (``prefilling``), so it never
stalls the others for long; a prompt whose start is in the prefix cache is prefilled from there.
When the model allows it, a step that admits a group of new prompts runs the running batch's
decode in the same forward (a mixed step, :mod:`model_host.packed`).
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch

from model_host.batch import DecodeBatch, Sequence
from model_host.causal_lm import CausalLM
from model_host.ipc.messages import (
    ErrorKind,
    FinishReason,
    Generate,
    Task,
    TokenFrame,
    TokenLogprob,
    request_ref,
)
from model_host.ipc.model_kind import ModelKind
from model_host.packed import packed_step, packing_works
from model_host.prefix_cache import Layers, PrefixCache
from model_host.runners.base import Pending, RequestKey, Runner, StepOutput, WaitingQueue, error_output
from model_host.runners.causal_frames import (
    ContextExceeded,
    count_frames,
    counting,
    failed,
    over_context,
    prompt_frames,
    refs,
)

log = logging.getLogger(__name__)

# Waiting requests of this model looked at each step, and how often one may be passed over by younger
# ones that fit the step when it does not: a short prompt starts beside a long one, and a request
# passed over this many times holds back everything younger until it has started.
ADMIT_WINDOW = 32
MAX_PASSED_OVER = 4


class CausalRunner(Runner):
    kind: ClassVar[ModelKind] = ModelKind.CAUSAL
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.GENERATE})

    packs_steps: ClassVar[bool] = True  # may run mixed steps (model_host.packed), when the model can

    def __init__(self, model: CausalLM, prefix_cache: PrefixCache | None) -> None:
        super().__init__(model.path)
        self.model = model
        # Mixed steps: a step that admits new prompts runs the batch's decode in the same forward.
        # The decode waits (``_deferred``) for admission, and ``end_step`` runs it alone if
        # nothing was admitted to pack it with.
        self._packs = self.packs_steps and packing_works(model)
        self._deferred: DecodeBatch | None = None
        self.mixed_steps = 0  # steps whose decode shared a forward with new prompts
        self.prefix_cache = prefix_cache
        self._batches: list[DecodeBatch] = []
        self._chunking: Sequence | None = None

    @property
    def num_running(self) -> int:
        return sum(len(b) for b in self._batches) + (self._chunking is not None)

    @property
    def prefilling(self) -> bool:
        return self._chunking is not None

    def keys(self) -> list[RequestKey]:
        keys = [s.key for b in self._batches for s in b.seqs]
        return keys + ([self._chunking.key] if self._chunking is not None else [])

    def abort(self, key: RequestKey) -> bool:
        if self._chunking is not None and self._chunking.key == key:
            self._chunking = None
            return True
        for batch in self._batches:
            keep = [i for i, s in enumerate(batch.seqs) if s.key != key]
            if len(keep) < len(batch):
                self._shrink(batch, keep)
                return True
        return False

    def drop_all(self) -> list[RequestKey]:
        keys = self.keys()
        self._batches.clear()
        self._chunking = self._deferred = None
        return keys

    def close(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.drop_model(self.path)
        self.model.close()

    def _shrink(self, batch: DecodeBatch, keep: list[int]) -> None:
        batch.filter(keep)
        if not len(batch) and batch in self._batches:  # a new batch is not in the list yet
            self._batches.remove(batch)

    # -- running requests ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, admitting: bool = False) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        if admitting and self._packs and len(self._batches) == 1 and self._batches[0].joinable:
            self._deferred = self._batches[0]  # decoded with the prompts admitted, or in end_step
            return outputs
        for batch in list(self._batches):
            try:
                sampled = batch.sample(batch.decode())
            except Exception:  # a failing forward ends that batch's requests, not the host
                log.exception("decode step failed for %s", refs(batch.seqs))
                outputs += failed(batch.seqs)
                self._batches.remove(batch)
                continue
            outputs += self._emit(batch, *sampled)
        return outputs

    @torch.inference_mode()
    def end_step(self) -> list[StepOutput]:
        batch, self._deferred = self._deferred, None
        if batch is None or batch not in self._batches:
            return []
        try:
            sampled = batch.sample(batch.decode())
        except Exception:
            log.exception("decode step failed for %s", refs(batch.seqs))
            self._batches.remove(batch)
            return failed(batch.seqs)
        return self._emit(batch, *sampled)

    def _prefill(
        self, group: list[Sequence], rests: list[Sequence], chunk_tokens: int, outputs: list[StepOutput]
    ) -> list[tuple[DecodeBatch, torch.Tensor]]:
        """This step's prompt work: the new prompts together, the rest of each prompt found in the
        prefix cache, the next chunk of a long prompt. With a deferred decode (and no prompt that
        needs every position's logits) all of it shares one forward with the decode: a mixed
        step; otherwise each part runs its own forward."""
        batch, chunk = self._deferred, self._chunking
        work = group + rests + ([chunk] if chunk is not None else [])
        if batch is None or not work or any(s.wants_prompt_logprobs for s in work):
            return self._prefill_apart(group, rests, chunk_tokens, outputs)
        self._deferred = None
        continued = tuple((s, len(s.prompt) - s.prefilled) for s in rests)
        if chunk is not None:
            continued += ((chunk, chunk_tokens),)
        try:
            decoded, done = packed_step(batch, group, continued)
        except Exception:
            # The batch is as it was (packed_step undoes its column): only the new work fails, and
            # the running rows decode alone, in end_step.
            log.exception("mixed step failed for %s", refs(work))
            self._deferred, self._chunking = batch, None
            outputs += failed(work)
            return []
        if chunk is not None and chunk.prefilled >= len(chunk.prompt):
            self._chunking = None
        self.mixed_steps += 1
        try:
            outputs += self._emit(batch, *batch.sample(decoded))
        except Exception:  # sampling failed (a grammar matcher, say): this batch's rows end
            log.exception("sampling failed for %s", refs(batch.seqs))
            if batch in self._batches:
                self._batches.remove(batch)
            outputs += failed(batch.seqs)
        return done

    def _prefill_apart(
        self, group: list[Sequence], rests: list[Sequence], chunk_tokens: int, outputs: list[StepOutput]
    ) -> list[tuple[DecodeBatch, torch.Tensor]]:
        admitted: list[tuple[DecodeBatch, torch.Tensor]] = []
        if group:
            try:
                admitted.append(DecodeBatch.prefill(self.model, group))
            except Exception:
                log.exception("prefill failed for %s", refs(group))
                outputs += failed(group)
        for seq in rests:
            admitted += self._prefill_rest(seq, outputs)
        if self._chunking is not None:
            admitted += self._continue_chunking(chunk_tokens, outputs)
        return admitted

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
            elif len(seq.generated) >= params.max_new_tokens or seq.length >= self.model.max_context:
                reason = FinishReason.LENGTH
            else:
                reason = FinishReason.NONE
                keep.append(i)
            if reason is not FinishReason.NONE and self.prefix_cache is not None and batch.joinable:
                self.prefix_cache.store(seq.model_path, *batch.row_kv(i))
            first = len(seq.generated) == 1  # cached tokens and queue time are said once, first
            frame = TokenFrame(
                seq.key[1],
                (token,),
                reason,
                None,
                None if lp is None else (lp,),
                cached_tokens=seq.cached_tokens if first else 0,
                queue_s=seq.queued_s if first else 0.0,
                # A prompt with images (a cache key of its own) is longer than the worker's ids.
                prompt_tokens=len(seq.prompt) if first and seq.cache_key is not None else 0,
                mid_stream=not first and reason is FinishReason.NONE,
            )
            outputs.append(StepOutput(seq.key[0], frame))
        self._shrink(batch, keep)
        return outputs

    # -- admission -------------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, queue: WaitingQueue, budget_tokens: int, room: int) -> list[StepOutput]:
        """Start what fits this step, oldest first. New prompts are prefilled together, left-padded
        (their padded size is what they cost); a prompt whose start is in the prefix cache is
        prefilled on its own, from there; a prompt over the budget is chunked across steps.

        A request that does not fit this step (a prompt over what is left, one that would pad the
        group, a second long prompt while one is chunked) lets younger ones past, at most
        ``MAX_PASSED_OVER`` times. A chunked prompt keeps at least half of each step's budget, and
        prompts behind it take the rest: a long first turn no longer holds back every short
        request (a cached next turn, a chat line) for all of its chunks."""
        outputs: list[StepOutput] = []
        group: list[Sequence] = []  # new prompts, prefilled together
        rests: list[Sequence] = []  # prompts whose start is in the prefix cache: the rest of each
        width = 0  # the group's longest prompt: the group is prefilled padded to it
        spent = 0  # budget taken by prompts other than the chunked one
        chunk_share = max(1, budget_tokens // 2)
        cap = budget_tokens - chunk_share if self._chunking is not None else budget_tokens
        started = 0  # batch slots taken this step
        for pending in queue.window(self.path, ADMIT_WINDOW):
            if room <= started and not counting(pending):
                break
            seq = self._prepare(pending)
            if seq is None:  # still being prepared (its images): it starts at a later step
                continue
            if counting(pending) and isinstance(seq, Sequence):  # its length is all it asks
                queue.remove(pending)
                outputs += count_frames(pending.key, seq.prompt)
                continue
            if isinstance(seq, str):  # refused: the error frame says why
                queue.remove(pending)
                kind = (
                    ErrorKind.CONTEXT_LENGTH_EXCEEDED
                    if isinstance(seq, ContextExceeded)
                    else ErrorKind.INVALID_REQUEST
                )
                outputs.append(error_output(pending.key, kind, seq))
                continue
            found = self._prefix_match(seq)
            reused = found[0] if found is not None else 0
            extra = self._extra_cost(seq, reused)  # not padded: an image encoder's own pass
            todo = len(seq.prompt) - reused + extra
            if todo > budget_tokens:  # only in chunks, one such prompt at a time
                if self._chunking is None and spent <= budget_tokens - chunk_share:
                    self._use_prefix(seq, found)
                    self._chunking = self._take(queue, pending, seq)
                    cap, started = budget_tokens - chunk_share, started + 1
                    continue
            else:
                padded = (len(group) + 1) * max(width, todo - extra) - len(group) * width + extra
                cost = todo if reused else padded
                if spent + cost <= cap:
                    spent, started = spent + cost, started + 1
                    self._use_prefix(seq, found)
                    if reused:
                        rests.append(self._take(queue, pending, seq))
                    else:
                        group.append(self._take(queue, pending, seq))
                        width = max(width, todo - extra)
                    continue
            pending.passed_over += 1
            if pending.passed_over > MAX_PASSED_OVER:
                break  # nothing younger may start before it any more
        admitted = self._prefill(group, rests, budget_tokens - spent, outputs)
        if admitted:  # the running rows take this step's token before new rows join them
            outputs += self.end_step()
        return self._join(admitted, outputs)

    def _join(
        self, admitted: list[tuple[DecodeBatch, torch.Tensor]], outputs: list[StepOutput]
    ) -> list[StepOutput]:
        """The first token of each newly prefilled request; then its batch joins a running one."""
        for batch, logits in admitted:
            outputs += prompt_frames(batch)
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

    def _prepare(self, pending: Pending) -> Sequence | str | None:
        """The head's sequence, made once while it waits; or why this model cannot serve it; or
        None while it is not ready yet."""
        if isinstance(pending.prepared, Sequence):
            return pending.prepared
        seq = self._sequence(pending)
        if seq is None or isinstance(seq, str):
            return seq
        if counting(pending):  # nothing will run: only the length is asked, whatever it is
            return seq
        if len(seq.prompt) >= self.model.max_context:
            return self._over_context(len(seq.prompt), images=seq.cache_key is not None)
        vocab = self.model.vocab_size
        if not all(0 <= t < vocab for t in seq.prompt):
            return f"the prompt has token ids outside the model's vocabulary [0, {vocab})"
        if seq.params.grammar:
            try:
                seq.matcher = self.model.matcher(seq.params.grammar, seq.params.stop_token_ids)
            except Exception as exc:  # a grammar the decoder cannot build: this request's error
                log.warning("grammar of %s rejected: %s", request_ref(*seq.key), exc)
                return "the output format cannot be enforced"
        pending.prepared = seq
        return seq

    def _over_context(self, prompt_tokens: int, images: bool) -> ContextExceeded:
        return over_context(self.model.max_context, prompt_tokens, images)

    def _sequence(self, pending: Pending) -> Sequence | str | None:
        """The request's sequence, before the checks every prompt passes."""
        payload = pending.request.payload
        assert isinstance(payload, Generate)
        if payload.images:
            return "this model takes no images"
        return Sequence(pending.key, self.path, list(payload.prompt_token_ids), payload.sampling)

    def _extra_cost(self, seq: Sequence, start: int) -> int:
        """Work of admitting ``seq`` from prompt position ``start`` besides its prompt tokens, in
        tokens of the prefill budget."""
        return 0

    @staticmethod
    def _take(queue: WaitingQueue, pending: Pending, seq: Sequence) -> Sequence:
        queue.remove(pending)
        seq.queued_s = time.monotonic() - pending.arrived_s
        queue.account(len(seq.prompt), seq.cached_tokens)
        return seq

    def _prefix_match(self, seq: Sequence) -> tuple[int, Layers] | None:
        """The longest prefix of ``seq``'s prompt in the prefix cache (views of the entry, nothing
        copied while the request may still wait). Prompt logprobs need every position's logits: no
        reuse."""
        if self.prefix_cache is None or seq.wants_prompt_logprobs:
            return None
        return self.prefix_cache.match(seq.model_path, seq.prompt_key)

    @staticmethod
    def _use_prefix(seq: Sequence, found: tuple[int, Layers] | None) -> None:
        """Start ``seq`` from a prefix found in the cache: the entry's KV is copied for it."""
        if found is not None:
            from transformers.cache_utils import DynamicCache

            seq.prefilled, layers = found
            seq.cached_tokens = seq.prefilled
            seq.prefill_cache = DynamicCache(ddp_cache_data=layers)  # copies: the entry stays intact

    def _prefill_rest(
        self, seq: Sequence, outputs: list[StepOutput]
    ) -> list[tuple[DecodeBatch, torch.Tensor]]:
        try:
            done = DecodeBatch.prefill_chunk(self.model, seq, len(seq.prompt) - seq.prefilled)
        except Exception:
            log.exception("prefill after a cached prefix failed for %s", request_ref(*seq.key))
            outputs += failed([seq])
            return []
        assert done is not None  # the whole rest fits this step
        return [done]

    def _continue_chunking(
        self, budget_tokens: int, outputs: list[StepOutput]
    ) -> list[tuple[DecodeBatch, torch.Tensor]]:
        seq = self._chunking
        assert seq is not None
        try:
            done = DecodeBatch.prefill_chunk(self.model, seq, budget_tokens)
        except Exception:
            log.exception("chunked prefill failed for %s", request_ref(*seq.key))
            self._chunking = None
            outputs += failed([seq])
            return []
        if done is None:
            return []
        self._chunking = None
        return [done]

    def _end_empty_requests(
        self, batch: DecodeBatch, logits: torch.Tensor, outputs: list[StepOutput]
    ) -> torch.Tensor:
        """``max_tokens: 0`` (a prompt scored, nothing generated) ends right after its prefill."""
        keep = [i for i, s in enumerate(batch.seqs) if s.params.max_new_tokens > 0]
        if len(keep) == len(batch):
            return logits
        for seq in batch.seqs:
            if seq.params.max_new_tokens <= 0:
                frame = TokenFrame(
                    seq.key[1],
                    (),
                    FinishReason.LENGTH,
                    cached_tokens=seq.cached_tokens,
                    prompt_tokens=len(seq.prompt) if seq.cache_key is not None else 0,
                )
                outputs.append(StepOutput(seq.key[0], frame))
        self._shrink(batch, keep)
        return logits[keep]

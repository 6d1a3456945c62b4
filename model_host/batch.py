"""A running batch: sequences of one model sharing one left-padded KV cache.

Modelled on TGI's Python server: a batch is built by a (batched) prefill, advanced one token per
step by a single forward pass, shrunk with :meth:`DecodeBatch.filter` when sequences finish, and
grown with :meth:`DecodeBatch.concatenate` when newly prefilled sequences join. Rows are
left-padded: ``attention_mask`` marks real tokens, ``lengths`` counts them, and each row's next
position is its own length, so padding changes no row's positions.

Only caches made entirely of plain ``DynamicLayer`` tensors can be padded and joined; any other
cache (sliding windows, recurrent state) keeps one sequence per batch, which still runs every
sequence each step, just without sharing a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from model_host.ipc.messages import TokenLogprob
from model_host.kv_layer import GrowableLayer
from model_host.sampling import SamplingBatch, score_tokens


@dataclass
class Sequence:
    """One request inside the host."""

    key: tuple[int, int]  # (worker index, request id)
    model_path: str
    prompt: list[int]
    params: Any  # SamplingParams
    generated: list[int] = field(default_factory=list)
    # Chunked prefill of a long prompt: the cache so far and how many prompt tokens it holds.
    prefill_cache: Any = None
    prefilled: int = 0
    matcher: Any = None  # llguidance matcher when the output must follow a grammar
    # Prompt logprobs (when asked for): one per prompt token after the first, filled by prefill;
    # a chunked prefill keeps the logits of its last position, which predict the next chunk.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    chunk_tail_logits: torch.Tensor | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    queued_s: float = 0.0  # how long it waited in the queue before its prefill began
    # A vision-language model's request (model_host.vision_lm): its images until the prompt is
    # prefilled; how far its text positions run past the prompt's length (multimodal rotary
    # positions, Qwen2-VL's rope_deltas), kept per row so rows with and without images share a
    # batch; and the prefix cache's key for the prompt, in which image tokens stand for the image.
    images: Any = None
    rope_delta: int = 0
    cache_key: list[int] | None = None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return bool(self.params.prompt_logprobs >= 0)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def prompt_key(self) -> list[int]:
        """The prompt as the prefix cache knows it."""
        return self.prompt if self.cache_key is None else self.cache_key


def _joinable(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) in (DynamicLayer, GrowableLayer) for layer in layers)


def _score_prompt(seq: Sequence, logits: torch.Tensor, first: int) -> None:
    """Score prompt tokens ``first`` onwards with ``logits`` (one row per token)."""
    targets = torch.tensor(seq.prompt[first : first + logits.shape[0]], device=logits.device)
    seq.prompt_logprobs += score_tokens(logits, targets, seq.params.prompt_logprobs)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


class DecodeBatch:
    def __init__(
        self,
        model: Any,
        seqs: list[Sequence],
        cache: Any,
        attention_mask: torch.Tensor,
        sampling: SamplingBatch,
    ) -> None:
        self.model = model  # LoadedModel
        self.seqs = seqs
        self.cache = cache
        self.attention_mask = attention_mask  # [B, T] long, T = cache length
        self.lengths = attention_mask.sum(dim=-1)  # [B] real tokens per row
        self.sampling = sampling
        self.joinable = _joinable(cache)
        if self.joinable:  # decode steps write their KV in place instead of copying the cache
            cache.layers[:] = [GrowableLayer.adopt(layer) for layer in cache.layers]

    def __len__(self) -> int:
        return len(self.seqs)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def prefill(cls, model: Any, seqs: list[Sequence]) -> tuple[DecodeBatch, torch.Tensor]:
        """Run the prompts of ``seqs`` together; returns the batch and last-position logits."""
        device = model.device
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt) :] = torch.tensor(s.prompt, device=device)
            mask[i, width - len(s.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        scoring = any(s.wants_prompt_logprobs for s in seqs)
        ids_in, embeds, positions = model.prompt_inputs(seqs, ids, positions)
        logits, cache = model.forward(ids_in, mask, positions, None, all_logits=scoring, inputs_embeds=embeds)
        if scoring:
            for i, s in enumerate(seqs):
                if s.wants_prompt_logprobs:  # position j predicts prompt token j + 1
                    _score_prompt(s, logits[i, width - len(s.prompt) : -1], 1)
            logits = logits[:, -1]
        sampling = SamplingBatch.build(
            [s.params for s in seqs],
            [s.prompt for s in seqs],
            logits.shape[-1],
            device,
            [s.matcher for s in seqs],
        )
        return cls(model, seqs, cache, mask, sampling), logits

    @classmethod
    def prefill_chunk(
        cls, model: Any, seq: Sequence, chunk_tokens: int
    ) -> tuple[DecodeBatch, torch.Tensor] | None:
        """Advance a long prompt by one chunk; returns the batch once the whole prompt is in. A
        prompt whose start was found in the prefix cache begins with that cache, part-prefilled."""
        start = seq.prefilled
        end = min(len(seq.prompt), start + chunk_tokens)
        ids = torch.tensor([seq.prompt[start:end]], device=model.device)
        positions = torch.arange(start, end, device=model.device)[None, :]
        scoring = seq.wants_prompt_logprobs
        ids_in, embeds, positions = model.prompt_inputs([seq], ids, positions, start)
        logits, seq.prefill_cache = model.forward(ids_in, None, positions, seq.prefill_cache, scoring, embeds)
        seq.prefilled = end
        if scoring:
            rows = logits[0, :-1]
            if seq.chunk_tail_logits is not None:  # the last chunk's end predicts this one's start
                rows = torch.cat([seq.chunk_tail_logits[None], rows])
            _score_prompt(seq, rows, start if start else 1)
            seq.chunk_tail_logits = logits[0, -1] if end < len(seq.prompt) else None
            logits = logits[:, -1]
        if end < len(seq.prompt):
            return None
        mask = torch.ones((1, end), dtype=torch.long, device=model.device)
        sampling = SamplingBatch.build(
            [seq.params], [seq.prompt], logits.shape[-1], model.device, [seq.matcher]
        )
        cache, seq.prefill_cache = seq.prefill_cache, None
        return cls(model, [seq], cache, mask, sampling), logits

    # -- stepping --------------------------------------------------------------------------------
    def decode(self) -> torch.Tensor:
        """One forward pass for every row's last token; returns [B, V] logits."""
        device = self.model.device
        last = torch.tensor([[s.generated[-1]] for s in self.seqs], device=device)
        ones = torch.ones((len(self.seqs), 1), dtype=torch.long, device=device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        positions = self.model.decode_positions(self.seqs, self.lengths[:, None])
        logits, self.cache = self.model.forward(last, self.attention_mask, positions, self.cache)
        self.lengths = self.lengths + 1
        self.model.decoded(len(self.seqs))
        return logits

    def sample(self, logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row, and its logprobs for the rows that asked for them."""
        tokens = self.sampling.sample(logits)
        logprobs = self.sampling.logprobs(logits, tokens)
        self.sampling.record(tokens)
        out: list[int] = tokens.tolist()
        for seq, token in zip(self.seqs, out, strict=True):
            seq.generated.append(token)
        return out, logprobs

    # -- joining and leaving ---------------------------------------------------------------------
    def filter(self, keep: list[int]) -> None:
        """Keep only the rows in ``keep`` and drop padding columns no remaining row needs. Each
        row that leaves from among the first ``len(keep)`` is replaced by a kept row from beyond
        them, so only the rows that move are copied (rows change order)."""
        if len(keep) == len(self.seqs):
            return
        if not keep:  # everyone left: drop the cache now rather than when the batch is collected
            self.seqs, self.cache = [], None
            return
        rows = len(keep)
        kept = set(keep)
        holes = [i for i in range(rows) if i not in kept]
        moves = list(zip([i for i in keep if i >= rows], holes, strict=True))  # (from, to)
        order = list(range(rows))
        for src, dst in moves:
            order[dst] = src
        idx = torch.tensor(order, dtype=torch.long, device=self.attention_mask.device)
        self.seqs = [self.seqs[i] for i in order]
        self.attention_mask = self.attention_mask.index_select(0, idx)
        self.lengths = self.lengths.index_select(0, idx)
        self.sampling.filter(order)
        if not self.joinable:
            self.cache.batch_select_indices(idx)
            return
        lead = int(self.attention_mask.shape[1] - self.lengths.max())
        for layer in self.cache.layers:
            if isinstance(layer, GrowableLayer) and layer.compact(moves, rows, lead):
                continue
            # Padding columns cut before the copy, not after; a model placed across devices
            # (--device-map) keeps each layer's KV on that layer's device.
            at = idx.to(layer.keys.device)
            layer.keys = layer.keys[:, :, lead:].index_select(0, at)
            layer.values = layer.values[:, :, lead:].index_select(0, at)
        self.attention_mask = self.attention_mask[:, lead:]

    def row_kv(self, i: int) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Row ``i``'s tokens that are in the cache (all but the last sampled one) and their KV,
        copied out of the batch (a view would keep the whole batch's tensors alive)."""
        seq, n = self.seqs[i], int(self.lengths[i])
        layers = [
            (layer.keys[i : i + 1, :, -n:].clone(), layer.values[i : i + 1, :, -n:].clone())
            for layer in self.cache.layers
        ]
        return (seq.prompt_key + seq.generated)[:n], layers

    def can_join(self, other: DecodeBatch) -> bool:
        return self.joinable and other.joinable and self.model is other.model

    def concatenate(self, other: DecodeBatch) -> None:
        """Append ``other``'s rows, left-padding whichever side has the shorter cache."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        self.attention_mask = torch.cat(
            [_pad_left(self.attention_mask, width, 1), _pad_left(other.attention_mask, width, 1)]
        )
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if isinstance(mine, GrowableLayer):  # straight into a buffer the next steps write into
                mine.join(theirs.keys, theirs.values, width)
                continue
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.seqs += other.seqs
        self.sampling.concatenate(other.sampling)

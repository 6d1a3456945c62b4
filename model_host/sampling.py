"""Next-token selection for a batch whose rows each have their own settings.

Everything is a tensor op over the whole batch (logit bias, repetition/presence/frequency penalties,
temperature, top-k, top-p, min-p). The only per-row Python work is drawing noise for seeded rows:
each seeded row has its own ``torch.Generator``, so a seed gives the same text whatever else shares
the batch. Sampling uses the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``), which draws
exactly from ``p`` and lets seeded and unseeded rows share one vectorised selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_host.ipc.messages import SamplingParams, TokenLogprob


def _optional_cat(
    a: torch.Tensor | None, rows_a: int, b: torch.Tensor | None, rows_b: int, fill: float
) -> torch.Tensor | None:
    """Concatenate per-row [rows, vocab] tables where either side may not have one yet."""
    if a is None and b is None:
        return None
    ref = a if a is not None else b
    assert ref is not None
    if a is None:
        a = torch.full((rows_a, ref.shape[1]), fill, dtype=ref.dtype, device=ref.device)
    if b is None:
        b = torch.full((rows_b, ref.shape[1]), fill, dtype=ref.dtype, device=ref.device)
    return torch.cat([a, b])


@dataclass
class SamplingBatch:
    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    temperature: torch.Tensor  # [B] float; 0 means greedy
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long; 0 means off
    min_p: torch.Tensor  # [B] float
    presence: torch.Tensor  # [B] float
    frequency: torch.Tensor  # [B] float
    repetition: torch.Tensor  # [B] float; 1 means off
    counts: torch.Tensor | None  # [B, V] generated-token counts, only if a row has a penalty
    seen: torch.Tensor | None  # [B, V] prompt or generated, only if a row has repetition penalty
    bias: torch.Tensor | None  # [B, V] additive logit bias, only if a row has one
    matchers: list[Any]  # per row: an llguidance matcher (structured output) or None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        matchers: Sequence[Any] | None = None,
    ) -> SamplingBatch:
        def col(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        rows = len(params)
        counts = seen = bias = None
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = torch.zeros((rows, vocab_size), dtype=torch.int32, device=device)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros((rows, vocab_size), dtype=torch.bool, device=device)
            for i, prompt in enumerate(prompts):
                ids = torch.tensor(
                    [t for t in prompt if 0 <= t < vocab_size], dtype=torch.long, device=device
                )
                seen[i, ids] = True
        if any(p.logit_bias for p in params):
            bias = torch.zeros((rows, vocab_size), dtype=torch.float32, device=device)
            for i, p in enumerate(params):
                for token, value in p.logit_bias:
                    if 0 <= token < vocab_size:
                        bias[i, token] = value
        generators: list[torch.Generator | None] = []
        for p in params:
            gen = None
            if p.seed is not None and p.temperature > 0:
                gen = torch.Generator(device=device)
                gen.manual_seed(p.seed)
            generators.append(gen)
        return cls(
            params=list(params),
            generators=generators,
            temperature=col([p.temperature for p in params]),
            top_p=col([p.top_p for p in params]),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            min_p=col([p.min_p for p in params]),
            presence=col([p.presence_penalty for p in params]),
            frequency=col([p.frequency_penalty for p in params]),
            repetition=col([p.repetition_penalty for p in params]),
            counts=counts,
            seen=seen,
            bias=bias,
            matchers=list(matchers) if matchers is not None else [None] * len(params),
        )

    # -- joining and leaving (mirrors the KV cache's filter/concatenate) -------------------------
    def filter(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.temperature.device)
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.matchers = [self.matchers[i] for i in keep]
        for name in ("temperature", "top_p", "top_k", "min_p", "presence", "frequency", "repetition"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        for name in ("counts", "seen", "bias"):
            table = getattr(self, name)
            if table is not None:
                setattr(self, name, table.index_select(0, idx))

    def concatenate(self, other: SamplingBatch) -> None:
        rows_a, rows_b = len(self.params), len(other.params)
        self.params += other.params
        self.generators += other.generators
        self.matchers += other.matchers
        for name in ("temperature", "top_p", "top_k", "min_p", "presence", "frequency", "repetition"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.counts = _optional_cat(self.counts, rows_a, other.counts, rows_b, 0)
        self.seen = _optional_cat(self.seen, rows_a, other.seen, rows_b, False)
        self.bias = _optional_cat(self.bias, rows_a, other.bias, rows_b, 0.0)

    # -- the step --------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of ``logits`` ([B, V]); returns a [B] long tensor."""
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if any(m is not None for m in self.matchers):
            logits = self._constrain(logits)
        if self.seen is not None:
            rep = self.repetition[:, None]
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            counts = self.counts.float()
            logits = logits - self.frequency[:, None] * counts
            logits = logits - self.presence[:, None] * (counts > 0).float()
        greedy = logits.argmax(dim=-1)
        if not bool((self.temperature > 0).any()):
            return greedy
        temps = torch.where(self.temperature > 0, self.temperature, 1.0)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        probs = self._truncate(probs)
        noise = torch.empty_like(probs).exponential_()
        for i, gen in enumerate(self.generators):
            if gen is not None:
                noise[i] = torch.empty_like(probs[i]).exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(self.temperature > 0, sampled, greedy)

    def _constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask, per constrained row, every token its grammar does not allow next."""
        import llguidance.torch as llg

        logits = logits.clone()
        mask = llg.allocate_token_bitmask(1, logits.shape[-1])
        for i, matcher in enumerate(self.matchers):
            if matcher is not None:
                llg.fill_next_token_bitmask(matcher, mask, 0)
                llg.apply_token_bitmask_inplace(logits[i : i + 1], mask.to(logits.device))
        return logits

    def _truncate(self, probs: torch.Tensor) -> torch.Tensor:
        if bool((self.min_p > 0).any()):
            floor = self.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        if not bool((self.top_k > 0).any() or (self.top_p < 1).any()):
            return probs
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        k = torch.where(self.top_k > 0, self.top_k, probs.shape[-1])[:, None]
        drop = ranks >= k
        # top-p: keep a token while the mass before it is below top_p (the top token always stays)
        cumulative = sorted_probs.cumsum(dim=-1)
        drop |= (cumulative - sorted_probs) >= self.top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return torch.zeros_like(probs).scatter(-1, order, sorted_probs)

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        """Log probabilities under the model's own distribution (before temperature, penalties and
        truncation, as vLLM reports them by default), for the rows that asked."""
        wanted = [p.logprobs for p in self.params]
        if max(wanted) < 0:
            return [None] * len(wanted)
        scored = score_tokens(logits, tokens, max(wanted))
        return [
            None if want < 0 else TokenLogprob(lp.logprob, lp.top[:want])
            for lp, want in zip(scored, wanted, strict=True)
        ]

    def record(self, tokens: torch.Tensor) -> None:
        """Account for the tokens just sampled (penalties see them from the next step on)."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        for matcher, token in zip(self.matchers, tokens.tolist(), strict=True):
            if matcher is not None:
                matcher.consume_token(token)
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True


def score_tokens(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each row's log probability of its token under ``logits`` ([N, V]), and the row's ``k``
    most likely tokens, best first."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    top_values, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
    values, ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(c, tuple(zip(i, v, strict=True))) for c, i, v in zip(chosen, ids, values, strict=True)
    ]

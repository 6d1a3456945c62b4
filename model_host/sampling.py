"""Next-token selection for a batch of rows, each with its own settings.

Temperature and top-p are applied as tensor ops over the whole batch. Seeded rows draw from their own
``torch.Generator`` so a seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_host.ipc.messages import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Pick one token per row of ``logits`` (shape ``[batch, vocab]``)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:
        return greedy.tolist()
    rows = torch.tensor(sampled_rows, device=logits.device)
    sub = logits.index_select(0, rows)
    temps = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=logits.device)
    probs = torch.softmax(sub / temps[:, None], dim=-1)
    probs = _top_p_filter(probs, top_p)
    picks = greedy.clone()
    # Unseeded rows share the global generator in one call; seeded rows draw alone from their own.
    unseeded = [j for j, i in enumerate(sampled_rows) if generators[i] is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=logits.device)
        drawn = torch.multinomial(probs.index_select(0, idx), 1).squeeze(-1)
        picks[rows[idx]] = drawn
    for j, i in enumerate(sampled_rows):
        gen = generators[i]
        if gen is not None:
            picks[i] = torch.multinomial(probs[j : j + 1], 1, generator=gen).squeeze()
    return picks.tolist()


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    if bool((top_p >= 1.0).all()):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    # Keep a token while the mass before it is below top_p: the top token always survives.
    drop = (cumulative - sorted_probs) >= top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)

"""Per-row sampling settings inside one batch."""

from __future__ import annotations

import torch

from model_host.ipc.messages import SamplingParams
from model_host.sampling import SamplingBatch

V = 8
CPU = torch.device("cpu")


def batch(*params: SamplingParams, prompts: list[list[int]] | None = None) -> SamplingBatch:
    return SamplingBatch.build(list(params), prompts or [[] for _ in params], V, CPU)


def logits_rows(n: int) -> torch.Tensor:
    return torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]] * n)


def test_greedy_and_logit_bias_per_row() -> None:
    b = batch(
        SamplingParams(10, temperature=0),
        SamplingParams(10, temperature=0, logit_bias=((7, -100.0),)),
        SamplingParams(10, temperature=0, logit_bias=((0, 100.0),)),
    )
    assert b.sample(logits_rows(3)).tolist() == [7, 6, 0]


def test_penalties_only_touch_their_rows() -> None:
    b = batch(
        SamplingParams(10, temperature=0),
        SamplingParams(10, temperature=0, presence_penalty=2.0),
        SamplingParams(10, temperature=0, frequency_penalty=0.6),
        SamplingParams(10, temperature=0, repetition_penalty=10.0),
        prompts=[[], [], [], [7]],
    )
    first = b.sample(logits_rows(4))
    # The repetition penalty sees the prompt: token 7 is divided by 10 at once.
    assert first.tolist() == [7, 7, 7, 6]
    b.record(first)
    second = b.sample(logits_rows(4))
    # presence 2.0: 7 → 5.0 loses to 6; frequency 0.6: 7 → 6.4 still wins once;
    # repetition: 6 (now seen) → 0.6, so 5 wins.
    assert second.tolist() == [7, 6, 7, 5]
    b.record(second)
    # presence: 7 → 5.0 and 6 → 4.0 tie 7 with 5 (argmax takes the first); frequency: 7 → 5.8 < 6.
    assert b.sample(logits_rows(4)).tolist() == [7, 5, 6, 4]


def test_top_k_and_min_p_restrict_choices() -> None:
    flat = torch.zeros((2, V))
    flat[:, 3] = 5.0
    flat[:, 4] = 4.9
    b = batch(SamplingParams(10, temperature=1.0, top_k=2), SamplingParams(10, temperature=1.0, min_p=0.5))
    seen: list[set[int]] = [set(), set()]
    for _ in range(200):
        for row, token in enumerate(b.sample(flat).tolist()):
            seen[row].add(token)
    assert seen == [{3, 4}, {3, 4}]


def test_seeded_rows_do_not_depend_on_batch_mates() -> None:
    logits = torch.randn(1, V).repeat(4, 1)
    alone = batch(SamplingParams(10, temperature=1.0, seed=5))
    draws_alone = [alone.sample(logits[:1]).item() for _ in range(20)]
    mixed = batch(
        SamplingParams(10, temperature=1.0),
        SamplingParams(10, temperature=1.0, seed=5),
        SamplingParams(10, temperature=0),
        SamplingParams(10, temperature=1.0, seed=6),
    )
    draws_mixed = [mixed.sample(logits)[1].item() for _ in range(20)]
    assert draws_alone == draws_mixed
    other = batch(SamplingParams(10, temperature=1.0, seed=6))
    assert [other.sample(logits[:1]).item() for _ in range(20)] != draws_alone


def test_filter_and_concatenate_keep_rows_aligned() -> None:
    a = batch(SamplingParams(10, temperature=0), SamplingParams(10, temperature=0, logit_bias=((7, -100.0),)))
    b = batch(SamplingParams(10, temperature=0, presence_penalty=2.0))
    a.concatenate(b)
    assert a.sample(logits_rows(3)).tolist() == [7, 6, 7]
    a.filter([1, 2])
    assert len(a.params) == 2
    assert a.sample(logits_rows(2)).tolist() == [6, 7]


def _kept_by_sorting(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens a full sort keeps (the definition the sampler's floor must match)."""
    probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    values, order = probs.sort(descending=True)
    before = values.cumsum(0) - values
    keep = before < top_p
    if top_k:
        keep[top_k:] = False
    keep[0] = True
    return {int(t) for t, v, k in zip(order, values, keep, strict=True) if k and v > 0}


def test_truncation_keeps_what_a_full_sort_keeps() -> None:
    torch.manual_seed(0)
    vocab = 3000  # more than the candidates first looked at, and not a multiple of a block
    settings = [  # (top_k, top_p, min_p)
        (0, 0.9, 0.0), (40, 1.0, 0.0), (40, 0.5, 0.0), (0, 0.999, 0.0), (0, 1.0, 0.05), (7, 0.3, 0.01)
    ]  # fmt: skip
    for scale in (0.5, 3.0):  # flat rows need thousands of candidates for top-p, peaked ones few
        logits = torch.randn(len(settings), vocab) * scale
        params = [SamplingParams(10, temperature=1.0, top_k=k, top_p=p, min_p=m) for k, p, m in settings]
        b = SamplingBatch.build(params, [[]] * len(params), vocab, CPU)
        probs = torch.softmax(logits, dim=-1)
        weights = (logits - logits.max(dim=-1, keepdim=True).values).exp()  # what sample() gives it
        floor = b._floor(weights)
        assert floor is not None
        for row, (k, p, m) in enumerate(settings):
            kept = {int(t) for t in (weights[row] >= floor[row]).nonzero()[:, 0]}
            assert kept == _kept_by_sorting(probs[row], k, p, m), (scale, k, p, m)
            drawn = {int(b.sample(logits)[row]) for _ in range(30)}
            assert drawn <= kept


def test_draws_follow_the_distribution() -> None:
    """Frequencies of 200,000 draws against the probabilities (a vocabulary of several blocks,
    some tokens dropped by top-k): total variation within what sampling noise allows."""
    torch.manual_seed(1)
    vocab, rows, rounds = 1000, 2000, 100
    logits = torch.randn(1, vocab) * 2
    b = SamplingBatch.build([SamplingParams(10, temperature=0.8, top_k=600)] * rows, [[]] * rows, vocab, CPU)
    wide = logits.expand(rows, -1).contiguous()
    tokens = torch.cat([b.sample(wide) for _ in range(rounds)])
    draws = rows * rounds
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    probs[probs < probs.topk(600).values[-1]] = 0
    probs /= probs.sum()
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    assert float(freq[probs == 0].sum()) == 0.0
    # Sampling noise alone gives a total variation of ~0.02 here; a misplaced block or an
    # off-by-one interval gives several times that.
    assert 0.5 * float((freq - probs.double()).abs().sum()) < 0.035


def test_seeded_draws_do_not_depend_on_batch_mates_truncation() -> None:
    """A seeded row draws the same tokens whether its batch mates need many candidates, few,
    or none (the candidate count is the batch's, the draw is the row's)."""
    torch.manual_seed(2)
    vocab = 2000
    logits = torch.randn(1, vocab)
    seeded = SamplingParams(10, temperature=1.0, top_p=0.95, seed=11)

    def draws(*mates: SamplingParams) -> list[int]:
        b = SamplingBatch.build([seeded, *mates], [[]] * (1 + len(mates)), vocab, CPU)
        return [int(b.sample(logits.expand(1 + len(mates), -1))[0]) for _ in range(30)]

    alone = draws()
    assert draws(SamplingParams(10, temperature=1.0)) == alone
    assert draws(SamplingParams(10, temperature=1.0, top_k=1500)) == alone
    assert draws(SamplingParams(10, temperature=1.0, top_p=0.2), SamplingParams(10, temperature=0)) == alone
    assert len(set(alone)) > 5  # it did sample

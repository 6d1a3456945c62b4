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
    seen: set[int] = set()
    for _ in range(200):
        seen.update(b.sample(flat).tolist())
    assert seen == {3, 4}


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

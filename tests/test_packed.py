"""Mixed steps (model_host/packed.py): one forward for a batch's decode and new prompts' prefill.

The engine-level fidelity (greedy tokens equal a lone ``generate()`` with mixed steps in play) is in
``test_host_units.py`` and, end to end, ``test_batching.py``; here the packed forward itself, and the
load-time check that turns it off for a model it does not fit."""

from __future__ import annotations

from pathlib import Path

import torch

from model_host.batch import DecodeBatch, Sequence
from model_host.causal_lm import CausalLM
from model_host.ipc.messages import SamplingParams
from model_host.packed import packed_step, packing_works
from model_host.registry import ModelRegistry
from model_host.runners.causal import CausalRunner

_GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=())


def _seqs(path: str, prompts: list[list[int]], first: int) -> list[Sequence]:
    return [Sequence((0, first + i), path, list(p), _GREEDY) for i, p in enumerate(prompts)]


def test_a_packed_step_gives_the_separate_forwards_logits_and_cache(demo_model: Path) -> None:
    registry = ModelRegistry("cpu", "float32", False)
    runner = registry.get(str(demo_model))
    assert isinstance(runner, CausalRunner) and runner._packs
    model, path = runner.model, str(demo_model)
    gen = torch.Generator().manual_seed(1)
    running = [torch.randint(3, 700, (n,), generator=gen).tolist() for n in (2, 17, 6, 9)]
    arriving = [torch.randint(3, 700, (n,), generator=gen).tolist() for n in (1, 23, 8)]
    chunked = [torch.randint(3, 700, (n,), generator=gen).tolist() for n in (30, 40)]
    results = []
    with torch.inference_mode():
        for packed in (False, True):
            batch, logits = DecodeBatch.prefill(model, _seqs(path, running, 0))
            batch.sample(logits)
            for _ in range(3):
                batch.sample(batch.decode())
            new = _seqs(path, arriving, 10)
            # Prompts with a cache of their own: one finishes its last chunk (19 of 30 tokens in),
            # one takes a middle chunk (9 of 40 in, 10 more) and is not whole yet.
            finishing, middle = _seqs(path, chunked, 20)
            DecodeBatch.prefill_chunk(model, finishing, 19)
            DecodeBatch.prefill_chunk(model, middle, 9)
            if packed:
                decoded, done = packed_step(batch, new, ((finishing, 11), (middle, 10)))
            else:
                decoded = batch.decode()
                done = [DecodeBatch.prefill(model, new), DecodeBatch.prefill_chunk(model, finishing, 11)]
                assert DecodeBatch.prefill_chunk(model, middle, 10) is None
            assert len(done) == 2 and middle.prefilled == 19
            batch.sample(decoded)
            for joining, first in done:
                joining.sample(first)
                batch.concatenate(joining)
            firsts = [first for _, first in done]
            rest_of_middle = DecodeBatch.prefill_chunk(model, middle, 21)  # its last chunk, apart
            assert rest_of_middle is not None
            joining, first = rest_of_middle
            firsts.append(first)
            joining.sample(first)
            batch.concatenate(joining)
            after = []  # the steps that read the cache the packed step wrote
            for _ in range(3):
                after.append(batch.decode())
                batch.sample(after[-1])
            results.append((decoded, *firsts, *after, [s.generated for s in batch.seqs]))
    for ref, got in zip(results[0][:-1], results[1][:-1], strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert results[0][-1] == results[1][-1]  # every row's greedy tokens, three steps on
    registry.unload(path)


def test_a_model_the_packed_row_does_not_fit_keeps_separate_forwards() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,  # every layer slides: its mask is not the packed one
    )
    model = Qwen2ForCausalLM(config).eval()
    loaded = CausalLM("sliding", model, torch.device("cpu"), max_context=64)
    assert not packing_works(loaded)


def test_continued_prompts_alone_ride_with_the_decode(demo_model: Path) -> None:
    """No new prompt this step, only a long prompt's chunks, the first starting with no cache."""
    registry = ModelRegistry("cpu", "float32", False)
    runner = registry.get(str(demo_model))
    assert isinstance(runner, CausalRunner)
    model, path = runner.model, str(demo_model)
    gen = torch.Generator().manual_seed(2)
    running = [torch.randint(3, 700, (n,), generator=gen).tolist() for n in (4, 7)]
    long_prompt = torch.randint(3, 700, (25,), generator=gen).tolist()
    results = []
    with torch.inference_mode():
        for packed in (False, True):
            batch, logits = DecodeBatch.prefill(model, _seqs(path, running, 0))
            batch.sample(logits)
            (seq,) = _seqs(path, [long_prompt], 5)
            steps = []
            for chunk in (10, 10, 5):
                if packed:
                    decoded, done = packed_step(batch, [], ((seq, chunk),))
                else:
                    decoded, whole = batch.decode(), DecodeBatch.prefill_chunk(model, seq, chunk)
                    done = [] if whole is None else [whole]
                batch.sample(decoded)
                steps.append(decoded)
            ((joining, first),) = done
            joining.sample(first)
            batch.concatenate(joining)
            results.append((*steps, first, batch.decode()))
    for ref, got in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    registry.unload(path)


def test_a_failed_mixed_step_fails_only_the_new_prompts(demo_model: Path) -> None:
    from model_host.engine import Engine
    from model_host.ipc.messages import ErrorKind, FinishReason
    from model_host.ipc.settings import HostSettings
    from tests.host_harness import Host, generate, prompt

    registry = ModelRegistry("cpu", "float32", False)
    demo = str(demo_model)
    runner = registry.get(demo)
    assert isinstance(runner, CausalRunner) and runner._packs
    host = Host(Engine(registry, HostSettings(device="cpu"), 256))
    host.add(0, demo, generate(prompt(6, 0), 6, stop=()))
    host.step()
    usual = runner.model.packed_forward

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("out of memory")

    runner.model.packed_forward = broken  # type: ignore[method-assign]
    host.add(1, demo, generate(prompt(5, 1), 3, stop=()))
    host.step()
    runner.model.packed_forward = usual  # type: ignore[method-assign]
    failed = host.last(1)
    assert failed.finish_reason is FinishReason.ERROR and failed.error is not None
    assert failed.error.kind is ErrorKind.GENERATION_FAILED
    host.add(2, demo, generate(prompt(5, 2), 3, stop=()))  # the next one packs again
    host.run()
    assert runner.mixed_steps >= 1
    alone = Host(Engine(registry, HostSettings(device="cpu"), 256))
    alone.add(0, demo, generate(prompt(6, 0), 6, stop=()))
    alone.run()
    assert host.tokens(0) == alone.tokens(0)  # the running request went on, token for token
    assert len(host.tokens(2)) == 3
    registry.unload(demo)

"""The model host's scheduler and runners, driven through :class:`model_host.engine.Engine` in this
process: no server, no pipes, no rings. Requests go in as the ``AddRequest`` messages a worker
sends; what comes out is the frames the host would publish, recorded step by step.

Greedy generation is compared token for token with a lone ``model.generate()`` of the same weights;
embedding vectors with :meth:`EmbeddingModel.encode` over the same rows. The codec and the IPC
package's import boundary are tested in ``test_host_codec.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from model_host.embedding import EmbeddingModel
from model_host.engine import Engine
from model_host.ipc.messages import Embed, ErrorKind, FinishReason, Generate, Payload, TokenFrame
from model_host.ipc.settings import HostSettings
from model_host.prefix_cache import PrefixCache
from model_host.registry import ModelRegistry
from model_host.runners.causal import MAX_PASSED_OVER, CausalRunner
from model_host.runners.embedding import EmbeddingRunner
from model_host.scheduler import LOAD_FAILED
from tests.host_harness import CLS, DEMO_STOP, MINILM, SEP, Host, encoded, generate, prompt, sentence, vectors


@pytest.fixture(scope="module")
def registry(demo_model: Path) -> Iterator[ModelRegistry]:
    registry = ModelRegistry("cpu", "float32", False)
    registry.get(str(demo_model))
    registry.get(MINILM)
    yield registry
    for path in registry.loaded():
        registry.unload(path)


HostFactory = Callable[..., Host]


@pytest.fixture()
def make_host(registry: ModelRegistry) -> Iterator[HostFactory]:
    def make(max_batch_size: int = 8, max_queue: int = 16, budget_tokens: int = 256) -> Host:
        settings = HostSettings(device="cpu", max_batch_size=max_batch_size, max_queue=max_queue)
        return Host(Engine(registry, settings, budget_tokens))

    yield make
    # The registry (and so the runners) is shared: nothing a test left running may reach the next.
    for runner in registry.runners():
        runner.drop_all()


@pytest.fixture(scope="module")
def demo(registry: ModelRegistry, demo_model: Path) -> str:
    return str(demo_model)


@pytest.fixture(scope="module")
def reference(registry: ModelRegistry, demo: str) -> Callable[..., list[int]]:
    """A lone greedy ``generate()`` on the same weights: with the model's end tokens (as the
    requests with ``DEMO_STOP``), or none (as requests with no stop tokens)."""
    runner = registry.get(demo)
    assert isinstance(runner, CausalRunner)
    model = runner.model.model
    done: dict[tuple[tuple[int, ...], int, bool], list[int]] = {}

    def run(ids: tuple[int, ...], max_new_tokens: int, stops: bool = True) -> list[int]:
        if (ids, max_new_tokens, stops) not in done:
            extra = {} if stops else {"eos_token_id": None}
            with torch.inference_mode():
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **extra
                )
            done[(ids, max_new_tokens, stops)] = out[0, len(ids) :].tolist()
        return done[(ids, max_new_tokens, stops)]

    return run


@pytest.fixture(scope="module")
def minilm(registry: ModelRegistry) -> EmbeddingModel:
    runner = registry.get(MINILM)
    assert isinstance(runner, EmbeddingRunner)
    return runner.model


# -- the scheduler -------------------------------------------------------------------------------


def test_requests_start_in_arrival_order(make_host: HostFactory, demo: str) -> None:
    host = make_host(max_batch_size=2)
    for rid in range(5):
        assert host.add(rid, demo, generate(prompt(4 + 3 * rid, rid), 2, stop=())) is None
    host.run()
    # Two slots: the two oldest start together, and each pair leaves as the next one starts.
    assert [host.steps_of(rid)[0] for rid in range(5)] == [1, 1, 2, 2, 3]
    assert all(host.last(rid).finish_reason is FinishReason.LENGTH for rid in range(5))


def test_a_short_prompt_starts_beside_a_chunked_long_one(
    make_host: HostFactory, demo: str, reference: Callable[..., list[int]]
) -> None:
    host = make_host(budget_tokens=8)
    long_prompt, short_prompt = prompt(20, 0), prompt(3, 1)
    host.add(0, demo, generate(long_prompt, 3, stop=()))  # chunked: 5, 8 and 7 tokens
    host.add(1, demo, generate(short_prompt, 3, stop=()))  # arrived later, takes 3 of step 1's budget
    host.run()
    assert host.steps_of(1)[0] == 1
    # The long prompt kept the rest of each step: it starts no later than it did alone (3 steps).
    assert host.steps_of(0)[0] == 3
    assert host.tokens(0) == reference(long_prompt, 3, False)
    assert host.tokens(1) == reference(short_prompt, 3, False)


def test_a_chunked_prompt_keeps_half_of_every_step(make_host: HostFactory, demo: str) -> None:
    host = make_host(budget_tokens=8, max_batch_size=16)
    host.add(0, demo, generate(prompt(24, 0), 2, stop=()))
    for rid in range(1, 9):  # a crowd of short prompts behind it
        host.add(rid, demo, generate(prompt(2, rid), 2, stop=()))
    host.run()
    # The shorts share half of each step (4 tokens: two of them a step); the long prompt gets the
    # other half at least, so its 24 tokens take 6 steps, however many shorts wait.
    assert [host.steps_of(rid)[0] for rid in range(1, 9)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert host.steps_of(0)[0] <= 6


def test_a_request_is_passed_over_a_bounded_number_of_times(make_host: HostFactory, demo: str) -> None:
    host = make_host(budget_tokens=8, max_batch_size=32)
    host.add(0, demo, generate(prompt(40, 0), 1, stop=()))  # chunked over many steps
    host.add(1, demo, generate(prompt(6, 1), 1, stop=()))  # fits a step, but not the half left to it
    for rid in range(2, 20):
        host.add(rid, demo, generate(prompt(1, rid), 1, stop=()))
    host.run()
    first = {rid: host.steps_of(rid)[0] for rid in range(20)}
    # Younger one-token prompts went past request 1 for MAX_PASSED_OVER steps, then waited for it.
    assert sorted(r for r in range(2, 20) if first[r] < first[1]) == list(range(2, 2 + 4 * MAX_PASSED_OVER))
    assert first[1] <= first[0] + 1  # it started once the chunked prompt left it the room


def test_the_group_pays_for_its_padding(
    make_host: HostFactory, demo: str, reference: Callable[..., list[int]]
) -> None:
    host = make_host(budget_tokens=32)
    cases = [(prompt(28, 0), 4), (prompt(3, 1), 4), (prompt(26, 2), 4)]
    for rid, (ids, n) in enumerate(cases):
        host.add(rid, demo, generate(ids, n, stop=()))
    host.step()
    # 28 + 3 tokens would fit, but the pair is prefilled padded to 28: 56 tokens of work. The
    # short one waits a step, and the 26-token one two: beside the short one it would cost 52.
    assert host.in_step(1) == [(0, 0)]
    host.run()
    assert [host.steps_of(rid)[0] for rid in range(3)] == [1, 2, 3]
    for rid, (ids, n) in enumerate(cases):
        assert host.tokens(rid) == reference(ids, n, False)


def test_backpressure_counts_requests_beyond_free_slots(make_host: HostFactory, demo: str) -> None:
    host = make_host(max_batch_size=2, max_queue=0)
    assert host.add(0, demo, generate(prompt(5, 0), 4, stop=())) is None
    assert host.add(1, demo, generate(prompt(5, 1), 4, stop=())) is None
    refused = host.add(2, demo, generate(prompt(5, 2), 4, stop=()))
    assert refused is not None and refused.finish_reason is FinishReason.ERROR
    assert refused.error is not None and refused.error.kind is ErrorKind.OVERLOADED
    assert host.engine.num_waiting == 2
    host.step()  # both start: no slot is free, so nothing more may wait
    refused = host.add(3, demo, generate(prompt(5, 3), 4, stop=()))
    assert refused is not None and refused.error is not None and refused.error.kind is ErrorKind.OVERLOADED
    host.run()  # once they finish, their slots take requests again
    assert host.add(4, demo, generate(prompt(5, 4), 4, stop=())) is None
    host.run()
    assert [len(host.tokens(rid)) for rid in (0, 1, 4)] == [4, 4, 4]


def test_max_queue_is_the_waiting_room_beyond_the_slots(make_host: HostFactory, demo: str) -> None:
    host = make_host(max_batch_size=1, max_queue=2)
    refusals = [host.add(rid, demo, generate(prompt(5, rid), 2)) for rid in range(4)]
    assert refusals[:3] == [None, None, None]
    assert refusals[3] is not None and refusals[3].error is not None
    assert refusals[3].error.kind is ErrorKind.OVERLOADED


def test_abort_of_a_waiting_request(make_host: HostFactory, demo: str) -> None:
    host = make_host(max_batch_size=1)
    host.add(0, demo, generate(prompt(5, 0), 3, stop=()))
    host.add(1, demo, generate(prompt(5, 1), 3, stop=()))
    host.add(2, demo, generate(prompt(5, 2), 3, stop=()))
    host.step()
    assert host.engine.num_waiting == 2
    assert host.engine.abort((0, 1))
    assert not host.engine.abort((0, 1)) and not host.engine.abort((1, 0))  # gone; another worker's id
    assert host.engine.num_waiting == 1 and host.engine.aborted_total == 1
    host.run()
    assert (0, 1) not in host.frames
    assert len(host.tokens(0)) == 3 and len(host.tokens(2)) == 3


def test_a_model_that_fails_to_load_fails_only_its_request(
    make_host: HostFactory, demo: str, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(Path(demo) / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    no_pooling = tmp_path / "no-pooling"  # an embedder whose modules.json names nothing usable
    no_pooling.mkdir()
    (no_pooling / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "x.Y"}]')
    host = make_host()
    host.add(0, str(broken), generate(prompt(5, 0), 2))
    host.add(1, str(no_pooling), Embed((sentence(4),)))
    host.add(2, demo, generate(prompt(5, 2), 2, stop=()))
    host.run()
    for rid in (0, 1):
        frame = host.last(rid)
        assert frame.finish_reason is FinishReason.ERROR and frame.error is not None
        assert frame.error.kind is ErrorKind.MODEL_LOAD_FAILED
        assert frame.error.message == LOAD_FAILED  # nothing of the exception, nor the path
    assert len(host.tokens(2)) == 2 and host.last(2).finish_reason is FinishReason.LENGTH
    assert str(broken) not in host.engine.registry.loaded()


def test_a_task_the_model_does_not_serve(make_host: HostFactory, demo: str) -> None:
    host = make_host()
    host.add(0, demo, Embed((sentence(4),)))
    host.add(1, MINILM, generate((CLS, 2000, SEP), 2))
    host.add(2, demo, generate(prompt(5, 2), 2, stop=()))
    host.run()
    for rid in (0, 1):
        frame = host.last(rid)
        assert frame.error is not None and frame.error.kind is ErrorKind.INVALID_REQUEST
        assert len(host.frames[(0, rid)]) == 1
    assert len(host.tokens(2)) == 2


def test_a_token_id_outside_the_vocabulary_fails_only_its_request(make_host: HostFactory, demo: str) -> None:
    host = make_host()
    host.add(0, demo, generate(prompt(5, 3), 2, stop=()))
    host.add(1, demo, generate((5, 10**6, 7), 2, stop=()))  # prefilled in the same group otherwise
    host.add(2, demo, generate(prompt(6, 4), 2, stop=()))
    host.run()
    frame = host.last(1)
    assert frame.error is not None and frame.error.kind is ErrorKind.INVALID_REQUEST
    assert len(host.tokens(0)) == 2 and len(host.tokens(2)) == 2


def test_empty_prompts_are_refused(make_host: HostFactory, demo: str) -> None:
    host = make_host()
    empty: list[tuple[int, str, Payload]] = [
        (0, demo, generate((), 3)),
        (1, MINILM, Embed(())),  # no inputs at all: it would never finish, and block the queue
        (2, MINILM, Embed((sentence(3), ()))),  # one input without tokens
    ]
    for rid, model, payload in empty:
        refused = host.add(rid, model, payload)
        assert refused is not None and refused.error is not None, rid
        assert refused.error.kind is ErrorKind.INVALID_REQUEST
    assert host.engine.num_waiting == 0 and not host.engine.has_work()
    host.add(3, demo, generate(prompt(4, 3), 2, stop=()))
    host.run()
    assert len(host.tokens(3)) == 2


# -- the causal runner ---------------------------------------------------------------------------

# Prompts of several lengths; odd ones stop at the model's end tokens, even ones run to the limit.
_CASES = [(prompt(n, 100 + i), 12, i % 2 == 1) for i, n in enumerate([3, 9, 17, 30, 5, 44])]


def _request(case: tuple[tuple[int, ...], int, bool]) -> Generate:
    ids, max_new_tokens, stops = case
    return generate(ids, max_new_tokens, DEMO_STOP if stops else ())


def _check_against_reference(host: Host, reference: Callable[..., list[int]]) -> None:
    for rid, (ids, max_new_tokens, stops) in enumerate(_CASES):
        expected = reference(ids, max_new_tokens, stops)
        assert host.tokens(rid) == expected, f"request {rid} ({len(ids)} prompt tokens)"
        ended_on_stop = stops and expected[-1] in DEMO_STOP
        reason = FinishReason.STOP if ended_on_stop else FinishReason.LENGTH
        assert host.last(rid).finish_reason is reason
        assert all(len(f.token_ids) == 1 for _, f in host.frames[(0, rid)])  # one token per frame


def test_greedy_batch_equals_lone_generate(
    make_host: HostFactory, demo: str, reference: Callable[..., list[int]]
) -> None:
    host = make_host(budget_tokens=6 * 44)  # room for all six padded to the longest (44 tokens)
    for rid, case in enumerate(_CASES):
        host.add(rid, demo, _request(case))
    host.step()
    assert host.engine.num_running == len(_CASES)  # one prefill for all of them
    host.run()
    _check_against_reference(host, reference)


def test_greedy_staggered_equals_lone_generate(
    make_host: HostFactory, demo: str, reference: Callable[..., list[int]]
) -> None:
    # Requests join a running batch whose rows are longer or shorter than theirs (padding on
    # either side of the join), and leave it while others run on.
    host = make_host()
    runner = host.engine.registry.get(demo)
    assert isinstance(runner, CausalRunner)
    mixed_before = runner.mixed_steps
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}  # step -> requests that arrive before it
    while host.engine.has_work() or host.steps < max(arrivals):
        for rid in arrivals.get(host.steps, []):
            host.add(rid, demo, _request(_CASES[rid]))
        host.step()
    _check_against_reference(host, reference)
    assert host.steps_of(5)[0] == 8 and host.steps_of(0)[-1] > 8  # 5 joined while 0 still ran
    # The joins in steps 2, 3 and 7 each ran in one forward with the running rows' decode.
    assert runner.mixed_steps - mixed_before == 3


def test_prompt_over_the_budget_is_chunked(
    make_host: HostFactory, demo: str, reference: Callable[..., list[int]]
) -> None:
    host = make_host(budget_tokens=8)
    host.add(9, demo, generate(prompt(3, 9), 20, stop=()))  # a stream already running
    host.step()
    long_prompt = prompt(30, 10)
    host.add(10, demo, generate(long_prompt, 6))
    runner = host.engine.registry.get(demo)
    for _ in range(3):  # chunks of 8, 8 and 8 tokens: no token yet, and the stream runs on
        host.step()
        assert runner.prefilling and (0, 10) not in host.frames
        assert host.in_step(host.steps) == [(0, 9)]
    host.step()  # the last 6 tokens, then the first new one
    assert not runner.prefilling and host.steps_of(10) == [5]
    host.run()
    assert host.tokens(10) == reference(long_prompt, 6)
    assert host.tokens(9) == reference(prompt(3, 9), 20, False)
    assert host.engine.prompt_tokens_total == 33


def test_abort_mid_generation_frees_the_slot(make_host: HostFactory, demo: str) -> None:
    host = make_host(max_batch_size=1)
    host.add(0, demo, generate(prompt(6, 0), 100, stop=()))
    host.add(1, demo, generate(prompt(6, 1), 3, stop=()))
    for _ in range(4):
        host.step()
    assert host.engine.num_running == 1 and host.engine.num_waiting == 1
    assert host.engine.abort((0, 0))
    assert host.engine.num_running == 0
    host.step()
    assert host.in_step(host.steps) == [(0, 1)]  # the waiting one started at once
    host.run()
    assert len(host.tokens(0)) == 4 and host.last(0).finish_reason is FinishReason.NONE
    assert len(host.tokens(1)) == 3


def test_max_new_tokens_zero_ends_after_prefill(
    make_host: HostFactory, demo: str, reference: Callable[..., list[int]]
) -> None:
    host = make_host(budget_tokens=16)
    host.add(0, demo, generate(prompt(7, 0), 0))
    host.add(1, demo, generate(prompt(5, 1), 5, stop=()))  # prefilled beside it, runs on
    host.add(2, demo, generate(prompt(20, 2), 0))  # chunked, then ends
    host.step()
    assert host.frames[(0, 0)] == [(1, TokenFrame(0, (), FinishReason.LENGTH))]
    host.run()
    assert host.frames[(0, 2)] == [(3, TokenFrame(2, (), FinishReason.LENGTH))]
    assert host.tokens(1) == reference(prompt(5, 1), 5, False)
    assert host.engine.num_running == 0


def test_prefix_cache_reuse_gives_the_same_tokens(demo: str, reference: Callable[..., list[int]]) -> None:
    registry = ModelRegistry("cpu", "float32", False, PrefixCache(1 << 24))
    host = Host(Engine(registry, HostSettings(device="cpu"), 256))
    first = prompt(24, 50)
    host.add(0, demo, generate(first, 8, stop=()))
    host.run()
    turn = (*first, *host.tokens(0), *prompt(6, 51))  # the next turn of the conversation
    host.add(1, demo, generate(turn, 8, stop=()))
    host.run()
    # Everything but the last token of the first reply was in the cache.
    assert host.frames[(0, 1)][0][1].cached_tokens == len(first) + 7
    assert host.tokens(1) == reference(turn, 8, False)
    assert host.engine.cached_tokens_total == len(first) + 7
    registry.unload(demo)


# -- the embedding runner ------------------------------------------------------------------------


def test_vectors_equal_encode_of_the_same_batch(make_host: HostFactory, minilm: EmbeddingModel) -> None:
    host = make_host()
    first = [sentence(5), sentence(12, 3000), sentence(3, 4000)]
    second = [sentence(9, 5000), sentence(7, 6000)]
    host.add(0, MINILM, Embed(tuple(first)))
    host.add(1, MINILM, Embed(tuple(second)))
    host.step()
    assert not host.engine.has_work()  # both requests' rows went in one pass
    expected = encoded(minilm, first + second)
    assert vectors(host, 0) == dict(enumerate(expected[:3]))
    assert vectors(host, 1) == dict(enumerate(expected[3:]))
    for rid, rows in ((0, first), (1, second)):
        reasons = [f.finish_reason for _, f in host.frames[(0, rid)]]
        assert reasons == [FinishReason.NONE] * (len(rows) - 1) + [FinishReason.STOP]
    values = np.frombuffer(vectors(host, 0)[1], dtype="<f4")
    assert values.shape == (minilm.dimensions,) and abs(float(np.linalg.norm(values)) - 1) < 1e-5


def test_rows_over_the_budget_take_several_steps(make_host: HostFactory, minilm: EmbeddingModel) -> None:
    host = make_host(budget_tokens=32)
    rows = [sentence(8, 2000 + 10 * i) for i in range(10)]  # 4 rows of 8 tokens per pass
    host.add(0, MINILM, Embed(tuple(rows)))
    host.add(1, MINILM, Embed((sentence(8, 7000),)))
    host.add(2, MINILM, Embed((sentence(6, 7100),)))
    host.run()
    # Each pass leads with the oldest waiting row, then takes the shortest: request 2's 6-token
    # row joins the first pass; request 1's 8-token row waits behind request 0's own rows.
    assert host.steps_of(0) == [1] * 3 + [2] * 4 + [3] * 3
    assert host.steps_of(2) == [1] and host.steps_of(1) == [3]
    first = encoded(minilm, [rows[0], sentence(6, 7100), rows[1], rows[2]])
    last = encoded(minilm, [rows[7], rows[8], rows[9], sentence(8, 7000)])
    expected = [first[0], first[2], first[3], *encoded(minilm, rows[3:7]), *last[:3]]
    assert vectors(host, 0) == dict(enumerate(expected))
    assert vectors(host, 2) == {0: first[1]} and vectors(host, 1) == {0: last[3]}


def test_a_free_slot_takes_a_request_beside_a_long_one(make_host: HostFactory) -> None:
    # Two slots, one held by a request over several passes: the other takes the next request as
    # soon as its rows fit a pass.
    host = make_host(max_batch_size=2, budget_tokens=32)
    host.add(0, MINILM, Embed(tuple(sentence(8, 2000 + 10 * i) for i in range(6))))
    host.add(1, MINILM, Embed((sentence(8, 7000),)))
    host.add(2, MINILM, Embed((sentence(8, 7100),)))  # its row would fit too, but no slot is free
    host.run()
    assert host.steps_of(0) == [1] * 4 + [2] * 2
    assert host.steps_of(1) == [2]
    assert host.steps_of(2) == [3]


def test_an_unknown_token_id_fails_only_its_request(make_host: HostFactory, minilm: EmbeddingModel) -> None:
    host = make_host()
    good = [sentence(6), sentence(4, 3000)]
    host.add(0, MINILM, Embed(tuple(good)))
    host.add(1, MINILM, Embed((sentence(5), (CLS, 30522, SEP))))  # one past the vocabulary
    host.add(2, MINILM, Embed((sentence(7, 5000),)))
    host.step()
    frame = host.last(1)
    assert frame.error is not None and frame.error.kind is ErrorKind.INVALID_REQUEST
    assert len(host.frames[(0, 1)]) == 1  # not even its good row went out
    assert vectors(host, 0) == dict(enumerate(encoded(minilm, [*good, sentence(7, 5000)])[:2]))
    assert vectors(host, 2) == {0: encoded(minilm, [*good, sentence(7, 5000)])[2]}


# -- both kinds in one engine --------------------------------------------------------------------


def test_streams_get_a_token_every_step_while_embeddings_are_admitted(
    make_host: HostFactory, demo: str, reference: Callable[..., list[int]]
) -> None:
    host = make_host(max_batch_size=16, budget_tokens=40)
    streams = {0: prompt(6, 60), 1: prompt(11, 61)}
    for rid, ids in streams.items():
        host.add(rid, demo, generate(ids, 12, stop=()))
    host.step()
    for rid in range(10, 14):  # 4 requests of 3 rows of 10 tokens: 4 rows per pass
        host.add(rid, MINILM, Embed(tuple(sentence(10, 2000 + 100 * rid + 10 * i) for i in range(3))))
    host.add(2, demo, generate(prompt(8, 62), 5, stop=()))  # queued behind the embeddings
    host.run()
    embedding_steps = sorted({s for rid in range(10, 14) for s in host.steps_of(rid)})
    assert embedding_steps == [2, 3, 4]  # 12 rows, 4 per pass, the requests' rows shared out
    assert all(host.last(rid).finish_reason is FinishReason.STOP for rid in range(10, 14))
    for rid, ids in streams.items():
        assert host.steps_of(rid) == list(range(1, 13))  # a token in every step, none skipped
        assert host.tokens(rid) == reference(ids, 12, False)
    assert host.steps_of(2)[0] == embedding_steps[-1] + 1  # FIFO: after the last embedding pass

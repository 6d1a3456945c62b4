"""The vision runner driven through :class:`model_host.engine.Engine` in this process (as
``test_host_units.py`` drives the causal one): requests with and without images prefilled and decoded
in the same passes, a prompt with an image chunked over steps, and the refusals that come back as
error frames. Greedy tokens are compared with a lone ``generate()`` on the processor's inputs."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from transformers.utils.chat_template_utils import render_jinja_template

from model_host.engine import Engine
from model_host.ipc.messages import ErrorKind, FinishReason, Generate, ImageInput, SamplingParams
from model_host.ipc.settings import HostSettings
from model_host.registry import ModelRegistry
from model_host.runners.vision import VisionRunner
from model_host.vision_lm import _cache_key, image_key
from tests.host_harness import Host
from tests.vision_models import Picture, build_vision_model, chat_template

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def qwen(cache_dir: Path) -> str:
    return str(build_vision_model(cache_dir, "qwen2-vl"))


@pytest.fixture(scope="module")
def registry(qwen: str) -> Iterator[ModelRegistry]:
    registry = ModelRegistry("cpu", "float32", False)
    registry.get(qwen)
    yield registry
    for path in registry.loaded():
        registry.unload(path)


@pytest.fixture()
def runner(registry: ModelRegistry, qwen: str) -> Iterator[VisionRunner]:
    runner = registry.get(qwen)
    assert isinstance(runner, VisionRunner)
    yield runner
    runner.drop_all()


def host(registry: ModelRegistry, budget_tokens: int = 4096) -> Host:
    return Host(Engine(registry, HostSettings(device="cpu", max_batch_size=8), budget_tokens))


def prompt_text(images: int, text: str) -> str:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    rendered, _ = render_jinja_template(
        [[{"role": "user", "content": parts}]],
        chat_template=chat_template("qwen2-vl"),
        add_generation_prompt=True,
    )
    return str(rendered[0])


def request(
    runner: VisionRunner, pictures: list[Picture], text: str, max_tokens: int = MAX_TOKENS
) -> Generate:
    rendered = prompt_text(len(pictures), text)
    ids = runner.model.processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    images = tuple(ImageInput(p.data, hashlib.sha256(p.data).digest()) for p in pictures)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    return Generate(tuple(ids), params, images, rendered if images else None)


def reference(
    runner: VisionRunner, pictures: list[Picture], text: str, max_tokens: int = MAX_TOKENS
) -> list[int]:
    processor = runner.model.processor
    inputs = processor(
        text=[prompt_text(len(pictures), text)],
        images=[p.pil() for p in pictures] or None,
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.inference_mode():
        out = runner.model.model.generate(
            **inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None
        )
    return list(out[0, inputs["input_ids"].shape[1] :].tolist())


CASES = [
    ([Picture.noise(448, 448, 1)], "One picture."),
    ([Picture.noise(300, 200, 2, "JPEG"), Picture.noise(120, 360, 3)], "Two pictures."),
    ([], "No picture at all, only words."),
    ([Picture.noise(224, 224, 4, "GIF")], "A small one."),
]


def test_rows_with_and_without_images_share_the_prefill_and_every_step(
    registry: ModelRegistry, runner: VisionRunner, qwen: str
) -> None:
    h = host(registry)
    for rid, (pictures, text) in enumerate(CASES):
        h.add(rid, qwen, request(runner, pictures, text))
    runner.look_ahead(h.engine.scheduler.waiting())  # the images are prepared in a thread
    for pending in h.engine.scheduler.waiting():
        if isinstance(pending.prepared, Future):
            pending.prepared.result(timeout=60)
    h.step()
    # They started in one step, and then each step gave every one of them a token.
    first = h.steps
    assert h.engine.num_running == len(CASES)
    assert all(h.steps_of(rid) == [first] for rid in range(len(CASES)))
    h.run()
    for rid, (pictures, text) in enumerate(CASES):
        assert h.steps_of(rid) == list(range(first, first + MAX_TOKENS))
        assert h.tokens(rid) == reference(runner, pictures, text), rid
    # The first frame says how long a prompt with images became; a text prompt is the worker's own.
    expanded = len(runner.model.prepare(request(runner, *CASES[0]).images, prompt_text(1, CASES[0][1])).ids)
    assert h.frames[(0, 0)][0][1].prompt_tokens == expanded > 64
    assert h.frames[(0, 2)][0][1].prompt_tokens == 0


def test_a_prompt_with_an_image_over_the_budget_is_chunked(
    registry: ModelRegistry, runner: VisionRunner, qwen: str
) -> None:
    h = host(registry, budget_tokens=40)
    h.add(0, qwen, request(runner, [], "A stream that runs meanwhile.", max_tokens=30))
    h.step()
    pictures = [Picture.noise(448, 448, 9)]  # 64 image tokens, 256 patches for the encoder
    h.add(1, qwen, request(runner, pictures, "Describe it."))
    chunking_steps = 0
    while (0, 1) not in h.frames:
        h.step()
        assert h.in_step(h.steps) == [(0, 0)] or (0, 1) in h.frames  # the stream never waits
        chunking_steps += runner.prefilling
        assert h.steps < 60
    assert chunking_steps >= 2  # the encoder's step, then the prompt in chunks of 40 tokens
    h.run()
    assert h.tokens(1) == reference(runner, pictures, "Describe it.")
    assert h.tokens(0) == reference(runner, [], "A stream that runs meanwhile.", max_tokens=30)


def test_refusals_are_error_frames_of_their_own_request(
    registry: ModelRegistry, runner: VisionRunner, qwen: str
) -> None:
    h = host(registry)
    good = request(runner, [Picture.noise(64, 64, 1)], "Fine.")
    h.add(0, qwen, good)
    # Two placeholders, one image.
    h.add(1, qwen, Generate(good.prompt_token_ids, good.sampling, good.images, prompt_text(2, "Fine.")))
    h.add(
        2,
        qwen,
        Generate(
            good.prompt_token_ids, good.sampling, (ImageInput(b"not an image", b"x" * 32),), good.prompt_text
        ),
    )
    h.run()
    assert h.last(0).finish_reason is FinishReason.LENGTH and len(h.tokens(0)) == MAX_TOKENS
    for rid, words in ((1, "image placeholders"), (2, "could not be decoded")):
        error = h.last(rid).error
        assert error is not None and error.kind is ErrorKind.INVALID_REQUEST and words in error.message


def test_a_prompt_whose_images_overflow_the_context_is_refused(
    registry: ModelRegistry, runner: VisionRunner, qwen: str
) -> None:
    h = host(registry)
    context = runner.model.max_context
    runner.model.max_context = 40  # the text fits, the image's 64 tokens do not
    try:
        h.add(0, qwen, request(runner, [Picture.noise(448, 448, 1)], "Hi."))
        h.run()
    finally:
        runner.model.max_context = context
    error = h.last(0).error
    assert error is not None and error.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED
    assert "maximum context length is 40 tokens" in error.message
    assert "its images' tokens included" in error.message


def test_cache_keys_stand_for_each_image() -> None:
    a, b = ImageInput(b"a", hashlib.sha256(b"a").digest()), ImageInput(b"b", hashlib.sha256(b"b").digest())
    ids = [5, 9, 9, 6, 9, 9, 9, 7]
    index = torch.tensor([1, 2, 4, 5, 6])
    key = _cache_key(ids, index, [a, b])
    assert key == [
        5,
        image_key(a.digest, 0),
        image_key(a.digest, 1),
        6,
        *(image_key(b.digest, k) for k in range(3)),
        7,
    ]
    assert all(k < 0 for k in key[1:3] + key[4:7])
    # Runs that do not pair up with the images (two images' tokens adjacent): every image token
    # stands for all of them, so neither image alone can match.
    merged = _cache_key([9, 9, 9, 9], torch.arange(4), [a, b])
    assert merged != _cache_key([9, 9, 9, 9], torch.arange(4), [a, a]) and all(k < 0 for k in merged)


def test_requests_with_the_same_images_share_one_preparation_and_encoding(
    registry: ModelRegistry, runner: VisionRunner, qwen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``n`` choices of one request: the processor and the vision encoder run once for both;
    a request with another image is prepared on its own."""
    calls = {"prepare": 0, "encode": 0}

    def counting(name: str) -> object:
        inner = getattr(runner.model, name)

        def call(*args: object) -> object:
            calls[name] += 1
            return inner(*args)

        return call

    monkeypatch.setattr(runner.model, "prepare", counting("prepare"))
    monkeypatch.setattr(runner.model, "encode", counting("encode"))
    h = host(registry)
    picture, text = Picture.noise(448, 448, 51), "Two choices."
    same = request(runner, [picture], text)
    h.add(0, qwen, same)
    h.add(1, qwen, same)
    h.run()
    assert calls == {"prepare": 1, "encode": 1}
    assert h.tokens(0) == h.tokens(1) == reference(runner, [picture], text)
    h.add(2, qwen, request(runner, [Picture.noise(448, 448, 52)], text))
    h.run()
    assert calls == {"prepare": 2, "encode": 2}


def test_a_counted_prompt_is_expanded_and_nothing_runs(
    registry: ModelRegistry, runner: VisionRunner, qwen: str
) -> None:
    """``count_only``: the prompt's ids as the processor expands them, then the end with its
    length; the model does not run, and a prompt over the context is counted all the same."""
    h = host(registry)
    pictures, text = [Picture.noise(448, 448, 61), Picture.noise(448, 448, 62)], "Count us."
    asked = request(runner, pictures, text)
    expected = runner.model.prepare(asked.images, prompt_text(2, text)).ids
    context = runner.model.max_context
    runner.model.max_context = 100  # the two images' 128 tokens do not fit: counted anyway
    try:
        h.add(
            0, qwen, Generate(asked.prompt_token_ids, asked.sampling, asked.images, asked.prompt_text, True)
        )
        h.run()
    finally:
        runner.model.max_context = context
    frames = [f for _, f in h.frames[(0, 0)]]
    assert [t for f in frames if f.prompt for t in f.token_ids] == expected
    assert frames[-1].finish_reason is FinishReason.LENGTH and frames[-1].prompt_tokens == len(expected)
    assert not [f for f in frames if not f.prompt and f.token_ids]  # nothing generated
    assert h.engine.num_running == 0


def test_an_aborted_requests_preparation_is_dropped_before_it_starts(
    registry: ModelRegistry, runner: VisionRunner, qwen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared: list[int] = []
    inner = runner.model.prepare

    def counting(*args: object) -> object:
        prepared.append(1)
        return inner(*args)

    monkeypatch.setattr(runner.model, "prepare", counting)
    gate = threading.Event()
    runner._pool.submit(gate.wait, 60)  # the preparing thread is busy: new ones queue behind
    h = host(registry)
    kept, dropped = [Picture.noise(200, 200, 71)], [Picture.noise(200, 200, 72)]
    h.add(0, qwen, request(runner, kept, "Kept."))
    h.add(1, qwen, request(runner, dropped, "Dropped."))
    runner.look_ahead(h.engine.scheduler.waiting())
    futures = [p.prepared for p in h.engine.scheduler.waiting()]
    assert h.engine.abort((0, 1))
    runner.look_ahead(h.engine.scheduler.waiting())
    gate.set()
    assert futures[1].cancelled() and not futures[0].cancelled()
    h.run()
    assert prepared == [1]
    assert h.tokens(0) == reference(runner, kept, "Kept.")

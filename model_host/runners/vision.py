"""The vision runner: a vision-language model's requests, batched as the causal runner batches.

A request with images differs from a text request only until its prompt is in the cache:

- **While it waits**, its images are decoded and the processor runs on its prompt (one worker
  thread, ``VisionLM.prepare``), so Pillow and the processor's numpy work stay off the step. Every
  step looks ahead in the queue and starts this for the next waiting image requests of this
  model; a head whose images are not ready yet starts at a later step.
- **Its prefill** runs the vision encoder on its images (counted in patches against the step's
  prefill budget) and feeds the prompt as embeddings with the image features in place, in the
  same left-padded pass as the text-only prompts admitted with it. A prompt longer than the budget
  is chunked as text prompts are; its images are encoded in the step of the first chunk that
  reaches them (an image's encoder pass is never split), and that chunk is smaller by their cost.
- **Requests with the same images and prompt** (the ``n`` choices of one request) share one
  preparation while they wait, and with it the image features: the processor and the vision
  encoder run once for all of them.
- **Decoding** is the causal runner's: rows with and without images share a batch; the only
  per-row state (multimodal rotary positions' offset) lives on each row's ``Sequence``.

The prefix cache keys a prompt's image tokens by the image's content (its digest), so a cached
prefix is reused only for the same images in the same places.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from itertools import islice
from typing import ClassVar

import torch

from model_host.batch import DecodeBatch, Sequence
from model_host.ipc.messages import Generate, request_ref
from model_host.ipc.model_kind import ModelKind
from model_host.prefix_cache import PrefixCache
from model_host.runners.base import Pending, StepOutput
from model_host.runners.causal import CausalRunner
from model_host.runners.causal_frames import failed
from model_host.vision_lm import ImagePrompt, ImagePromptError, VisionLM

log = logging.getLogger(__name__)

# Waiting requests scanned per step for images to prepare: enough to fill a batch's admissions,
# few enough that prepared pixels (megabytes an image for large models) do not pile up.
LOOK_AHEAD = 8
# A head whose images are still being prepared, with nothing of this model running: the loop
# waits this long for them instead of spinning (which would take the thread's CPU).
_IDLE_WAIT_S = 0.005
IMAGES_FAILED = "the images could not be prepared"


class VisionRunner(CausalRunner):
    kind: ClassVar[ModelKind] = ModelKind.VISION
    packs_steps: ClassVar[bool] = False  # prompts go in as embeddings, positions per row's images
    model: VisionLM

    def __init__(self, model: VisionLM, prefix_cache: PrefixCache | None) -> None:
        super().__init__(model, prefix_cache)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfserve-images")
        # Preparations by what they are made of (prompt text, images' digests), while a waiting
        # request holds them: a request identical to one already being prepared shares its future.
        self._preparing: weakref.WeakValueDictionary[tuple[str, tuple[bytes, ...]], Future[ImagePrompt]] = (
            weakref.WeakValueDictionary()
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()

    # -- while requests wait ---------------------------------------------------------------------
    def look_ahead(self, waiting: Iterable[Pending]) -> None:
        held: set[Future[ImagePrompt]] = set()
        for pending in islice(waiting, LOOK_AHEAD):
            if pending.model_path != self.path:
                continue
            if pending.prepared is None:
                self._start(pending)
            if isinstance(pending.prepared, Future):
                held.add(pending.prepared)
        # A preparation that no waiting request holds any more (its requests were aborted) is
        # dropped if it has not started. Futures are only started inside this window (requests
        # only move towards its head), so every one still wanted is in ``held``.
        for future in list(self._preparing.values()):
            if future not in held:
                future.cancel()

    def _start(self, pending: Pending) -> None:
        payload = pending.request.payload
        if isinstance(payload, Generate) and payload.images and payload.prompt_text is not None:
            key = (payload.prompt_text, tuple(image.digest for image in payload.images))
            future = self._preparing.get(key)
            if future is None or future.cancelled():
                future = self._pool.submit(self.model.prepare, payload.images, payload.prompt_text)
                self._preparing[key] = future
            pending.prepared = future

    def _sequence(self, pending: Pending) -> Sequence | str | None:
        payload = pending.request.payload
        assert isinstance(payload, Generate)
        if not payload.images:  # a text request: its ids as they are
            return Sequence(pending.key, self.path, list(payload.prompt_token_ids), payload.sampling)
        if payload.prompt_text is None:
            return "a request with images must carry its prompt's text"
        if pending.prepared is None or (
            isinstance(pending.prepared, Future) and pending.prepared.cancelled()
        ):
            self._start(pending)  # not started yet, or dropped while another request held it
        future = pending.prepared
        assert isinstance(future, Future)
        if not future.done() and self.num_running == 0:
            wait_for([future], timeout=_IDLE_WAIT_S)
        if not future.done():
            return None
        try:
            prompt: ImagePrompt = future.result()
        except ImagePromptError as exc:
            return str(exc)
        except Exception:
            log.exception("preparing the images of %s failed", request_ref(*pending.key))
            return IMAGES_FAILED
        # A shared preparation is one ImagePrompt for several rows: its features are computed by
        # the first row's prefill and read by the others (nothing else in it changes).
        seq = Sequence(pending.key, self.path, list(prompt.ids), payload.sampling)
        seq.images, seq.rope_delta, seq.cache_key = prompt, prompt.rope_delta, prompt.cache_key
        return seq

    # -- admission -------------------------------------------------------------------------------
    def _extra_cost(self, seq: Sequence, start: int) -> int:
        prompt: ImagePrompt | None = seq.images
        return prompt.encoder_tokens if prompt is not None and prompt.needs_encoding(start) else 0

    def _continue_chunking(
        self, budget_tokens: int, outputs: list[StepOutput]
    ) -> list[tuple[DecodeBatch, torch.Tensor]]:
        """A chunk that reaches the images encodes them first, and is smaller by their cost."""
        seq = self._chunking
        assert seq is not None
        prompt: ImagePrompt | None = seq.images
        if prompt is not None and prompt.needs_encoding(seq.prefilled):
            end = seq.prefilled + budget_tokens
            if bool((prompt.image_index < end).any()):
                try:
                    with torch.inference_mode():
                        self.model.encode(prompt)
                except Exception:
                    log.exception("encoding the images of %s failed", request_ref(*seq.key))
                    self._chunking = None
                    outputs += failed([seq])
                    return []
                budget_tokens -= prompt.encoder_tokens
                if budget_tokens <= 0:
                    return []  # the encoder took this step's budget: the chunk is next step's
        return super()._continue_chunking(budget_tokens, outputs)

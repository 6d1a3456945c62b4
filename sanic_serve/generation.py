"""One request's generation as seen by a worker: submit, turn frames into text deltas, finish.

Frames that arrived while the caller was busy are taken together and become one delta, so a slow
client gets fewer, larger chunks instead of falling further behind.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from model_host.ipc import FinishReason, HostClient, RequestStream, SamplingParams, TokenFrame
from model_host.ipc.messages import Generate, ImageInput, request_ref
from sanic_serve.errors import from_host_error
from sanic_serve.metrics.worker import GenerationTracker
from sanic_serve.models import ModelBundle
from sanic_serve.text import IncrementalDetokenizer, StopMatcher

FinishReasonName = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    finish_reason: FinishReasonName | None = None
    logprobs: list[dict[str, Any]] | None = None  # OpenAI ``ChatCompletionTokenLogprob`` entries


def _entry(token: str, logprob: float) -> dict[str, Any]:
    # -inf (a token the model rules out) is not JSON; OpenAI reports such tokens as -9999.0.
    # NaN: a prompt's first token, which nothing predicts; OpenAI gives it null.
    value = None if math.isnan(logprob) else max(logprob, -9999.0)
    return {"token": token, "logprob": value, "bytes": list(token.encode())}


class Generation:
    def __init__(
        self,
        client: HostClient,
        bundle: ModelBundle,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        stop_strings: list[str],
        keep_special_tokens: bool = False,
        images: tuple[ImageInput, ...] = (),
        prompt_text: str | None = None,
        prompt_param: str = "messages",
    ) -> None:
        self.client = client
        self.bundle = bundle
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        # A vision-language model's images, and the rendered prompt whose placeholders the host's
        # processor expands (``Generate``); the host then says how long the prompt became.
        self.images = images
        self.prompt_text = prompt_text
        self.prompt_param = prompt_param  # the request's field a prompt over the context is named by
        self._expanded_prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens the host took from its prefix cache
        self.finish_reason: FinishReasonName | None = None
        self._stop = StopMatcher(stop_strings)
        # The end-of-turn token is never text; other special tokens are dropped unless kept.
        self._detok = IncrementalDetokenizer(
            bundle.tokenizer, not keep_special_tokens, skip_ids=frozenset(sampling.stop_token_ids)
        )
        self._stream: RequestStream | None = None
        self.prompt_logprobs: list[dict[str, Any]] = []  # entries for the prompt, when asked
        self._prompt_detok: IncrementalDetokenizer | None = None

    def _detok_with_logprobs(
        self, detok: IncrementalDetokenizer, frame: TokenFrame, entries: list[dict[str, Any]]
    ) -> str:
        """Detokenize token by token, so each logprob entry carries exactly the text its token
        added: the entries' tokens concatenate to the content."""
        assert frame.logprobs is not None
        text = ""
        for tid, lp in zip(frame.token_ids, frame.logprobs, strict=True):
            piece = detok.feed([tid])
            text += piece
            if tid in self.sampling.stop_token_ids and not frame.prompt:
                continue  # the end-of-turn token is not part of the content
            top = [
                _entry(self.bundle.tokenizer.decode([alt], skip_special_tokens=False), value)
                for alt, value in lp.top
            ]
            entries.append({**_entry(piece, lp.logprob), "top_logprobs": top})
        return text

    def _take_prompt_frame(self, frame: TokenFrame) -> None:
        """Prompt tokens with their logprobs: the first has none (null), as OpenAI reports it."""
        if self._prompt_detok is None:  # the prompt as the model read it, special tokens too
            self._prompt_detok = IncrementalDetokenizer(self.bundle.tokenizer, skip_special_tokens=False)
        first = not self.prompt_logprobs
        self._detok_with_logprobs(self._prompt_detok, frame, self.prompt_logprobs)
        if first and self.prompt_logprobs:
            self.prompt_logprobs[0]["top_logprobs"] = None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens as the model read them: with images, once the host has said how
        many their placeholders became; before that (and for text), the worker's count."""
        return self._expanded_prompt_tokens or len(self.prompt_token_ids)

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the generation, if one did (Anthropic reports which)."""
        return self._stop.matched

    async def deltas(self) -> AsyncIterator[Delta]:
        """Yields text deltas, the last one with a finish reason. Raises ``APIError`` on a host
        error. Whatever way the caller stops iterating, an unfinished request is aborted."""
        if self.images:
            payload = Generate(tuple(self.prompt_token_ids), self.sampling, self.images, self.prompt_text)
            self._stream = stream = self.client.submit_task(self.bundle.path, payload)
        else:
            self._stream = stream = self.client.submit(self.bundle.path, self.prompt_token_ids, self.sampling)
        tracker = GenerationTracker(self.bundle.id, self.prompt_tokens)
        try:
            while self.finish_reason is None and not (stream.finished and stream.empty):
                text = ""
                entries: list[dict[str, Any]] | None = [] if self.sampling.logprobs >= 0 else None
                frames = await stream.frames()
                produced = [f for f in frames if not f.prompt]
                tracker.tokens_arrived(
                    sum(len(f.token_ids) for f in produced), produced[0].queue_s if produced else None
                )
                for frame in frames:
                    if frame.error is not None:
                        tracker.failed()
                        ref = request_ref(self.client.worker_index, stream.request_id)
                        raise from_host_error(frame.error, ref, self.bundle.id, self.prompt_param)
                    if frame.prompt:
                        self._take_prompt_frame(frame)
                        continue
                    self.cached_tokens = max(self.cached_tokens, frame.cached_tokens)
                    self._expanded_prompt_tokens = max(self._expanded_prompt_tokens, frame.prompt_tokens)
                    self.completion_tokens += len(frame.token_ids)
                    if frame.logprobs is not None and entries is not None:
                        text += self._stop.feed(self._detok_with_logprobs(self._detok, frame, entries))
                    else:
                        text += self._stop.feed(self._detok.feed(frame.token_ids))
                    if self._stop.matched is not None:
                        self.finish_reason = "stop"
                        break
                    if frame.finish_reason is not FinishReason.NONE:
                        self.finish_reason = (
                            "length" if frame.finish_reason is FinishReason.LENGTH else "stop"
                        )
                        # Bytes of a character the end cut off: U+FFFD, as a decode of the ids shows.
                        # The last token's logprob entry carries them, so entries still add up to
                        # the content.
                        tail = self._detok.finish()
                        if tail and entries:
                            entries[-1]["token"] += tail
                            entries[-1]["bytes"] += list(tail.encode())
                        text += self._stop.feed(tail)
                        if self._stop.matched is not None:
                            self.finish_reason = "stop"
                            break
                        text += self._stop.flush()
                        break
                if text or entries or self.finish_reason is not None:
                    yield Delta(text, self.finish_reason, entries or None)
        finally:
            # Stop string hit, client gone, or error: the host must stop spending steps on it.
            self.client.abort(stream)
            tracker.finished(self.finish_reason or "abort")

    def abort(self) -> None:
        """Stop this generation in the host now, whatever state its reader is in. A client that
        goes away while its handler awaits a write (not a frame) leaves the reader suspended,
        and its own clean-up would wait for the garbage collector."""
        if self._stream is not None:
            self.client.abort(self._stream)


async def read_prompt(
    client: HostClient,
    bundle: ModelBundle,
    prompt_token_ids: list[int],
    images: tuple[ImageInput, ...],
    prompt_text: str,
    prompt_param: str = "messages",
) -> list[int]:
    """The prompt's ids as the model reads them, each image's placeholder expanded by the host's
    processor, without generating anything (``Generate.count_only``): what ``/tokenize`` and
    ``count_tokens`` answer for a prompt with images, which only the host can expand."""
    payload = Generate(
        tuple(prompt_token_ids), SamplingParams(max_new_tokens=1), images, prompt_text, count_only=True
    )
    stream = client.submit_task(bundle.path, payload)
    ids: list[int] = []
    try:
        while not (stream.finished and stream.empty):
            for frame in await stream.frames():
                if frame.error is not None:
                    ref = request_ref(client.worker_index, stream.request_id)
                    raise from_host_error(frame.error, ref, bundle.id, prompt_param)
                if frame.prompt:
                    ids += frame.token_ids
        return ids
    finally:
        client.abort(stream)

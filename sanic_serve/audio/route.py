"""``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations``.

The worker does everything but the model: it parses the form, decodes the upload and computes
Whisper's log-mel features (both in a thread: seconds of CPU for a long file must not stall this
worker's other requests), submits them to the host's ``seq2seq`` runner (``HostClient.transcribe``)
and turns the decoder's tokens into the asked format. Not registered in the app until the host's
runner serves Whisper end to end (then ``sanic_serve.app`` registers ``bp``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, text

from model_host.ipc import FinishReason, HostClient, RequestStream, SamplingParams
from model_host.ipc.messages import TokenFrame, WindowResult, request_ref
from model_host.ipc.model_kind import ModelKind
from sanic_serve.audio.decode import AudioError, decode_audio
from sanic_serve.audio.features import FeatureConfig, log_mel_chunks
from sanic_serve.audio.formats import (
    Segment,
    TextStream,
    WhisperVocab,
    WindowStats,
    delta_event,
    done_event,
    json_body,
    logprob_entry,
    render_srt,
    render_vtt,
    split_segments,
    token_usage,
    transcript_text,
    verbose_json,
)
from sanic_serve.audio.request import (
    AudioRequest,
    Task,
    parse_audio_form,
)
from sanic_serve.audio.words import Word, segment_words
from sanic_serve.config import ServerConfig
from sanic_serve.errors import APIError, InvalidRequest, ServerError, from_host_error
from sanic_serve.models import ModelBundle
from sanic_serve.requests import admit
from sanic_serve.sse import event

log = logging.getLogger(__name__)
bp = Blueprint("audio")

# Whisper's own default (openai-whisper's ``sample_len``): half the decoder's 448 positions.
MAX_NEW_TOKENS_PER_WINDOW = 224
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.post("/v1/audio/transcriptions", ctx_audio_body=True)
async def create_transcription(request: Request) -> HTTPResponse | None:
    return await _handle(request, "transcribe")


@bp.post("/v1/audio/translations", ctx_audio_body=True)
async def create_translation(request: Request) -> HTTPResponse | None:
    return await _handle(request, "translate")


def _config(request: Request) -> ServerConfig:
    config: ServerConfig = request.app.ctx.config
    return config


def _parse(request: Request, task: Task) -> AudioRequest:
    if not (request.content_type or "").startswith("multipart/form-data"):
        raise InvalidRequest("Send the audio as multipart/form-data, with the file in the field `file`.")
    # Sanic's parameters answer ``get`` with the first value only: the form's checks want every value.
    form = {name: list(values) for name, values in (request.form or {}).items()}
    files = {name: list(values) for name, values in (request.files or {}).items()}
    return parse_audio_form(
        task,
        form,
        files,
        max_audio_mb=_config(request).max_audio_mb,
    )


@dataclass(frozen=True)
class _Prepared:
    features: bytes
    n_windows: int
    n_mels: int
    duration_s: float
    audio_frames: int = 0  # feature frames that hold audio (the rest of the last window is padding)
    window_starts: tuple[int, ...] = (0,)  # each window's chunk start in feature frames (10 ms)


def _prepare(audio: bytes, model_path: str, max_audio_s: float) -> _Prepared:
    """Decode, cut at quiet points and featurise (runs in a thread)."""
    samples = decode_audio(audio, max_duration_s=max_audio_s)
    config = _feature_config(model_path)
    chunks = log_mel_chunks(samples, config)
    return _Prepared(
        chunks.features.tobytes(),
        chunks.n_windows,
        config.n_mels,
        len(samples) / config.sampling_rate_hz,
        -(-len(samples) // config.hop_length),  # as the feature extractor's attention mask counts
        chunks.start_frames(config),
    )


@functools.cache
def _feature_config(model_path: str) -> FeatureConfig:
    return FeatureConfig.from_folder(model_path)


def _vocab(bundle: ModelBundle) -> WhisperVocab:
    eot = bundle.tokenizer.token_to_id("<|endoftext|>")
    begin = bundle.tokenizer.token_to_id("<|0.00|>")
    if eot is None or begin is None:
        raise InvalidRequest(
            f"The model `{bundle.id}` has no Whisper tokenizer (timestamp tokens).", param="model"
        )
    return WhisperVocab(eot_id=eot, timestamp_begin_id=begin)


async def _handle(request: Request, task: Task) -> HTTPResponse | None:
    req = _parse(request, task)
    bundle = await admit(request, req.model, ModelKind.SEQ2SEQ)
    vocab = _vocab(bundle)
    if req.language is not None and bundle.tokenizer.token_to_id(f"<|{req.language}|>") is None:
        raise InvalidRequest(
            f"The model `{bundle.id}` does not know the language `{req.language}`.", param="language"
        )
    loop = asyncio.get_running_loop()
    try:
        prepared = await loop.run_in_executor(
            None, _prepare, req.audio, bundle.path, _config(request).max_audio_s
        )
    except AudioError as exc:
        raise InvalidRequest(exc.message, param=exc.param, code=exc.code) from None
    # Whisper's prompt is previous text, spaced as if it came before the audio's first word.
    prompt_ids = bundle.encode(" " + req.prompt.strip()) if req.prompt else []
    client: HostClient = request.app.ctx.client
    sampling = SamplingParams(
        max_new_tokens=MAX_NEW_TOKENS_PER_WINDOW,
        temperature=req.temperature,
        logprobs=0 if req.include_logprobs else -1,
    )
    stream = client.transcribe(
        bundle.path,
        prepared.features,
        prepared.n_windows,
        prepared.n_mels,
        language=req.language,
        task=task,
        prompt_ids=prompt_ids,
        timestamps=req.timestamps,
        sampling=sampling,
        word_timestamps=req.word_timestamps,
        audio_frames=prepared.audio_frames,
        window_starts=prepared.window_starts,
    )
    out = _Output(bundle, vocab, req, prepared.window_starts)
    try:
        if req.stream:
            await _stream(request, client, stream, out, prepared, len(prompt_ids))
            return None
        async for frame in _frames(client, stream, bundle):
            out.take(frame)
        return _render(out, prepared)
    finally:
        client.abort(stream)  # however it ended (client gone included), the host stops decoding


async def _frames(
    client: HostClient, stream: RequestStream, bundle: ModelBundle
) -> AsyncIterator[TokenFrame]:
    while not (stream.finished and stream.empty):
        for frame in await stream.frames():
            if frame.error is not None:
                raise from_host_error(
                    frame.error, request_ref(client.worker_index, stream.request_id), bundle.id
                )
            yield frame
            if frame.finish_reason is not FinishReason.NONE:
                return


class _Output:
    """The tokens of one transcription as they arrive: the language token first, then the text and
    timestamp tokens (with their logprobs when asked)."""

    def __init__(
        self,
        bundle: ModelBundle,
        vocab: WhisperVocab,
        req: AudioRequest,
        window_starts: Sequence[int] = (0,),
    ) -> None:
        self.bundle, self.vocab, self.req = bundle, vocab, req
        self.window_starts = tuple(window_starts)  # each window's start in feature frames
        self.language = req.language or ""
        self.tokens: list[int] = []
        self.logprobs: list[float | None] = []  # None: the host sent none for that token
        self.window_of: list[int] = []  # each token's window (its index in ``results``)
        self.times: list[float | None] = []  # each token's start time, with word timestamps
        self.results: list[WindowResult] = []
        self.started = False

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.bundle.tokenizer.decode(list(ids), skip_special_tokens=False))

    def take(self, frame: TokenFrame) -> tuple[list[int], list[float | None]]:
        """Record a frame's tokens; returns them (the language token taken off) with their logprobs."""
        ids = list(frame.token_ids)
        lps: list[float | None] = (
            [lp.logprob for lp in frame.logprobs] if frame.logprobs is not None else [None] * len(ids)
        )
        if not self.started and ids:
            self.started = True
            first = ids[0]
            token = self.bundle.tokenizer.id_to_token(first) or ""
            if not self.vocab.is_text(first) and not self.vocab.is_timestamp(first):
                if token.startswith("<|") and token.endswith("|>"):
                    self.language = token[2:-2]
                ids, lps = ids[1:], lps[1:]
        self.tokens += ids
        self.logprobs += lps
        self.window_of += [len(self.results)] * len(ids)
        if frame.window is not None:  # the window's last frame: its tokens are all here
            self._window_done(frame.window)
        return ids, lps

    def _window_done(self, result: WindowResult) -> None:
        window = len(self.results)
        mine = [p for p in range(len(self.tokens) - 1, -1, -1) if self.window_of[p] == window][::-1]
        self.times += [None] * (len(self.tokens) - len(self.times))
        if len(result.token_times) == len(mine):
            for position, time_s in zip(mine, result.token_times, strict=True):
                self.times[position] = time_s
        self.results.append(result)

    def spans(self) -> list[tuple[float, float] | None]:
        """Each token's (start, end): it ends where the next token of its window starts, the
        window's last token where it starts (as ``generate``'s token timestamps pair them)."""
        out: list[tuple[float, float] | None] = []
        for p, start in enumerate(self.times):
            if start is None:
                out.append(None)
                continue
            following = self.times[p + 1] if p + 1 < len(self.times) else None
            same = p + 1 < len(self.tokens) and self.window_of[p + 1] == self.window_of[p]
            out.append((start, following if same and following is not None else start))
        return out

    def window_stats(self, segments: Sequence[Segment], temperature: float) -> list[WindowStats]:
        stats = []
        for seg in segments:
            window = self.window_of[seg.positions[0]] if seg.positions else -1
            result = self.results[window] if 0 <= window < len(self.results) else None
            seek = self.window_starts[window] if 0 <= window < len(self.window_starts) else 0
            if result is None:
                stats.append(WindowStats(temperature=temperature, seek=seek))
            else:
                stats.append(WindowStats(result.avg_logprob, result.no_speech_prob, result.temperature, seek))
        return stats

    def words(self, segments: Sequence[Segment]) -> list[Word]:
        spans = self.spans()
        words: list[Word] = []
        for seg in segments:
            seg_spans = [spans[p] if p < len(spans) else None for p in seg.positions]
            words += segment_words(seg.tokens, seg_spans, self.decode, self.language, seg.start_s, seg.end_s)
        return words

    def logprob_entries(self, ids: Sequence[int], lps: Sequence[float | None]) -> list[dict[str, Any]]:
        """OpenAI's logprob objects for the text tokens among ``ids`` that have one (none is made up)."""
        return [
            logprob_entry(self.decode([t]), lp)
            for t, lp in zip(ids, lps, strict=True)
            if self.vocab.is_text(t) and lp is not None
        ]

    def all_logprob_entries(self) -> list[dict[str, Any]]:
        return self.logprob_entries(self.tokens, self.logprobs)


def _render(out: _Output, prepared: _Prepared) -> HTTPResponse:
    req, vocab = out.req, out.vocab
    full = transcript_text(out.tokens, vocab, out.decode)
    fmt = req.response_format
    if fmt == "json":
        return json(
            json_body(full, prepared.duration_s, out.all_logprob_entries() if req.include_logprobs else None),
            dumps=orjson.dumps,
        )
    if fmt == "text":
        return text(full + "\n")
    segments = split_segments(out.tokens, vocab, out.decode, prepared.duration_s)
    if fmt == "srt":
        return text(render_srt(segments))
    if fmt == "vtt":
        return text(render_vtt(segments))
    body = verbose_json(
        task=req.task,
        language=out.language,
        duration_s=prepared.duration_s,
        text=full,
        segments=segments,
        temperature=req.temperature,
        segment_stats=out.window_stats(segments, req.temperature),
        words=out.words(segments) if req.word_timestamps else None,
    )
    return json(body, dumps=orjson.dumps)


async def _stream(
    request: Request,
    client: HostClient,
    stream: RequestStream,
    out: _Output,
    prepared: _Prepared,
    prompt_tokens: int,
) -> None:
    """``transcript.text.delta`` events, then exactly one ``transcript.text.done`` with usage. The
    headers wait for the first frame, so a failure before any token keeps its HTTP status."""
    frames = _frames(client, stream, out.bundle)
    first = await anext(frames, None)
    response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
    assert response is not None
    deltas = TextStream(out.vocab, out.decode)
    want_logprobs = out.req.include_logprobs
    try:
        frame = first
        while frame is not None:
            ids, lps = out.take(frame)
            delta = deltas.push(ids)
            # Logprobs go with the event of the frame whose tokens they measure (a delta of held-back
            # text may come a frame later than its tokens).
            entries = out.logprob_entries(ids, lps) if want_logprobs else None
            if delta or entries:
                await response.send(event(delta_event(delta, entries)))
            frame = await anext(frames, None)
        tail = deltas.finish()
        if tail:
            await response.send(event(delta_event(tail)))
        usage = token_usage(prepared.n_windows, prompt_tokens, len(out.tokens) + 1)
        done = done_event(deltas.done_text(), usage, out.all_logprob_entries() if want_logprobs else None)
        await response.send(event(done))
    except APIError as exc:
        # Headers are gone: the error goes in-band, as an error event the SDKs raise.
        await response.send(event(exc.body()))
    except Exception:
        log.exception("transcription stream failed")
        ref = request_ref(client.worker_index, stream.request_id)
        await response.send(event(ServerError(f"Transcription failed (request id {ref}).").body()))
    await response.eof()

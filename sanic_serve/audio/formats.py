"""Whisper decoder tokens -> segments -> the response formats of ``/v1/audio/transcriptions``.

The host sends the decoder's tokens as they come (see ``model_host.ipc.messages.Transcribe``): text
tokens (ids below end-of-text), special tokens (ignored here) and timestamp tokens, whose ids from
``<|0.00|>`` upward stand for multiples of 0.02 s, already continuous across windows (each window
is a chunk of the audio of at most 30 s, cut at a quiet point, and the host shifts its times by the
chunk's start). A pair
of timestamps brackets a segment's text; a segment left open at the end closes at the audio's end.

One text rule serves every format and the stream alike: the transcript is the decoded text tokens
with the surrounding whitespace removed (Whisper starts its text with a space), so a stream's
deltas concatenate to exactly the ``json`` text.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sanic_serve.audio.languages import language_name
from sanic_serve.audio.words import Word

TIME_PRECISION_S = 0.02
# The encoder's output positions per 30 s window: the "audio tokens" a usage object counts.
AUDIO_TOKENS_PER_WINDOW = 1500

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "verbose_json", "vtt")
Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class WhisperVocab:
    """The token ids that split a Whisper decoder's output: ids below ``eot_id`` are text; ids at or
    above ``timestamp_begin_id`` are times; those in between are special tokens."""

    eot_id: int
    timestamp_begin_id: int

    def is_text(self, token_id: int) -> bool:
        return 0 <= token_id < self.eot_id

    def is_timestamp(self, token_id: int) -> bool:
        return token_id >= self.timestamp_begin_id

    def seconds(self, token_id: int) -> float:
        return round((token_id - self.timestamp_begin_id) * TIME_PRECISION_S, 2)


@dataclass(frozen=True)
class Segment:
    id: int
    start_s: float
    end_s: float
    text: str
    tokens: tuple[int, ...]
    positions: tuple[int, ...] = ()  # where ``tokens`` stand in the whole token list


def transcript_text(token_ids: Sequence[int], vocab: WhisperVocab, decode: Decode) -> str:
    return decode([t for t in token_ids if vocab.is_text(t)]).strip()


def split_segments(
    token_ids: Sequence[int], vocab: WhisperVocab, decode: Decode, duration_s: float
) -> list[Segment]:
    """Segments in time order. Without any timestamp token the whole text is one segment over the
    whole audio. Times are clamped into ``[0, duration_s]`` and never run backwards, so srt/vtt
    cues are monotonic even when the model predicts a time past the audio's end."""
    spans: list[tuple[float | None, float | None, list[int]]] = []
    start: float | None = None
    text: list[int] = []  # positions of the open segment's text tokens
    for position, token in enumerate(token_ids):
        if vocab.is_timestamp(token):
            t = vocab.seconds(token)
            if start is None and not text:
                start = t
            else:  # a closing time; the next timestamp (often the same time) opens the next segment
                spans.append((start, t, text))
                start, text = None, []
        elif vocab.is_text(token):
            text.append(position)
    if text:
        spans.append((start, None, text))
    segments: list[Segment] = []
    previous_end_s = 0.0
    for span_start, span_end, positions in spans:
        ids = tuple(token_ids[p] for p in positions)
        words = decode(ids)
        if not words.strip():
            continue
        start_s = _clamp(span_start if span_start is not None else previous_end_s, previous_end_s, duration_s)
        end_s = _clamp(span_end if span_end is not None else duration_s, start_s, duration_s)
        segments.append(Segment(len(segments), start_s, end_s, words, ids, tuple(positions)))
        previous_end_s = end_s
    return segments


def _clamp(value: float, low: float, high: float) -> float:
    return round(min(max(value, low), max(low, high)), 3)


def _clock(seconds: float, decimal: str) -> str:
    ms = int(round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats, and vtt reserves "-->": neither may leak from the text.
    return " ".join(text.split()).replace("-->", "->")


def render_srt(segments: Sequence[Segment]) -> str:
    cues = [
        f"{i}\n{_clock(s.start_s, ',')} --> {_clock(s.end_s, ',')}\n{_cue_text(s.text)}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def render_vtt(segments: Sequence[Segment]) -> str:
    cues = [f"{_clock(s.start_s, '.')} --> {_clock(s.end_s, '.')}\n{_cue_text(s.text)}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def duration_usage(duration_s: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(duration_s, 3)}


def token_usage(n_windows: int, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    """``TranscriptTextUsageTokens``: the audio counted as the encoder positions it filled."""
    audio_tokens = n_windows * AUDIO_TOKENS_PER_WINDOW
    input_tokens = audio_tokens + prompt_tokens
    return {
        "type": "tokens",
        "input_tokens": input_tokens,
        "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": audio_tokens},
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def compression_ratio(text: str) -> float:
    """Whisper's repetition signal: text bytes over their zlib size (above 2.4: likely a loop)."""
    raw = text.encode()
    return round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0


@dataclass(frozen=True)
class WindowStats:
    """What the host measured of the window a segment came from (Whisper reports the window's
    values on each of its segments), and the window's ``seek``: its start in mel frames of the audio
    (10 ms), as OpenAI's."""

    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float | None = None  # None: the request's
    seek: int = 0


def verbose_json(
    *,
    task: Literal["transcribe", "translate"],
    language: str,
    duration_s: float,
    text: str,
    segments: Sequence[Segment],
    temperature: float,
    segment_stats: Sequence[WindowStats] | None = None,
    words: Sequence[Word] | None = None,
) -> dict[str, Any]:
    """``CreateTranscriptionResponseVerboseJson`` (``CreateTranslationResponseVerboseJson`` for a
    translation: language ``english``). ``segment_stats``: each segment's window's measures;
    ``words``: with word timestamps."""
    out_segments = []
    for seg in segments:
        stats = segment_stats[seg.id] if segment_stats and seg.id < len(segment_stats) else WindowStats()
        mean = stats.avg_logprob
        out_segments.append(
            {
                "id": seg.id,
                "seek": stats.seek,
                "start": seg.start_s,
                "end": seg.end_s,
                "text": seg.text,
                "tokens": list(seg.tokens),
                "temperature": float(temperature if stats.temperature is None else stats.temperature),
                "avg_logprob": round(mean, 6) if math.isfinite(mean) else 0.0,
                "compression_ratio": compression_ratio(seg.text),
                "no_speech_prob": round(stats.no_speech_prob, 6),
            }
        )
    body: dict[str, Any] = {
        "task": task,
        "language": "english" if task == "translate" else language_name(language),
        "duration": round(duration_s, 3),
        "text": text,
        "segments": out_segments,
    }
    if words is not None:
        body["words"] = [{"word": w.word, "start": w.start_s, "end": w.end_s} for w in words]
    if task == "transcribe":  # the translation schema has no usage
        body["usage"] = duration_usage(duration_s)
    return body


def json_body(text: str, duration_s: float, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``CreateTranscriptionResponseJson`` / ``CreateTranslationResponseJson``."""
    body: dict[str, Any] = {"text": text, "usage": duration_usage(duration_s)}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


def logprob_entry(token_text: str, logprob: float) -> dict[str, Any]:
    return {"token": token_text, "logprob": logprob, "bytes": list(token_text.encode())}


class TextStream:
    """Text deltas of a growing token list, for ``transcript.text.delta`` events. Their
    concatenation is exactly :func:`transcript_text` of the final tokens: leading whitespace is
    never sent, trailing whitespace is held back until more text follows, and so is an incomplete
    UTF-8 character (a token may end inside one)."""

    def __init__(self, vocab: WhisperVocab, decode: Decode) -> None:
        self.vocab = vocab
        self.decode = decode
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token_ids: Sequence[int]) -> str:
        self.tokens.extend(t for t in token_ids if self.vocab.is_text(t))
        text = self.decode(self.tokens).lstrip()
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        ready = text.rstrip()
        if not ready.startswith(self.sent) or len(ready) <= len(self.sent):
            return ""
        delta = ready[len(self.sent) :]
        self.sent = ready
        return delta

    def finish(self) -> str:
        """The last delta (what was held back), once every token has arrived."""
        final = transcript_text(self.tokens, self.vocab, self.decode)
        delta = final[len(self.sent) :] if final.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def done_text(self) -> str:
        return self.sent


def delta_event(delta: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta}
    if logprobs is not None:
        event["logprobs"] = logprobs
    return event


def done_event(
    text: str, usage: dict[str, Any], logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "transcript.text.done", "text": text, "usage": usage}
    if logprobs is not None:
        event["logprobs"] = logprobs
    return event

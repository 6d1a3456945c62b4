"""Uploaded audio bytes -> 16 kHz mono float32 samples, the input Whisper's features are made from.

``soundfile`` (libsndfile) reads wav, flac, ogg/vorbis, ogg/opus and mp3; anything it does not
recognise goes to ``av`` (PyAV, FFmpeg): m4a/mp4, webm and the rest. Both are decoded chunk by chunk
and every chunk is counted against ``max_duration_s`` *before* the next one is decoded, so a small
file that decodes to hours of samples (a compressed "bomb") is refused after at most one chunk past
the cap, never after its samples are allocated. Resampling uses ``soxr`` (a real band-limited
resampler) in streaming mode, so chunk edges leave no clicks.

Every failure is an :class:`AudioError` whose message is safe to show a client (it never carries a
library's own exception text) and names the form field ``file``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE_HZ = 16_000
# Read this many seconds per chunk from libsndfile: large enough to keep per-call overhead small,
# small enough that the bomb check overshoots the cap by little memory.
_SF_CHUNK_S = 10


class AudioError(Exception):
    """The upload is not audio we can use; ``message`` is meant for the client (a 400 on ``file``)."""

    def __init__(self, message: str, code: str = "invalid_audio") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = "file"


class AudioTooLong(AudioError):
    def __init__(self, max_duration_s: float) -> None:
        super().__init__(
            f"The audio is longer than this server's limit of {max_duration_s:g} seconds.",
            code="audio_too_long",
        )


def decode_audio(data: bytes, *, max_duration_s: float) -> np.ndarray:
    """Decode ``data`` to 16 kHz mono float32 (values in [-1, 1]). Raises :class:`AudioError` for
    empty, truncated or non-audio data and :class:`AudioTooLong` past ``max_duration_s``."""
    if not data:
        raise AudioError("The uploaded file is empty.")
    if _cut_short(data):
        raise AudioError("The uploaded file is truncated.")
    try:
        chunks = _decode_soundfile(data, max_duration_s)
    except _NotForSoundfile:
        chunks = _decode_av(data, max_duration_s)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioError("The uploaded file holds no audio samples.")
    if not np.all(np.isfinite(samples)):
        raise AudioError("The uploaded file holds invalid (non-finite) audio samples.")
    return samples.astype(np.float32, copy=False)


def _cut_short(data: bytes) -> bool:
    """Containers whose decoders quietly return what is there of a file cut short, but whose own
    structure says it was: a WAV ``data`` chunk longer than the bytes left, an Ogg stream whose
    last page is incomplete or lacks the end-of-stream flag."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return _wav_cut_short(data)
    if data[:4] == b"OggS":
        return _ogg_cut_short(data)
    return False


# Sizes that streaming writers put in a WAV header when they cannot know the length yet.
_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def _wav_cut_short(data: bytes) -> bool:
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"data":
            return size not in _WAV_UNKNOWN_SIZES and pos + 8 + size > len(data)
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return True  # no data chunk in reach: the header says more than the file holds


def _ogg_cut_short(data: bytes) -> bool:
    pos, last_flags = 0, 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS" or pos + 27 > len(data):
            return True
        n_segments = data[pos + 26]
        if pos + 27 + n_segments > len(data):
            return True
        body = sum(data[pos + 27 : pos + 27 + n_segments])
        last_flags = data[pos + 5]
        pos += 27 + n_segments + body
    return pos != len(data) or not last_flags & 0x04


class _NotForSoundfile(Exception):
    """libsndfile does not recognise the container: let FFmpeg try."""


class _Counter:
    """Seconds decoded so far, checked against the cap chunk by chunk."""

    def __init__(self, max_duration_s: float) -> None:
        self.max_duration_s = max_duration_s
        self.seconds = 0.0

    def add(self, n_samples: int, rate_hz: int) -> None:
        self.seconds += n_samples / rate_hz
        if self.seconds > self.max_duration_s:
            raise AudioTooLong(self.max_duration_s)


class _Resampler:
    """Mono float32 chunks at ``rate_hz`` in, 16 kHz chunks out (streaming: state kept across chunks)."""

    def __init__(self, rate_hz: int) -> None:
        self.stream = (
            None
            if rate_hz == SAMPLE_RATE_HZ
            else soxr.ResampleStream(rate_hz, SAMPLE_RATE_HZ, 1, dtype="float32", quality="HQ")
        )
        self.out: list[np.ndarray] = []

    def push(self, mono: np.ndarray) -> None:
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        self.out.append(mono if self.stream is None else self.stream.resample_chunk(mono))

    def finish(self) -> list[np.ndarray]:
        if self.stream is not None:
            self.out.append(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))
        return [c for c in self.out if c.size]


def _decode_soundfile(data: bytes, max_duration_s: float) -> list[np.ndarray]:
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as exc:
        raise _NotForSoundfile from exc
    except (RuntimeError, TypeError, ValueError) as exc:  # soundfile's other ways to say "unreadable"
        raise _NotForSoundfile from exc
    with f:
        rate_hz = int(f.samplerate)
        if rate_hz <= 0:
            raise AudioError("The uploaded file declares no sample rate.")
        # A header that already declares too long an audio is refused before reading anything.
        if f.seekable() and f.frames > 0 and f.frames / rate_hz > max_duration_s:
            raise AudioTooLong(max_duration_s)
        counter = _Counter(max_duration_s)
        resampler = _Resampler(rate_hz)
        read = 0
        try:
            # Not ``f.blocks``: it pads a short read up to the header's length, hiding a cut file.
            while len(block := f.read(rate_hz * _SF_CHUNK_S, dtype="float32", always_2d=True)):
                counter.add(len(block), rate_hz)
                read += len(block)
                resampler.push(block.mean(axis=1))
        except sf.LibsndfileError as exc:
            raise AudioError("The uploaded file is damaged or truncated.") from exc
        # libsndfile reads what is there of a file cut short; its header still says how long it was.
        if f.seekable() and f.frames > 0 and read < f.frames:
            raise AudioError("The uploaded file is truncated.")
        return resampler.finish()


def _decode_av(data: bytes, max_duration_s: float) -> list[np.ndarray]:
    import av  # FFmpeg's libraries load on first use only (most uploads never need them)

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioError("The uploaded file is not audio in a format this server can decode.") from exc
    with container:
        if not container.streams.audio:
            raise AudioError("The uploaded file has no audio track.")
        stream = container.streams.audio[0]
        counter = _Counter(max_duration_s)
        resampler: _Resampler | None = None
        try:
            for rate_hz, mono in _av_chunks(container, stream):
                counter.add(len(mono), rate_hz)
                if resampler is None:
                    resampler = _Resampler(rate_hz)
                resampler.push(mono)
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise AudioError("The uploaded file is damaged or truncated.") from exc
        # A container that declares its duration (webm, mp4) and decodes to clearly less was cut.
        declared_s = (container.duration or 0) / 1_000_000
        if declared_s > 0 and counter.seconds < declared_s - max(0.5, 0.02 * declared_s):
            raise AudioError("The uploaded file is truncated.")
        return resampler.finish() if resampler is not None else []


def _av_chunks(container: object, stream: object) -> Iterator[tuple[int, np.ndarray]]:
    """One decoded frame at a time as mono float32 at the stream's own rate: FFmpeg's resampler only
    converts the sample format and mixes channels down here; the rate change is soxr's."""
    import av

    mixer: av.AudioResampler | None = None
    rate_hz = 0
    for packet in container.demux(stream):  # type: ignore[attr-defined]
        for frame in packet.decode():
            if mixer is None:
                rate_hz = int(frame.sample_rate)
                if rate_hz <= 0:
                    raise AudioError("The uploaded file declares no sample rate.")
                mixer = av.AudioResampler(format="flt", layout="mono", rate=rate_hz)
            # A stream whose rate changes midway would need a second resampler: refuse it plainly.
            if int(frame.sample_rate) != rate_hz:
                raise AudioError("The uploaded file changes its sample rate midway.")
            for out in mixer.resample(frame):
                yield rate_hz, out.to_ndarray().reshape(-1)
    if mixer is not None:
        for out in mixer.resample(None):
            yield rate_hz, out.to_ndarray().reshape(-1)

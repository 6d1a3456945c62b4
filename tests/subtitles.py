"""Strict parsers of the srt and vtt the audio endpoints answer, and test audio encoders (``av``,
``soundfile``) shared by the audio tests."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import av
import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


_SRT_TIME = re.compile(r"^(\d{2}):([0-5]\d):([0-5]\d),(\d{3}) --> (\d{2}):([0-5]\d):([0-5]\d),(\d{3})$")
_VTT_TIME = re.compile(r"^(\d{2}):([0-5]\d):([0-5]\d)\.(\d{3}) --> (\d{2}):([0-5]\d):([0-5]\d)\.(\d{3})$")


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def _cues(blocks: list[str], time_re: re.Pattern[str], numbered: bool) -> list[Cue]:
    cues: list[Cue] = []
    for i, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        if numbered:
            assert lines[0] == str(i), f"cue {i} is numbered {lines[0]!r}"
            lines = lines[1:]
        match = time_re.match(lines[0])
        assert match, f"cue {i}: bad timing line {lines[0]!r}"
        g = match.groups()
        start_s, end_s = _seconds(*g[:4]), _seconds(*g[4:])
        text = "\n".join(lines[1:])
        assert text.strip(), f"cue {i} has no text"
        assert start_s <= end_s, f"cue {i} ends before it starts"
        if cues:
            assert start_s >= cues[-1].end_s - 1e-9, f"cue {i} starts before cue {i - 1} ends"
        cues.append(Cue(start_s, end_s, text))
    return cues


def parse_srt(body: str) -> list[Cue]:
    """Cues numbered 1, 2, ... with ``HH:MM:SS,mmm`` times, one blank line between cues, times
    monotonic. Any deviation fails an assertion."""
    assert body.endswith("\n") and "\r" not in body
    blocks = body.rstrip("\n").split("\n\n")
    assert all(b and not b.startswith("\n") for b in blocks), "extra blank lines"
    return _cues(blocks, _SRT_TIME, numbered=True)


def parse_vtt(body: str) -> list[Cue]:
    """``WEBVTT`` then a blank line, cues with ``HH:MM:SS.mmm`` times (no numbers here)."""
    assert body.startswith("WEBVTT\n\n") and body.endswith("\n") and "\r" not in body
    rest = body[len("WEBVTT\n\n") :].rstrip("\n")
    if not rest:
        return []
    blocks = rest.split("\n\n")
    assert all(b and not b.startswith("\n") for b in blocks), "extra blank lines"
    return _cues(blocks, _VTT_TIME, numbered=False)


def encode_soundfile(samples: np.ndarray, rate_hz: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_av(
    samples: np.ndarray,
    rate_hz: int,
    container: str,
    codec: str,
    codec_rate_hz: int,
    bit_rate: int | None = None,
) -> bytes:
    """Mono float32 ``samples`` encoded by FFmpeg (``container``: ``mp3``, ``ogg``, ``ipod`` for
    m4a, ``webm``), resampled first to a rate the codec takes; ``bit_rate`` in bits per second
    (None: the codec's default)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=codec_rate_hz)
        assert isinstance(stream, av.audio.stream.AudioStream)
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate_hz
        converter = av.AudioResampler(format=stream.format.name, layout="mono", rate=codec_rate_hz)
        for converted in [*converter.resample(frame), *converter.resample(None)]:
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()

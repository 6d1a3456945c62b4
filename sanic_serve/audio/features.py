"""Whisper's log-mel spectrogram in numpy, computed in the HTTP worker.

``transformers``' ``WhisperFeatureExtractor`` has a numpy path, but importing it imports torch,
which the workers never do; this is the same computation (periodic Hann window, centred
reflect-padded STFT, slaney mel filter bank, ``log10`` floored 8 below the maximum, scaled by
``(x + 4) / 4``), read from the model folder's ``preprocessor_config.json``.

Audio longer than one 30 s window is cut into chunks of at most 30 s at quiet points (``quiet_cuts``:
the quietest short stretch in the last seconds before each chunk's 30 s limit), so a word spoken
across a fixed 30 s mark is neither lost nor doubled. Each chunk is featurised on its own, zero-padded
to a whole window as a short clip is (a chunk's features are those of that chunk alone), the layout
the host's ``Transcribe`` payload takes: float32 of shape ``(n_windows, n_mels, 3000)``, with each
window's start in feature frames (``window_starts``) so the host keeps timestamps continuous.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FeatureConfig:
    n_mels: int = 80
    sampling_rate_hz: int = 16_000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length_s: int = 30

    @property
    def window_samples(self) -> int:
        return self.chunk_length_s * self.sampling_rate_hz

    @property
    def window_frames(self) -> int:
        return self.window_samples // self.hop_length

    @classmethod
    def from_folder(cls, folder: str | Path) -> FeatureConfig:
        """The model's ``preprocessor_config.json`` (Whisper's defaults for what it leaves out)."""
        try:
            raw = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        except (OSError, ValueError):
            raw = {}
        if not isinstance(raw, dict):
            raw = {}
        d = cls()
        return cls(
            n_mels=int(raw.get("feature_size", d.n_mels)),
            sampling_rate_hz=int(raw.get("sampling_rate", d.sampling_rate_hz)),
            hop_length=int(raw.get("hop_length", d.hop_length)),
            n_fft=int(raw.get("n_fft", d.n_fft)),
            chunk_length_s=int(raw.get("chunk_length", d.chunk_length_s)),
        )


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """The slaney mel scale: linear below 1 kHz, logarithmic above."""
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    mel[log_region] = 15.0 + 27.0 * np.log(hz[log_region] / 1000.0) / np.log(6.4)
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    log_region = mel >= 15.0
    hz[log_region] = 1000.0 * np.exp(np.log(6.4) * (mel[log_region] - 15.0) / 27.0)
    return hz


@functools.cache
def mel_filters(n_mels: int, n_fft: int, sampling_rate_hz: int) -> np.ndarray:
    """Slaney-normalised triangular filters from 0 to 8 kHz, shape ``(n_fft // 2 + 1, n_mels)``."""
    fft_hz = np.linspace(0, sampling_rate_hz // 2, n_fft // 2 + 1)
    mel_edges = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([8000.0]))[0], n_mels + 2)
    edges_hz = _mel_to_hz(mel_edges)
    widths = np.diff(edges_hz)
    slopes = edges_hz[None, :] - fft_hz[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    # Slaney normalisation: every filter has the same area.
    return filters * (2.0 / (edges_hz[2 : n_mels + 2] - edges_hz[:n_mels]))


@functools.cache
def _hann(n_fft: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float64)  # periodic


def log_mel_window(samples: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """One window of exactly ``config.window_samples`` samples -> float32 ``(n_mels, window_frames)``."""
    pad = config.n_fft // 2
    padded = np.pad(samples.astype(np.float64), pad, mode="reflect")
    n_frames = 1 + (len(padded) - config.n_fft) // config.hop_length
    frames = np.lib.stride_tricks.sliding_window_view(padded, config.n_fft)[:: config.hop_length][:n_frames]
    power = np.abs(np.fft.rfft(frames * _hann(config.n_fft), axis=1)) ** 2
    mel = mel_filters(config.n_mels, config.n_fft, config.sampling_rate_hz).T @ power[:-1].T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# Cuts fall on 20 ms frame boundaries: a whole number of timestamp steps (0.02 s), so the host
# shifts a chunk's timestamp tokens exactly, and a whole number of feature frames (10 ms) for ``seek``.
CUT_FRAME_S = 0.02
# Quietness is the mean energy over this stretch centred on the cut: long enough to span a short
# pause between words, short enough to fit in one.
QUIET_STRETCH_S = 0.16
# Where a cut is searched: this far after the chunk's start up to the window's length.
SEARCH_FROM_S = 20.0


@dataclass(frozen=True)
class Chunks:
    """Audio cut for the encoder: ``features`` ``(n_windows, n_mels, window_frames)`` and each
    window's first sample (``starts``, the first 0)."""

    features: np.ndarray
    starts: tuple[int, ...]

    @property
    def n_windows(self) -> int:
        return int(self.features.shape[0])

    def start_frames(self, config: FeatureConfig) -> tuple[int, ...]:
        """Each window's start in feature frames (every cut is a whole number of them)."""
        return tuple(start // config.hop_length for start in self.starts)


def quiet_cuts(samples: np.ndarray, config: FeatureConfig) -> tuple[int, ...]:
    """Chunk starts (sample offsets, the first 0) cutting ``samples`` into chunks of at most one
    window. While more than a window is left, the next cut goes in the quietest stretch (lowest mean
    energy over ``QUIET_STRETCH_S``) between ``SEARCH_FROM_S`` and the window's length after the
    chunk's start; among equally quiet places (digital silence), the middle of the longest run of
    them. Audio of at most one window is one chunk."""
    frame = max(1, round(CUT_FRAME_S * config.sampling_rate_hz))
    window_frames = config.window_samples // frame
    if len(samples) <= config.window_samples or window_frames < 1:
        return (0,)
    n_frames = -(-len(samples) // frame)
    padded = np.zeros(n_frames * frame, np.float64)
    padded[: len(samples)] = samples
    energy = np.mean(padded.reshape(n_frames, frame) ** 2, axis=1)
    half = max(1, round(QUIET_STRETCH_S / CUT_FRAME_S) // 2)
    # quiet[b]: mean energy of frames [b - half, b + half), the stretch centred on the boundary
    # before frame b (the audio's edges repeat their frame's energy).
    summed = np.concatenate([[0.0], np.cumsum(np.pad(energy, half, mode="edge"))])
    quiet = (summed[2 * half :] - summed[: -2 * half]) / (2 * half)
    search_from = min(window_frames, max(1, round(SEARCH_FROM_S / CUT_FRAME_S)))
    starts = [0]
    start = 0
    while len(samples) - start * frame > config.window_samples:
        low, high = start + search_from, start + window_frames  # boundaries, both ends allowed
        cut = low + _quietest(quiet[low : high + 1])
        starts.append(cut * frame)
        start = cut
    return tuple(starts)


def _quietest(quiet: np.ndarray) -> int:
    """The index of the quietest value; among ties, the middle of the longest run of them (the
    latest run if several are as long)."""
    is_min = quiet <= quiet.min() * (1 + 1e-9) + 1e-20
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_min.astype(np.int8), [0]])))
    runs = edges.reshape(-1, 2)  # [first, past-last) of each run of minima
    lengths = runs[:, 1] - runs[:, 0]
    best = runs[len(lengths) - 1 - int(np.argmax(lengths[::-1]))]
    return int((best[0] + best[1] - 1) // 2)


def log_mel_chunks(samples: np.ndarray, config: FeatureConfig) -> Chunks:
    """Audio of any length cut at ``quiet_cuts``, each chunk featurised alone, zero-padded to a
    whole window as a single short clip is."""
    starts = quiet_cuts(samples, config)
    ends = (*starts[1:], len(samples))
    out = np.empty((len(starts), config.n_mels, config.window_frames), np.float32)
    window = np.zeros(config.window_samples, np.float32)
    for i, (begin, end) in enumerate(zip(starts, ends, strict=True)):
        window[:] = 0.0
        window[: end - begin] = samples[begin:end]
        out[i] = log_mel_window(window, config)
    return Chunks(out, starts)


def log_mel_windows(samples: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Features of ``log_mel_chunks`` alone: float32 ``(n_windows, n_mels, window_frames)``."""
    return log_mel_chunks(samples, config).features

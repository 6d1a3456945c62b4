"""Whisper's log-mel spectrogram in numpy, computed in the HTTP worker.

``transformers``' ``WhisperFeatureExtractor`` has a numpy path, but importing it imports torch,
which the workers never do; this is the same computation (periodic Hann window, centred
reflect-padded STFT, slaney mel filter bank, ``log10`` floored 8 below the maximum, scaled by
``(x + 4) / 4``), read from the model folder's ``preprocessor_config.json``. The audio is cut into
whole 30 s windows (the last zero-padded) and each window is featurised on its own, the layout the
host's ``Transcribe`` payload takes: float32 of shape ``(n_windows, n_mels, 3000)``.
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


def n_windows(n_samples: int, config: FeatureConfig) -> int:
    return max(1, -(-n_samples // config.window_samples))


def log_mel_windows(samples: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Audio of any length -> float32 ``(n_windows, n_mels, window_frames)``, window ``i`` covering
    seconds ``[30 i, 30 (i + 1))``."""
    count = n_windows(len(samples), config)
    padded = np.zeros(count * config.window_samples, np.float32)
    padded[: len(samples)] = samples
    out = np.empty((count, config.n_mels, config.window_frames), np.float32)
    for i in range(count):
        out[i] = log_mel_window(padded[i * config.window_samples : (i + 1) * config.window_samples], config)
    return out

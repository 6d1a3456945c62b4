"""How good a decoded Whisper window is, and where its tokens lie in the audio, as ``transformers``'
``WhisperForConditionalGeneration.generate`` measures both:

- **Temperature fallback** (``generate_with_fallback`` / ``_need_fallback``): a window whose token
  compression ratio is above ``compression_ratio_threshold`` (a repetition loop) or whose average
  logprob (its tokens and end-of-text, under the logits processors) is below ``logprob_threshold``
  is decoded again at the next temperature; one whose ``<|nospeech|>`` probability is above
  ``no_speech_threshold`` while its average logprob is below ``logprob_threshold`` is silence and
  skipped. The thresholds come from the model's generation config; none there, no fallback.
- **Token times** (``_extract_token_timestamps``): the cross-attention weights of the alignment
  heads over the window's audio frames, normalised per frame across tokens, median-filtered along
  time, averaged over heads, then dynamic time warping from tokens to frames; a token's time is
  where its row first advances.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Whisper's fallback temperatures when a request asks for greedy decoding (openai-whisper's default
# ``temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)``).
DEFAULT_TEMPERATURE_STEP = 0.2
TIME_PRECISION_S = 0.02  # an encoder position: 2 feature frames of 10 ms


@dataclass(frozen=True)
class Fallback:
    """Whisper's thresholds from a generation config (each None when absent)."""

    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    temperature_step: float = DEFAULT_TEMPERATURE_STEP

    @classmethod
    def of(cls, generation: Any) -> Fallback:
        def number(name: str) -> float | None:
            value = getattr(generation, name, None)
            return float(value) if isinstance(value, (int, float)) else None

        step = number("temperature_increment_on_fallback")
        return cls(
            number("compression_ratio_threshold"),
            number("logprob_threshold"),
            number("no_speech_threshold"),
            step if step is not None and step > 0 else DEFAULT_TEMPERATURE_STEP,
        )

    @property
    def active(self) -> bool:
        """Whether a window may be judged at all (then its tokens wait until it is)."""
        return self.compression_ratio_threshold is not None or self.logprob_threshold is not None

    def temperatures(self, requested: float) -> list[float]:
        """The temperatures a window may be decoded at, in order: from 0 up to 1 by the step for a
        greedy request with thresholds, else only the one asked for."""
        if not self.active or requested > 0:
            return [requested]
        count = int(math.floor(1.0 / self.temperature_step + 1e-9))
        return [round(i * self.temperature_step, 6) for i in range(count + 1)]

    def judge(
        self, tokens: list[int], avg_logprob: float, no_speech_prob: float, vocab_size: int
    ) -> tuple[bool, bool]:
        """(needs a fallback, is silence) for a window's tokens (end-of-text included when it ended
        on it), as ``_need_fallback`` decides."""
        fallback = skip = False
        if self.compression_ratio_threshold is not None:
            fallback = token_compression_ratio(tokens, vocab_size) > self.compression_ratio_threshold
        if self.logprob_threshold is not None:
            fallback = fallback or avg_logprob < self.logprob_threshold
            if self.no_speech_threshold is not None and no_speech_prob > self.no_speech_threshold:
                if avg_logprob < self.logprob_threshold:
                    fallback, skip = False, True
        return fallback, skip


def token_compression_ratio(tokens: list[int], vocab_size: int) -> float:
    """Token ids as little-endian bytes over their zlib size (``_retrieve_compression_ratio``)."""
    if not tokens:
        return 0.0
    width = int(math.log2(vocab_size) / 8) + 1
    raw = b"".join(t.to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw))


def median_filter(inputs: torch.Tensor, width: int) -> torch.Tensor:
    """Median over ``width`` values along the last dimension, edges reflected."""
    pad = width // 2
    if inputs.shape[-1] <= pad:
        return inputs
    padded = F.pad(inputs[None], (pad, pad, 0, 0), mode="reflect")[0]
    return padded.unfold(-1, width, 1).sort()[0][..., pad]


def dynamic_time_warping(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost_matrix`` (tokens × frames): its token and frame
    indices. Ties resolved as ``transformers`` does (diagonal, then up, then left)."""
    rows, cols = cost_matrix.shape
    cost = np.full((rows + 1, cols + 1), np.inf)
    trace = np.full((rows + 1, cols + 1), -1, dtype=np.int8)
    cost[0, 0] = 0.0
    # Cell (i, j) needs (i-1, j-1), (i-1, j) and (i, j-1): every cell of one anti-diagonal i + j = d
    # depends only on earlier ones, so each diagonal is one vector operation, not a Python loop.
    for d in range(2, rows + cols + 1):
        i = np.arange(max(1, d - cols), min(rows, d - 1) + 1)
        j = d - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        diagonal = (c0 < c1) & (c0 < c2)
        up = ~diagonal & (c1 < c0) & (c1 < c2)
        step = np.where(diagonal, 0, np.where(up, 1, 2))
        best = np.where(diagonal, c0, np.where(up, c1, c2))
        cost[i, j] = cost_matrix[i - 1, j - 1] + best
        trace[i, j] = step
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = rows, cols
    text: list[int] = []
    time: list[int] = []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(text[::-1]), np.array(time[::-1])


def token_start_times(weights: torch.Tensor, filter_width: int) -> list[float]:
    """Each token's start time (seconds into its window) from alignment-head cross-attention
    ``weights`` of shape ``(heads, tokens, positions)``: one row per token of the window."""
    if weights.shape[1] == 0:
        return []
    weights = weights.float()
    std = torch.std(weights, dim=-2, keepdim=True, unbiased=False)
    mean = torch.mean(weights, dim=-2, keepdim=True)
    matrix = median_filter((weights - mean) / std, filter_width).mean(dim=0)
    text, time = dynamic_time_warping(-matrix.double().cpu().numpy())
    jumps = np.pad(np.diff(text), (1, 0), constant_values=1).astype(bool)
    return [float(t) * TIME_PRECISION_S for t in time[jumps]]

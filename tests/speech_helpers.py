"""Speech for the audio tests: espeak-ng clips, the in-process reference (``generate()`` of the same
model on the very samples the server decodes), and the word error rate."""

from __future__ import annotations

import re
import subprocess
from functools import cached_property
from pathlib import Path
from typing import Any

# Ten English sentences for acceptance 1 (plain words espeak-ng says clearly).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Today the weather is sunny and warm.",
    "Please open the window before you leave the room.",
    "My brother bought a new car last week.",
    "We will meet at the station at nine o'clock.",
    "The children are playing football in the park.",
    "She reads a book every evening before bed.",
    "Coffee tastes better with a little milk.",
    "The train to London leaves in ten minutes.",
    "Thank you very much for your kind help.",
)
FRENCH = "Bonjour, je m'appelle Marie. Aujourd'hui il fait beau et nous allons au marché."


def espeak(text: str, voice: str, path: Path) -> bytes:
    """A WAV file of espeak-ng saying ``text``."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, timeout=60)
    return path.read_bytes()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("o'clock", "oclock"))


def word_error_rate(heard: str, spoken: str) -> float:
    """Word-level edit distance over the spoken words (lower case, punctuation ignored)."""
    hyp, ref = words(heard), words(spoken)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(1, len(ref))


class Reference:
    """whisper-base in process, fed the samples the server's worker decodes from the same file and
    its features (equal to the processor's, see test_audio_e2e), greedy."""

    def __init__(self, model: Path) -> None:
        self.path = model

    @cached_property
    def model(self) -> Any:
        import torch
        from transformers import WhisperForConditionalGeneration

        return WhisperForConditionalGeneration.from_pretrained(self.path, dtype=torch.float32).eval()

    @cached_property
    def processor(self) -> Any:
        from transformers import WhisperProcessor

        return WhisperProcessor.from_pretrained(self.path)

    def features(self, wav: bytes) -> tuple[Any, Any]:
        """The worker's features of ``wav`` and the attention mask of its audio frames."""
        import torch

        from sanic_serve.audio.decode import decode_audio
        from sanic_serve.audio.features import FeatureConfig, log_mel_windows

        audio = decode_audio(wav, max_duration_s=60)
        features = torch.from_numpy(log_mel_windows(audio, FeatureConfig.from_folder(self.path)))
        mask = torch.zeros(1, features.shape[-1], dtype=torch.long)
        mask[0, : -(-len(audio) // 160)] = 1
        return features, mask

    def tokens(self, wav: bytes, **kwargs: Any) -> Any:
        import torch

        features, mask = self.features(wav)
        with torch.inference_mode():
            return self.model.generate(features, attention_mask=mask, **kwargs)

    def text(self, wav: bytes, **kwargs: Any) -> str:
        ids = self.tokens(wav, **kwargs)[0].tolist()
        return str(self.processor.batch_decode([ids], skip_special_tokens=True)[0]).strip()

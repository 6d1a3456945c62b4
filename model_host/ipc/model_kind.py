"""Which kind of model a folder holds, read from its own files. Torch-free: the HTTP workers decide
with it which endpoints a model serves, and the host which runner loads it."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

from model_host.ipc.messages import Task


class ModelKind(enum.StrEnum):
    CAUSAL = "causal"  # a decoder LM: chat and completions
    VISION = "vision"  # a vision-language model (image-text-to-text): chat with images too
    EMBEDDING = "embedding"  # a sentence embedder: /v1/embeddings
    SEQ2SEQ = "seq2seq"  # speech to text (Whisper family): /v1/audio/transcriptions and translations


# The requests each kind serves.
TASKS: dict[ModelKind, frozenset[Task]] = {
    ModelKind.CAUSAL: frozenset({Task.GENERATE}),
    ModelKind.VISION: frozenset({Task.GENERATE}),
    ModelKind.EMBEDDING: frozenset({Task.EMBED}),
    ModelKind.SEQ2SEQ: frozenset({Task.TRANSCRIBE}),
}

# A bare encoder (``BertModel``, ``XLMRobertaModel``, ...) is an embedder when it is not packaged as
# sentence-transformers; generators' class names say they are (``GPT2LMHeadModel`` ends in Model too).
_ENCODER_SUFFIXES = ("Model", "ForMaskedLM")
_GENERATOR_MARKS = ("CausalLM", "LMHead", "ConditionalGeneration", "Seq2Seq")
# Whisper's speech-to-text heads; a Whisper config naming only WhisperForCausalLM (a bare decoder)
# or WhisperModel is not a transcriber.
_SPEECH_SUFFIXES = ("ForConditionalGeneration", "ForSpeechSeq2Seq")
# A vision-language model has a ``vision_config`` and ships the image processor its prompts need.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


# Kinds that generate text from a chat (chat/completions, responses, messages).
GENERATIVE: frozenset[ModelKind] = frozenset({ModelKind.CAUSAL, ModelKind.VISION})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_kind(folder: str | Path) -> ModelKind:
    """A sentence-transformers folder (``modules.json``) or a bare encoder is an embedding model; a
    Whisper config with a speech-to-text head (or no architectures named) is speech to text; a
    config with a ``vision_config`` beside an image processor's config is a vision-language model;
    everything else is served as a causal LM (whose loading then says what is wrong, if anything)."""
    folder = Path(folder)
    if (folder / "modules.json").is_file():
        return ModelKind.EMBEDDING
    config = _read_json(folder / "config.json")
    architectures = config.get("architectures") or []
    speech_heads = [a for a in architectures if isinstance(a, str) and a.endswith(_SPEECH_SUFFIXES)]
    if config.get("model_type") == "whisper" and (speech_heads or not architectures):
        return ModelKind.SEQ2SEQ
    if isinstance(config.get("vision_config"), dict) and any(
        (folder / name).is_file() for name in _PROCESSOR_FILES
    ):
        return ModelKind.VISION
    names = [a for a in architectures if isinstance(a, str)]
    if names and all(
        n.endswith(_ENCODER_SUFFIXES) and not any(m in n for m in _GENERATOR_MARKS) for n in names
    ):
        return ModelKind.EMBEDDING
    return ModelKind.CAUSAL

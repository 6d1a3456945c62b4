"""A sentence-transformers folder's own description of its pipeline, read without torch.

``modules.json`` lists the modules and their folders: a ``Transformer`` (the encoder, usually in
the folder's root), a ``Pooling`` (``1_Pooling/config.json``), then any ``Dense`` projections and a
``Normalize``. ``sentence_bert_config.json`` holds ``max_seq_length`` and ``do_lower_case``.
Anything this server cannot reproduce exactly is an :class:`EmbeddingLoadError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Pooling modes in the order sentence-transformers concatenates its legacy boolean flags.
_LEGACY_POOLING_FLAGS: dict[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")


class EmbeddingLoadError(ValueError):
    """The folder is not an embedding model this server can reproduce exactly; the message says why."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingLoadError(f"{path.name} is not readable JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def module_kind(type_name: str) -> str:
    """``sentence_transformers.models.Pooling`` (2.x) and ``sentence_transformers.sentence_transformer.
    modules.pooling.Pooling`` (5.x and later) are both ``Pooling``; anything else is refused."""
    kind = type_name.rsplit(".", 1)[-1]
    if not type_name.startswith("sentence_transformers.") or kind not in _MODULE_KINDS:
        raise EmbeddingLoadError(
            f"modules.json names the module {type_name!r}; only sentence-transformers' "
            f"{', '.join(_MODULE_KINDS)} modules are supported."
        )
    return kind


def pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """The modes of a ``Pooling`` config, new style (``pooling_mode``) or legacy boolean flags."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING_FLAGS.items() if config.get(key, False))
        modes = modes or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if not modes:
        raise EmbeddingLoadError("The Pooling config names no pooling mode.")
    for m in modes:
        if m not in POOLING_MODES:
            raise EmbeddingLoadError(
                f"Pooling mode {m!r} is not supported; supported: {', '.join(POOLING_MODES)}."
            )
    return modes


def max_input_tokens(transformer_dir: Path) -> int:
    """The encoder's input limit, special tokens included: ``max_seq_length`` from
    ``sentence_bert_config.json``, else the tokenizer's ``model_max_length``, both capped at the
    model's position embeddings (as sentence-transformers caps the tokenizer)."""
    config = read_json(transformer_dir / "config.json")
    text_config = config.get("text_config") or config
    limits: list[int] = []
    positions = text_config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    seq = read_json(transformer_dir / "sentence_bert_config.json").get("max_seq_length")
    if not isinstance(seq, int):
        seq = read_json(transformer_dir / "tokenizer_config.json").get("model_max_length")
    if isinstance(seq, int) and 0 < seq < 1_000_000:  # tokenizers without a limit say 1e30
        limits.append(seq)
    if not limits:
        raise EmbeddingLoadError(
            "The model declares no input length limit (max_seq_length, max_position_embeddings)."
        )
    return min(limits)


_CARD_LOSS_JSON = re.compile(r"MatryoshkaLoss.*?```json\s*(\{.*?\})\s*```", re.DOTALL)


def matryoshka_dims(folder: Path, transformer_dir: Path, dimensions: int) -> tuple[int, ...] | None:
    """The output sizes a Matryoshka model was trained for, largest first, or None.

    sentence-transformers saves no such field itself; what declares it, in this order:
    ``matryoshka_dims`` in ``config_sentence_transformers.json``, ``matryoshka_dimensions`` in the
    encoder's ``config.json`` (the convention vLLM reads), and the ``MatryoshkaLoss`` parameters that
    sentence-transformers writes into the model card (``README.md``) of a model trained with it.
    """
    declared = read_json(folder / "config_sentence_transformers.json").get("matryoshka_dims")
    if declared is None:
        declared = read_json(transformer_dir / "config.json").get("matryoshka_dimensions")
    if declared is None:
        card = folder / "README.md"
        found = (
            _CARD_LOSS_JSON.search(card.read_text(encoding="utf-8", errors="replace"))
            if card.is_file()
            else None
        )
        if found is not None:
            try:
                declared = json.loads(found.group(1)).get("matryoshka_dims")
            except ValueError:
                declared = None
    if not isinstance(declared, list):
        return None
    dims = {d for d in declared if isinstance(d, int) and not isinstance(d, bool) and 0 < d <= dimensions}
    return tuple(sorted(dims | {dimensions}, reverse=True)) if dims else None


@dataclass(frozen=True)
class PipelineFiles:
    """Where a folder's pipeline lives: the encoder's folder, pooling config and what follows."""

    transformer_dir: Path
    pooling: dict[str, Any]
    after_pooling: tuple[tuple[str, Path], ...]  # ("Dense" | "Normalize", module folder)


def read_pipeline(folder: Path) -> PipelineFiles:
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        if not (folder / "config.json").is_file():
            raise EmbeddingLoadError("The folder has neither modules.json nor config.json.")
        return PipelineFiles(folder, {}, ())  # bare encoder: mean pooling, no normalisation
    try:
        entries = json.loads(modules_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EmbeddingLoadError(f"modules.json is not readable JSON: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise EmbeddingLoadError("modules.json must be a list of modules.")
    kinds = [(module_kind(str(e.get("type", ""))), folder / str(e.get("path", ""))) for e in entries]
    if len(kinds) < 2 or kinds[0][0] != "Transformer" or kinds[1][0] != "Pooling":
        raise EmbeddingLoadError("modules.json must start with a Transformer followed by a Pooling module.")
    if any(kind in ("Transformer", "Pooling") for kind, _ in kinds[2:]):
        raise EmbeddingLoadError("Only Dense and Normalize modules may follow the Pooling module.")
    pooling = read_json(kinds[1][1] / "config.json")
    return PipelineFiles(kinds[0][1], pooling, tuple(kinds[2:]))

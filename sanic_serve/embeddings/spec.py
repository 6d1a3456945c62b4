"""What the HTTP side needs to know about a sentence-embedding model, read from its folder.

Workers read JSON files and ``tokenizer.json`` only (no torch, no weights), like
:mod:`sanic_serve.models`. The files are sentence-transformers' own: ``modules.json`` (which
modules, in which folders), the Pooling and Dense configs (the output width),
``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``). The model host reads the same
files in :mod:`model_host.embedding_files`; a test keeps the two readings in agreement.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tokenizers import Tokenizer
from tokenizers.normalizers import Lowercase, Normalizer
from tokenizers.normalizers import Sequence as NormalizerSequence

_LEGACY_POOLING_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_CARD_LOSS_JSON = re.compile(r"MatryoshkaLoss.*?```json\s*(\{.*?\})\s*```", re.DOTALL)


class EmbeddingSpecError(ValueError):
    """The folder is not a sentence-embedding model; the message says why."""


@dataclass(frozen=True)
class EmbeddingSpec:
    max_tokens: int  # per input, special tokens included
    dimensions: int  # the length of every vector the model returns
    normalizes: bool  # the vectors have unit norm (the pipeline ends in Normalize)
    do_lower_case: bool  # lowercase before tokenizing, as sentence-transformers does
    matryoshka_dims: tuple[int, ...] | None  # sizes the vectors may be cut to, largest first; None: none
    tokenizer_dir: Path  # the encoder's folder, which holds tokenizer.json
    truncation_side: str = "right"  # which end truncate_prompt_tokens cuts


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingSpecError(f"{path.name} is not readable JSON") from exc
    return data if isinstance(data, dict) else {}


def _modules(folder: Path) -> list[tuple[str, Path | None]]:
    """(kind, folder) per module; a bare encoder folder is a Transformer with (default) mean pooling."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return [("Transformer", folder), ("Pooling", None)]
    try:
        entries = json.loads(modules_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EmbeddingSpecError("modules.json is not readable JSON") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise EmbeddingSpecError("modules.json must be a list of modules")
    return [(_kind(str(e.get("type", ""))), folder / str(e.get("path", ""))) for e in entries]


def _kind(type_name: str) -> str:
    """``Pooling`` for any sentence-transformers spelling of it; other packages' modules keep their
    full name, which no check below accepts (the host cannot run them)."""
    return type_name.rsplit(".", 1)[-1] if type_name.startswith("sentence_transformers.") else type_name


def _pooled_width(pooling: dict[str, Any], hidden: int) -> int:
    mode = pooling.get("pooling_mode")
    if mode is None:
        count = sum(1 for key in _LEGACY_POOLING_FLAGS if pooling.get(key, False)) or 1
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
        if not modes or any(m not in _POOLING_MODES for m in modes):
            raise EmbeddingSpecError(f"unsupported pooling mode {mode!r}")
        count = len(modes)
    width = pooling.get("embedding_dimension") or pooling.get("word_embedding_dimension") or hidden
    return int(width) * count


def _max_tokens(transformer_dir: Path, config: dict[str, Any]) -> int:
    limits: list[int] = []
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    seq = _read_json(transformer_dir / "sentence_bert_config.json").get("max_seq_length")
    if not isinstance(seq, int):
        seq = _read_json(transformer_dir / "tokenizer_config.json").get("model_max_length")
    if isinstance(seq, int) and 0 < seq < 1_000_000:  # tokenizers without a limit say 1e30
        limits.append(seq)
    if not limits:
        raise EmbeddingSpecError("the model declares no input length limit")
    return min(limits)


def _matryoshka_dims(folder: Path, config: dict[str, Any], dimensions: int) -> tuple[int, ...] | None:
    """As :func:`model_host.embedding_files.matryoshka_dims`: config_sentence_transformers.json's
    ``matryoshka_dims``, config.json's ``matryoshka_dimensions``, else the model card's
    ``MatryoshkaLoss`` parameters."""
    declared = _read_json(folder / "config_sentence_transformers.json").get("matryoshka_dims")
    if declared is None:
        declared = config.get("matryoshka_dimensions")
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


def read_embedding_spec(folder: Path) -> EmbeddingSpec:
    modules = _modules(folder)
    if len(modules) < 2 or modules[0][0] != "Transformer" or modules[1][0] != "Pooling":
        raise EmbeddingSpecError("modules.json must start with a Transformer followed by a Pooling module")
    transformer_dir = modules[0][1] or folder
    pooling_dir = modules[1][1]
    config = _read_json(transformer_dir / "config.json")
    text_config = config.get("text_config") or config
    hidden = text_config.get("hidden_size") or text_config.get("d_model") or 0
    pooling = _read_json(pooling_dir / "config.json") if pooling_dir is not None else {}
    dimensions = _pooled_width(pooling, int(hidden))
    normalizes = False
    for kind, module_dir in modules[2:]:
        if kind == "Dense" and module_dir is not None:
            dimensions = int(_read_json(module_dir / "config.json").get("out_features", dimensions))
            normalizes = False
        elif kind == "Normalize":
            normalizes = True
        else:
            raise EmbeddingSpecError(f"unsupported module {kind!r} after the pooling")
    if dimensions <= 0:
        raise EmbeddingSpecError("the output width is unknown (no hidden_size)")
    sbert = _read_json(transformer_dir / "sentence_bert_config.json")
    if sbert.get("transformer_task", "feature-extraction") != "feature-extraction":
        raise EmbeddingSpecError(
            f"transformer_task {sbert['transformer_task']!r} is not a sentence embedding"
        )
    side = _read_json(transformer_dir / "tokenizer_config.json").get("truncation_side", "right")
    return EmbeddingSpec(
        max_tokens=_max_tokens(transformer_dir, text_config),
        dimensions=dimensions,
        normalizes=normalizes,
        do_lower_case=bool(sbert.get("do_lower_case", False)),
        matryoshka_dims=_matryoshka_dims(folder, text_config, dimensions),
        tokenizer_dir=transformer_dir,
        truncation_side="left" if side == "left" else "right",
    )


def _steps(normalizer: Normalizer | None) -> list[Normalizer]:
    """A normalizer as a list of steps (a tokenizers ``Sequence`` iterates over its own)."""
    if normalizer is None:
        return []
    if isinstance(normalizer, NormalizerSequence):
        return list(cast(Iterable[Normalizer], normalizer))
    return [normalizer]


def load_embedding_tokenizer(spec: EmbeddingSpec) -> Tokenizer:
    """The model's fast tokenizer, with truncation and padding that ``tokenizer.json`` may carry
    switched off (the request decides truncation; the host pads), and a Lowercase step in front
    when ``do_lower_case`` asks for one, exactly as sentence-transformers adds it."""
    path = spec.tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise EmbeddingSpecError("the model has no fast tokenizer (tokenizer.json)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    steps = _steps(tokenizer.normalizer)
    # sentence-transformers looks for a Lowercase step only (a BertNormalizer that lowercases
    # still gets one in front; lowercasing twice changes nothing).
    if spec.do_lower_case and not any(isinstance(step, Lowercase) for step in steps):
        tokenizer.normalizer = NormalizerSequence([Lowercase(), *steps])
    return tokenizer

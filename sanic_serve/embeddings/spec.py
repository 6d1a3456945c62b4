"""What the HTTP side needs to know about a sentence-embedding model, read from its folder.

Workers read JSON files and ``tokenizer.json`` only (no torch, no weights), like
:mod:`sanic_serve.models`. The files are sentence-transformers' own: ``modules.json`` (which
modules, in which folders), the Pooling and Dense configs (the output width),
``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``). They are read by the same
torch-free code as the host reads them (:mod:`model_host.ipc.embedding_files`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from tokenizers import Tokenizer
from tokenizers.normalizers import Lowercase, Normalizer
from tokenizers.normalizers import Sequence as NormalizerSequence

from model_host.ipc.embedding_files import EmbeddingLoadError as EmbeddingSpecError
from model_host.ipc.embedding_files import (
    matryoshka_dims,
    max_input_tokens,
    pooling_modes,
    read_json,
    read_pipeline,
)

__all__ = ["EmbeddingSpec", "EmbeddingSpecError", "load_embedding_tokenizer", "read_embedding_spec"]


@dataclass(frozen=True)
class EmbeddingSpec:
    max_tokens: int  # per input, special tokens included
    dimensions: int  # the length of every vector the model returns
    normalizes: bool  # the vectors have unit norm (the pipeline ends in Normalize)
    do_lower_case: bool  # lowercase before tokenizing, as sentence-transformers does
    matryoshka_dims: tuple[int, ...] | None  # sizes the vectors may be cut to, largest first; None: none
    tokenizer_dir: Path  # the encoder's folder, which holds tokenizer.json
    truncation_side: str = "right"  # which end truncate_prompt_tokens cuts


def read_embedding_spec(folder: Path) -> EmbeddingSpec:
    """The model's limits and output, from the same reading of its files as the host's
    (``model_host.ipc.embedding_files``); raises ``EmbeddingSpecError`` for a folder the host
    could not run."""
    files = read_pipeline(folder)
    modes = pooling_modes(files.pooling)
    config = read_json(files.transformer_dir / "config.json")
    text_config = config.get("text_config") or config
    hidden = int(text_config.get("hidden_size") or text_config.get("d_model") or 0)
    width = (
        files.pooling.get("embedding_dimension") or files.pooling.get("word_embedding_dimension") or hidden
    )
    dimensions = int(width) * len(modes)
    normalizes = False
    for kind, module_dir in files.after_pooling:
        if kind == "Dense":
            dimensions = int(read_json(module_dir / "config.json").get("out_features", dimensions))
            normalizes = False
        else:
            normalizes = True
    if dimensions <= 0:
        raise EmbeddingSpecError("the output width is unknown (no hidden_size)")
    sbert = read_json(files.transformer_dir / "sentence_bert_config.json")
    if sbert.get("transformer_task", "feature-extraction") != "feature-extraction":
        raise EmbeddingSpecError(
            f"transformer_task {sbert['transformer_task']!r} is not a sentence embedding"
        )
    side = read_json(files.transformer_dir / "tokenizer_config.json").get("truncation_side", "right")
    return EmbeddingSpec(
        max_tokens=max_input_tokens(files.transformer_dir),
        dimensions=dimensions,
        normalizes=normalizes,
        do_lower_case=bool(sbert.get("do_lower_case", False)),
        matryoshka_dims=matryoshka_dims(folder, files.transformer_dir, dimensions),
        tokenizer_dir=files.transformer_dir,
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

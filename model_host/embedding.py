"""Sentence-embedding models, read from their own sentence-transformers files.

A sentence-transformers folder describes its pipeline in ``modules.json``: a ``Transformer`` (the
encoder, usually saved in the folder's root), a ``Pooling`` (``1_Pooling/config.json``), then any
``Dense`` projections and a final ``Normalize``. :class:`EmbeddingModel` rebuilds exactly that
pipeline on top of ``transformers.AutoModel`` without importing sentence-transformers, and refuses
(with :class:`EmbeddingLoadError`) anything it cannot reproduce rather than embedding differently.
The files are read in :mod:`model_host.ipc.embedding_files`. A bare encoder folder (``config.json``
and weights, no ``modules.json``) gets mean pooling without normalisation, as sentence-transformers
gives it.

The HTTP side tokenizes (with the special tokens the tokenizer adds) and validates lengths. It
reads the same files itself (:func:`sanic_serve.embeddings.spec.read_embedding_spec`: workers import
nothing from the model host but its IPC), and a test keeps the two readings in agreement.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_host.ipc.embedding_files import (
    POOLING_MODES,
    EmbeddingLoadError,
    matryoshka_dims,
    max_input_tokens,
    pooling_modes,
    read_json,
    read_pipeline,
)

__all__ = ["POOLING_MODES", "EmbeddingLoadError", "EmbeddingModel", "matryoshka_dims", "pool"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def _resolve_device(device: torch.device | str) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise EmbeddingLoadError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.")
    return _DTYPES[dtype]


def _load_weights(module_dir: Path) -> dict[str, torch.Tensor]:
    safetensors_file = module_dir / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = module_dir / "pytorch_model.bin"
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return dict(state)
    raise EmbeddingLoadError(f"{module_dir.name} has no model.safetensors or pytorch_model.bin.")


def _activation(name: Any) -> nn.Module:
    """A ``torch.nn`` activation class by its dotted name; like sentence-transformers without
    ``trust_remote_code``, nothing outside ``torch`` is imported."""
    if name is None:
        return nn.Tanh()  # sentence-transformers' default for Dense
    if not isinstance(name, str) or not name.startswith("torch."):
        raise EmbeddingLoadError(f"Dense activation {name!r} is not a torch.nn activation.")
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise EmbeddingLoadError(f"Dense activation {name!r} does not exist in this torch.") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise EmbeddingLoadError(f"Dense activation {name!r} is not a torch.nn.Module class.")
    module: nn.Module = cls()
    return module


class DenseLayer(nn.Module):
    """sentence-transformers' ``Dense``: ``activation(linear(x))`` plus an optional residual."""

    def __init__(self, module_dir: Path) -> None:
        super().__init__()
        config = read_json(module_dir / "config.json")
        for key in ("module_input_name", "module_output_name"):
            if config.get(key) not in (None, "sentence_embedding"):
                raise EmbeddingLoadError(
                    f"Dense {key} {config[key]!r}: only sentence embeddings are supported."
                )
        try:
            in_features, out_features = int(config["in_features"]), int(config["out_features"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingLoadError(
                f"{module_dir.name}/config.json lacks in_features/out_features."
            ) from exc
        self.out_features = out_features
        self.linear = nn.Linear(in_features, out_features, bias=bool(config.get("bias", True)))
        self.activation = _activation(config.get("activation_function"))
        self.use_residual = bool(config.get("use_residual", False))
        self.residual: nn.Linear | None = None
        if self.use_residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)
        try:
            self.load_state_dict(_load_weights(module_dir), strict=True)
        except RuntimeError as exc:
            raise EmbeddingLoadError(f"{module_dir.name} weights do not match its config: {exc}") from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


class NormalizeLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, p=2, dim=-1)


class EmbeddingModel:
    """An encoder and its pooling head: token ids in, one vector per sequence out."""

    def __init__(
        self,
        encoder: Any,  # a transformers PreTrainedModel
        modes: tuple[str, ...],
        head: list[nn.Module],
        *,
        max_tokens: int,
        dimensions: int,
        normalizes: bool,
        do_lower_case: bool,
        matryoshka_dims: tuple[int, ...] | None,
        device: torch.device,
    ) -> None:
        self.encoder = encoder
        self.modes = modes
        self.head = nn.Sequential(*head)
        self.max_tokens = max_tokens  # per sequence, special tokens included
        self.dimensions = dimensions
        self.normalizes = normalizes  # every vector has unit norm (the pipeline ends in Normalize)
        self.do_lower_case = do_lower_case  # the HTTP side lowercases before tokenizing
        self.matryoshka_dims = matryoshka_dims
        self.device = device
        embeddings = encoder.get_input_embeddings()
        self.vocab_size = int(embeddings.num_embeddings) if isinstance(embeddings, nn.Embedding) else None
        config = getattr(encoder, "config", None)
        self.pad_token_id = int(getattr(config, "pad_token_id", None) or 0)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = "auto",
        *,
        trust_remote_code: bool = False,
    ) -> EmbeddingModel:
        root = Path(folder)
        if not root.is_dir():
            raise EmbeddingLoadError(f"{folder} is not a folder.")
        files = read_pipeline(root)
        sbert = read_json(files.transformer_dir / "sentence_bert_config.json")
        task = sbert.get("transformer_task", "feature-extraction")
        if task != "feature-extraction":
            raise EmbeddingLoadError(f"transformer_task {task!r} is not a sentence-embedding model.")
        modes = pooling_modes(files.pooling)
        torch_device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, torch_device)
        from transformers import AutoModel

        try:
            encoder = AutoModel.from_pretrained(
                str(files.transformer_dir), dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise EmbeddingLoadError(f"The encoder could not be loaded: {exc}") from exc
        hidden = int(encoder.config.get_text_config().hidden_size)
        width = int(
            files.pooling.get("embedding_dimension")
            or files.pooling.get("word_embedding_dimension")
            or hidden
        )
        if width != hidden:
            raise EmbeddingLoadError(
                f"Pooling expects {width}-wide token embeddings; the encoder gives {hidden}."
            )
        dimensions = hidden * len(modes)
        head: list[nn.Module] = []
        normalizes = False
        for kind, module_dir in files.after_pooling:
            if kind == "Dense":
                dense = DenseLayer(module_dir)
                if dense.linear.in_features != dimensions:
                    raise EmbeddingLoadError(
                        f"{module_dir.name} takes {dense.linear.in_features} inputs, not {dimensions}."
                    )
                dimensions = dense.out_features
                head.append(dense)
                normalizes = False
            else:
                head.append(NormalizeLayer())
                normalizes = True
        model = cls(
            encoder.to(torch_device).eval(),
            modes,
            head,
            max_tokens=max_input_tokens(files.transformer_dir),
            dimensions=dimensions,
            normalizes=normalizes,
            do_lower_case=bool(sbert.get("do_lower_case", False)),
            matryoshka_dims=matryoshka_dims(root, files.transformer_dir, dimensions),
            device=torch_device,
        )
        # The head runs in float32 on pooled float32 vectors: it is tiny, and the output is float32.
        model.head.to(device=torch_device, dtype=torch.float32).eval()
        return model

    def check(self, batch: list[list[int]]) -> None:
        """Raise ValueError for a batch the encoder must not see (the HTTP side validates first;
        this keeps a bad id from becoming a device-side assert)."""
        for ids in batch:
            if not ids:
                raise ValueError("an input has no tokens")
            if len(ids) > self.max_tokens:
                raise ValueError(f"an input has {len(ids)} tokens; the model takes at most {self.max_tokens}")
            if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"token ids must be within [0, {self.vocab_size})")

    @torch.inference_mode()
    def encode(self, batch: list[list[int]]) -> torch.Tensor:
        """One forward pass over ``batch`` (each row already has its special tokens): a float32
        ``[len(batch), dimensions]`` tensor on the model's device, rows in input order."""
        if not batch:
            return torch.empty((0, self.dimensions), dtype=torch.float32, device=self.device)
        self.check(batch)
        # Longest first and right-padded: rows of similar length sit together, and right padding
        # keeps every row's absolute positions where an unpadded pass would put them.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]), reverse=True)
        width = len(batch[order[0]])
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(order):
            ids[row, : len(batch[i])] = torch.tensor(batch[i], dtype=torch.long)
            mask[row, : len(batch[i])] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask)[0]
        pooled = self.head(pool(hidden, mask, self.modes))
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order)] = torch.arange(len(order))
        return pooled[restore.to(pooled.device)]


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """sentence-transformers' pooling over right-padded rows, accumulated in float32 (as it does
    for half-precision encoders); several modes are concatenated in the order given."""
    states = hidden.float()
    keep = mask.unsqueeze(-1).float()
    counts = keep.sum(dim=1).clamp(min=1e-9)
    lengths = mask.sum(dim=1)
    out: list[torch.Tensor] = []
    for mode in modes:
        if mode == "cls":
            out.append(states[:, 0])
        elif mode == "max":
            out.append(states.masked_fill(keep == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            out.append((states * keep).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            out.append((states * keep).sum(dim=1) / counts.sqrt())
        elif mode == "weightedmean":
            positions = torch.arange(1, states.shape[1] + 1, device=states.device, dtype=states.dtype)
            weights = keep * positions.view(1, -1, 1)
            out.append((states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            last = (lengths - 1).clamp(min=0)
            out.append(states[torch.arange(states.shape[0], device=states.device), last])
        else:  # pooling_modes() admits only the modes above
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)

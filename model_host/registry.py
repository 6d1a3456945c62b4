"""Loaded models, keyed by the local folder the worker resolved the request's model to."""

from __future__ import annotations

import gc
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """The model folder exists but could not be loaded (bad weights, unsupported architecture)."""


class DeviceError(RuntimeError):
    """The device asked for does not exist here or this build of torch cannot use it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not (
        torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    ):
        raise DeviceError(f"device {name!r} is not usable by this build of torch ({torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r} is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 where the hardware is built for it; CPUs here are fastest and exact in fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class LoadedModel:
    path: str
    model: Any
    device: torch.device
    max_context: int
    # transformers 5.2x renamed the forward argument ``past_key_values`` to ``cache``; remote-code
    # models may still use the old name.
    cache_arg: str = "cache"
    keeps_last_logits: bool = True  # forward() takes ``logits_to_keep``
    loaded_at_s: float = field(default_factory=time.monotonic)
    _grammar_tokenizer: Any = None

    def matcher(self, grammar: str, stop_token_ids: tuple[int, ...]) -> Any:
        """An llguidance matcher that only lets this model emit text matching ``grammar``."""
        import llguidance
        import llguidance.hf
        from transformers import AutoTokenizer

        if self._grammar_tokenizer is None:
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            hf_tokenizer: Any = AutoTokenizer.from_pretrained(self.path)
            self._grammar_tokenizer = llguidance.hf.from_tokenizer(
                hf_tokenizer,
                n_vocab=vocab,
                eos_token=list(stop_token_ids) or None,
            )
        matcher = llguidance.LLMatcher(self._grammar_tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Any,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """One forward pass; returns the last position's logits ([B, V]), or with ``all_logits``
        every position's ([B, T, V], for prompt logprobs), and the grown cache."""
        kwargs: dict[str, Any] = {self.cache_arg: cache, "use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.keeps_last_logits and not all_logits:
            kwargs["logits_to_keep"] = 1  # a prefill needs no logits but the last position's
        out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        return (out.logits if all_logits else out.logits[:, -1, :]), out[self.cache_arg]


class ModelRegistry:
    def __init__(self, device: str, dtype: str, trust_remote_code: bool) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self._models: dict[str, LoadedModel] = {}

    def loaded(self) -> tuple[str, ...]:
        return tuple(self._models)

    def get(self, path: str) -> LoadedModel:
        found = self._models.get(path)
        return found if found is not None else self._load(path)

    def unload(self, path: str) -> bool:
        """Forget a loaded model and give its memory back. The caller makes sure nothing still
        uses it (no request in flight, no batch holding it)."""
        loaded = self._models.pop(path, None)
        if loaded is None:
            return False
        del loaded
        # Layers reference each other (modules, tied weights, hooks): a collection frees them now
        # rather than at some later allocation, and the CUDA allocator can then hand the blocks
        # back to the device.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("unloaded %s", path)
        return True

    def _load(self, path: str) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        started = time.monotonic()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        except Exception as exc:  # transformers raises many types for a bad folder
            raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
        model.to(self.device).eval()  # type: ignore[arg-type]
        config = model.config
        max_context = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048
        )
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        loaded = LoadedModel(path, model, self.device, max_context, cache_arg, "logits_to_keep" in params)
        self._models[path] = loaded
        log.info(
            "loaded %s on %s (%s) in %.2f s",
            path,
            self.device,
            self.dtype,
            time.monotonic() - started,
        )
        return loaded

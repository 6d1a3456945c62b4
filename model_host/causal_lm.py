"""A causal LM as the host runs it: the transformers model and the one forward pass the batch needs."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from model_host.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class CausalLM:
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

    @property
    def vocab_size(self) -> int:
        """Token ids the input embedding has rows for (an id past it would fail the whole batch)."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> CausalLM:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except Exception as exc:  # transformers raises many types for a bad folder
            raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
        model.to(device).eval()  # type: ignore[arg-type]
        config = model.config
        max_context = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048
        )
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        return cls(path, model, device, max_context, cache_arg, "logits_to_keep" in params)

    def close(self) -> None:
        self.model = None
        self._grammar_tokenizer = None

"""A causal LM as the host runs it: the transformers model and the one forward pass the batch needs."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from model_host.errors import ModelLoadError
from model_host.gemm_pack import GemmPacks, pack_linears
from model_host.lean_decode import LeanDecode, lean_decode_for

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
    # Linear weights packed for the decode step's row count (model_host.gemm_pack); None: plain.
    gemm: GemmPacks | None = None
    # Decode steps without transformers' module machinery (model_host.lean_decode); None: the
    # model's own forward.
    lean: LeanDecode | None = None
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
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """One forward pass over ``input_ids`` (or, for a prompt with images, ``inputs_embeds``);
        returns the last position's logits ([B, V]), or with ``all_logits`` every position's
        ([B, T, V], for prompt logprobs), and the grown cache."""
        if (
            self.lean is not None
            and inputs_embeds is None
            and attention_mask is not None
            and cache is not None  # a one-token prompt's prefill makes its cache in the model
            and input_ids.shape[1] == 1
            and not all_logits
        ):
            return self.lean(input_ids, attention_mask, position_ids, cache), cache
        kwargs: dict[str, Any] = {self.cache_arg: cache, "use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.keeps_last_logits and not all_logits:
            kwargs["logits_to_keep"] = 1  # a prefill needs no logits but the last position's
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        out = self.model(position_ids=position_ids, **kwargs)
        logits = out.logits if all_logits else out.logits[:, -1, :]
        # Placed across devices, the logits come off the last one; the batch lives on the first.
        return logits.to(self.device), out[self.cache_arg]

    def decoded(self, rows: int) -> None:
        """A decode step of ``rows`` rows ran: the packed weights follow the batch's size."""
        if self.gemm is not None:
            self.gemm.observe(rows)

    def packed_forward(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, layout: Any, keep: torch.Tensor
    ) -> torch.Tensor:
        """A mixed step's forward (``model_host.packed``): one packed row, attention switched to the
        packed implementation for this call only; returns the logits at ``keep`` ([K, V])."""
        from model_host.packed import IMPLEMENTATION

        if self.lean is not None and self.lean.packs:
            return self.lean.packed(ids, positions, cache, layout, keep)
        config = self.model.config
        usual = config._attn_implementation_internal
        config._attn_implementation_internal = IMPLEMENTATION
        try:
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask={"full_attention": layout},
                use_cache=True,
                logits_to_keep=keep,
                **{self.cache_arg: cache},
            )
        finally:
            config._attn_implementation_internal = usual
        return out.logits[0].to(self.device)

    def prompt_inputs(
        self, seqs: list[Any], ids: torch.Tensor, positions: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """What a prefill of ``seqs``' prompt tokens from ``start`` on (``ids``, left-padded) feeds
        the model: ids or embeddings, and positions. A text model reads the ids as they are; a
        vision-language model (``model_host.vision_lm``) puts its images in."""
        return ids, None, positions

    def decode_positions(self, seqs: list[Any], positions: torch.Tensor) -> torch.Tensor:
        """Position ids of a decode step for ``seqs`` (``positions``: each row's length, [B, 1])."""
        return positions

    @property
    def vocab_size(self) -> int:
        """Token ids the input embedding has rows for (an id past it would fail the whole batch)."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    @classmethod
    def load(
        cls,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        trust_remote_code: bool,
        placement: Placement | None = None,
        pack_weights: bool = False,
        lean_decode: bool = False,
    ) -> CausalLM:
        """Load onto ``device``; or, with a ``placement``, where accelerate's device map or
        tensor parallelism puts it (the batch then lives where the input embedding is). With
        ``pack_weights``, a float32 model on the CPU multiplies by packed weights in decode steps;
        with ``lean_decode``, a model of the Llama family runs them without transformers' module
        machinery (``model_host.lean_decode``)."""
        from transformers import AutoModelForCausalLM

        kwargs = placement.from_pretrained_kwargs() if placement is not None else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
            )
        except Exception as exc:  # transformers raises many types for a bad folder
            raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
        if placement is None:
            model.to(device).eval()  # type: ignore[arg-type]
        else:
            model.eval()
            device = next(model.get_input_embeddings().parameters()).device
            log.info("%s placed by %s: %s", path, placement.describe(), _placed_on(model))
        config = model.config
        max_context = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048
        )
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        packs = pack_linears(model, path) if pack_weights and placement is None else None
        lean = lean_decode_for(model, cache_arg, path) if lean_decode and placement is None else None
        return cls(
            path, model, device, max_context, cache_arg, "logits_to_keep" in params, gemm=packs, lean=lean
        )

    def close(self) -> None:
        if self.gemm is not None:
            self.gemm.unpack()
        self.model = None
        self.lean = None
        self._grammar_tokenizer = None


@dataclass(frozen=True)
class Placement:
    """How a model bigger than one device is spread: accelerate's ``device_map`` (layers placed
    across the GPUs and CPU memory, run one after the other) or tensor parallelism (every layer
    sharded over ``tp_size`` GPUs, one process each)."""

    device_map: str = ""
    tp_size: int = 1

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        if self.tp_size > 1:
            from transformers.distributed import DistributedConfig

            return {"distributed_config": DistributedConfig(tp_plan="auto")}
        return {"device_map": self.device_map}

    def describe(self) -> str:
        if self.tp_size > 1:
            return f"tensor parallelism over {self.tp_size} ranks"
        return f"device_map={self.device_map}"


def _placed_on(model: Any) -> str:
    """Where each part went, in a few words: accelerate's map grouped by device."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return str(model.get_input_embeddings().weight.device)
    by_device: dict[str, int] = {}
    for where in device_map.values():
        by_device[str(where)] = by_device.get(str(where), 0) + 1
    return ", ".join(f"{n} module(s) on {where}" for where, n in by_device.items())

"""Decode (and mixed) steps of the Llama family without transformers' module machinery.

A decode step runs the same few operators per layer as ``model(...)`` does, but through
``transformers`` each step also pays for module calls and their hooks, keyword plumbing, output
records, the config's attribute lookups and ``create_causal_mask``: on the tiny benchmark model
(2 layers) about a third of the step, on the small one (8 layers, 8 rows) about a tenth. Here the
same operators run in the same order on the same modules' weights (each norm and linear through
its own ``forward``, so packed weights are used as in the model), so the logits are bit for bit the
model's. That is checked when the model loads, on a padded and an unpadded batch; a model that
differs in any way keeps the model's forward.

Plain decode steps come here (one token per row, the last position's logits, a 2-D padding mask),
and mixed steps (``model_host.packed``) once they too are found bit-identical to the model's;
prefills and prompt logprobs keep the model's forward.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Architectures whose decoder layer is exactly: norm, q/k/v projections (Qwen3: per-head q/k
# norms), rotary, cache update, SDPA, o projection, residual, norm, gated MLP, residual.
_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class _Layer:
    index: int
    attention: Any  # the attention module: SDPA reads its GQA grouping from it
    input_norm: Any
    q: Any
    k: Any
    v: Any
    o: Any
    q_norm: Any  # None but on Qwen3
    k_norm: Any
    post_norm: Any
    gate: Any
    up: Any
    down: Any
    act: Any
    head_dim: int
    scaling: float


class LeanDecode:
    """Callable as ``lean(input_ids [B, 1], attention_mask [B, L], position_ids [B, 1], cache)``:
    the last position's logits [B, V]; the cache grows by one column as under the model."""

    def __init__(self, model: Any) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # Mixed steps too: set by ``model_host.packed.packing_works`` when this model's packed
        # forward and ``packed`` agree bit for bit.
        self.packs = False
        inner = model.model
        self._embed = inner.embed_tokens
        self._rotary = inner.rotary_emb
        self._norm = inner.norm
        self._head = model.lm_head
        self._attend = ALL_ATTENTION_FUNCTIONS["sdpa"]
        layers = list(inner.layers[: model.config.num_hidden_layers])
        # The rotary function of the model's own module (identical across the family, but the
        # model's copy is the one its forward runs). transformers wraps it in a module that may
        # dispatch to a hub kernel; its ``forward`` keeps that dispatch without a module call.
        rotate = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
        self._rotate = getattr(rotate, "forward", rotate)
        self._layers = [
            _Layer(
                i,
                layer.self_attn,
                layer.input_layernorm,
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
                getattr(layer.self_attn, "q_norm", None),
                getattr(layer.self_attn, "k_norm", None),
                layer.post_attention_layernorm,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
                layer.mlp.act_fn,
                layer.self_attn.head_dim,
                layer.self_attn.scaling,
            )
            for i, layer in enumerate(layers)
        ]

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        # What ``create_causal_mask`` gives SDPA for one query per row: nothing when no row is
        # padded, else each row's padding mask (every cached position precedes the query).
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        hidden = self._decoder(input_ids, position_ids, cache, mask, self._attend)
        return self._head.forward(hidden[:, -1, :])

    def packed(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, layout: Any, keep: torch.Tensor
    ) -> torch.Tensor:
        """A mixed step (``model_host.packed``): one packed row [1, T], its layout passed to the
        packed attention as the model's forward passes a mask mapping; the logits at ``keep``
        ([K, V]). Used once ``packing_works`` found them equal to the model's packed forward (or,
        where that does not take a mask mapping, close to the separate forwards)."""
        from model_host.packed import packed_attention

        hidden = self._decoder(ids, positions, cache, layout, packed_attention)
        return self._head.forward(hidden[:, keep, :])[0]

    def _decoder(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, mask: Any, attend: Any) -> Any:
        """The decoder's layers and final norm over ``ids`` [B, T]: hidden states [B, T, H]."""
        hidden = self._embed.forward(ids)
        cos, sin = self._rotary.forward(hidden, positions)
        rows, tokens = ids.shape
        for layer in self._layers:
            residual = hidden
            x = layer.input_norm.forward(hidden)
            shape = (rows, tokens, -1, layer.head_dim)
            q = layer.q.forward(x).view(shape)
            k = layer.k.forward(x).view(shape)
            if layer.q_norm is not None:
                q, k = layer.q_norm.forward(q), layer.k_norm.forward(k)
            q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = layer.v.forward(x).view(shape).transpose(1, 2)
            k, v = cache.update(k, v, layer.index)
            out, _ = attend(layer.attention, q, k, v, mask, dropout=0.0, scaling=layer.scaling)
            hidden = residual + layer.o.forward(out.reshape(rows, tokens, -1).contiguous())
            residual = hidden
            x = layer.post_norm.forward(hidden)
            hidden = residual + layer.down.forward(layer.act(layer.gate.forward(x)) * layer.up.forward(x))
        return self._norm.forward(hidden)


def lean_decode_for(model: Any, cache_arg: str, path: str) -> LeanDecode | None:
    """A ``LeanDecode`` for ``model`` when it is one of the family and its logits match the
    model's bit for bit on probe steps; else None (the model's forward serves every step)."""
    why = _unsupported(model, cache_arg)
    if why is None:
        try:
            lean = LeanDecode(model)
            if _agrees(model, lean):
                log.info("%s: decode steps run lean (model_host.lean_decode)", path)
                return lean
            why = "its logits differ from the model's forward"
        except Exception as exc:  # any surprise in the model's layout: the model's forward is right
            why = f"the probe failed ({type(exc).__name__})"
    log.info("%s: decode steps run the model's own forward (%s)", path, why)
    return None


def _unsupported(model: Any, cache_arg: str) -> str | None:
    config = model.config
    if config.model_type not in _MODEL_TYPES:
        return f"{config.model_type} is not of the Llama family"
    if cache_arg != "cache":
        return "a remote-code model"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention is {getattr(config, '_attn_implementation', None)!r}, not sdpa"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return "sliding-window layers"
    elif getattr(config, "sliding_window", None) is not None:
        return "a sliding window"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "hooks on its modules (placement, adapters)"
    return None


@torch.inference_mode()
def _agrees(model: Any, lean: LeanDecode) -> bool:
    """Two decode steps after a left-padded prefill of two rows, and two after a prefill of one
    row (no padding: SDPA runs without a mask), through the model and through ``lean``."""
    device = model.get_input_embeddings().weight.device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.arange(7, device=device).remainder(vocab).view(1, 7)
    for rows, pad in ((2, 3), (1, 0)):
        batch = ids.repeat(rows, 1)
        mask = torch.ones_like(batch)
        mask[1:, :pad] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=batch, attention_mask=mask, position_ids=positions, use_cache=True)
        theirs, ours = out["cache"], copy.deepcopy(out["cache"])
        token = out.logits[:, -1].max(dim=-1).indices[:, None]
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            positions = positions[:, -1:] + 1
            step = model(
                input_ids=token, attention_mask=mask, position_ids=positions, cache=theirs, use_cache=True
            )
            expected = step.logits[:, -1]
            if not torch.equal(lean(token, mask, positions, ours), expected):
                return False
            token = expected.max(dim=-1).indices[:, None]
    return True

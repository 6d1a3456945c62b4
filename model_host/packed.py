"""Mixed steps: a running batch's decode and a group of new prompts in one forward pass.

On a CPU a decode step of 32 rows costs a third of a 256-token prefill (it reads every weight
for little arithmetic), so a step that admits prompts pays for reading the weights twice. Packing
both into one forward lets the decode rows ride on the prefill's matrix products (measured in
docs/design.md). The forward takes one row of tokens: the decode rows' last tokens first, then
every new prompt's tokens, each with its own position. Two pieces make attention right for each:

- ``PackedCache.update`` writes the decode rows' new keys and values into the batch's cache (the
  in-place layer, as a decode step does) and lays the prompts' out left-padded, as a batched
  prefill would have made them, for the new rows' cache;
- ``packed_attention`` (registered with ``transformers`` as an attention implementation, switched
  on for the packed forward only) runs one attention call for the decode rows over their cache and
  one causal call for the prompts over their own keys, and puts the outputs back in packed order.

Only models whose attention layers all read the whole context (no sliding windows, no recurrent
state) and whose forward hands the cache's ``update`` result to the attention function take part;
``PackedStep.check`` compares a packed step with the separate forwards when the model loads, and a
model that does not give the same logits keeps the separate forwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

log = logging.getLogger(__name__)

IMPLEMENTATION = "hfserve_packed"


@dataclass
class PackedLayout:
    """Where each token of the packed row belongs. Passed to the attention function as its
    ``attention_mask`` (the model hands masks to attention untouched when given a mapping)."""

    decode_rows: int
    decode_mask: torch.Tensor  # [B, 1, 1, T] bool: each decode row's real cache columns
    prompt_rows: int
    width: int  # the longest prompt: the prompts' attention runs padded to it
    slots: torch.Tensor  # [S] where each prompt token sits in the flattened [G * W] padded layout
    prompt_mask: torch.Tensor  # [G, 1, W, W] bool: causal over each prompt's real tokens
    real: torch.Tensor  # [G, W] bool: the prompts' real (not padding) columns
    # Prompts continued from a cache of their own (a chunk of a long prompt, the rest of a prompt
    # whose start was in the prefix cache), after the new prompts: each one's span in the packed
    # row, its cache, and its causal mask over that cache and its new tokens.
    continued: list[tuple[slice, Any, torch.Tensor]] = field(default_factory=list)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """[H, S, D] prompt part of the packed row -> [G, H, W, D], left-padded with zeros."""
        heads, _, dim = packed.shape
        out = packed.new_zeros((heads, self.prompt_rows * self.width, dim))
        out[:, self.slots] = packed
        return out.view(heads, self.prompt_rows, self.width, dim).transpose(0, 1)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[G, H, W, D] -> [S, H, D], the prompt tokens in packed order."""
        rows, heads, width, dim = padded.shape
        return padded.transpose(1, 2).reshape(rows * width, heads, dim)[self.slots]


def layout_for(decode_mask_2d: torch.Tensor, prompt_lengths: list[int]) -> PackedLayout:
    device = decode_mask_2d.device
    width = max(prompt_lengths, default=1)
    spans = [
        torch.arange(g * width + width - n, (g + 1) * width, device=device)
        for g, n in enumerate(prompt_lengths)
    ]
    slots = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long, device=device)
    lengths = torch.tensor(prompt_lengths, device=device)
    real = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]  # [G, W]
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    # A padding query attends to itself only: a row with nothing to attend to would be NaN.
    mask = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
    return PackedLayout(
        decode_rows=decode_mask_2d.shape[0],
        decode_mask=decode_mask_2d.bool()[:, None, None, :],
        prompt_rows=len(prompt_lengths),
        width=width,
        slots=slots,
        prompt_mask=mask[:, None],
        real=real,
    )


class PackedCache(DynamicCache):
    """The cache a packed forward writes: the running batch's layers for the decode rows, and new
    left-padded layers for the prompts (``prompt_layers``, the new rows' cache afterwards)."""

    def __init__(self, batch_cache: Any, layout: PackedLayout) -> None:
        super().__init__()
        self.batch_cache = batch_cache
        self.layout = layout
        self.prompt_layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(  # type: ignore[override]
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        rows = self.layout.decode_rows
        # [1, H, N, D] -> the decode rows' column [B, H, 1, D], appended in place
        keys, values = self.batch_cache.layers[layer_idx].update(
            key_states[0, :, :rows].transpose(0, 1)[:, :, None],
            value_states[0, :, :rows].transpose(0, 1)[:, :, None],
        )
        fresh = slice(rows, rows + int(self.layout.slots.shape[0]))
        prompt_keys = self.layout.pad(key_states[0, :, fresh])
        prompt_values = self.layout.pad(value_states[0, :, fresh])
        self.prompt_layers.append((prompt_keys, prompt_values))
        continued = [
            cache.update(key_states[:, :, span], value_states[:, :, span], layer_idx)
            for span, cache, _ in self.layout.continued
        ]
        continued_keys, continued_values = [k for k, _ in continued], [v for _, v in continued]
        return (keys, prompt_keys, continued_keys), (values, prompt_values, continued_values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions and masks are given: nothing asks


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for a packed row: query [1, Hq, N, D]; ``key``/``value`` as ``PackedCache``
    returned them; returns [1, N, Hq, D] as ``transformers``' attention functions do."""
    layout: PackedLayout = attention_mask
    decode_keys, prompt_keys, continued_keys = key
    decode_values, prompt_values, continued_values = value
    rows = layout.decode_rows
    q = query[0]  # [Hq, N, D]
    out = q.new_empty((q.shape[1], q.shape[0], q.shape[2]))  # [N, Hq, D]
    gqa = q.shape[0] != decode_keys.shape[1]
    decoded = F.scaled_dot_product_attention(
        q[:, :rows].transpose(0, 1)[:, :, None],  # [B, Hq, 1, D]
        decode_keys,
        decode_values,
        attn_mask=layout.decode_mask,
        scale=scaling,
        enable_gqa=gqa,
    )
    out[:rows] = decoded[:, :, 0]
    fresh = slice(rows, rows + int(layout.slots.shape[0]))
    if layout.prompt_rows:
        prompted = F.scaled_dot_product_attention(
            layout.pad(q[:, fresh]),  # [G, Hq, W, D]
            prompt_keys,
            prompt_values,
            attn_mask=layout.prompt_mask,
            scale=scaling,
            enable_gqa=gqa,
        )
        out[fresh] = layout.unpad(prompted)
    for (span, _, mask), keys, values in zip(layout.continued, continued_keys, continued_values, strict=True):
        attended = F.scaled_dot_product_attention(
            q[None, :, span], keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa
        )  # [1, Hq, L, D]
        out[span] = attended[0].transpose(0, 1)
    return out[None], None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, packed_attention)


def packed_step(
    batch: Any, seqs: list[Any], continued: tuple[tuple[Any, int], ...] = ()
) -> tuple[torch.Tensor, list[tuple[Any, torch.Tensor]]]:
    """One forward for ``batch``'s decode step, the prefill of the new prompts ``seqs``, and the next
    ``n`` tokens of each ``(seq, n)`` in ``continued`` (prompts with a cache of their own: a chunk
    of a long prompt, the rest of a prompt found in the prefix cache). Returns the decode rows'
    logits [B, V], and a batch with last-position logits for the new prompts (one batch) and for
    each continued prompt that is now whole."""
    from model_host.batch import DecodeBatch
    from model_host.sampling import SamplingBatch

    model, device = batch.model, batch.model.device
    rows, lengths = len(batch.seqs), [len(s.prompt) for s in seqs]
    tokens = [s.generated[-1] for s in batch.seqs] + [t for s in seqs for t in s.prompt]
    positions = [batch.lengths, *(torch.arange(n, device=device) for n in lengths)]
    batch.attention_mask = torch.cat(
        [batch.attention_mask, torch.ones((rows, 1), dtype=torch.long, device=device)], dim=-1
    )
    layout = layout_for(batch.attention_mask, lengths)
    keep = [*range(rows), *(rows + int(e) - 1 for e in torch.tensor(lengths, dtype=torch.long).cumsum(0))]
    for seq, n in continued:
        start, end = seq.prefilled, min(len(seq.prompt), seq.prefilled + n)
        at = len(tokens)
        tokens += seq.prompt[start:end]
        positions.append(torch.arange(start, end, device=device))
        if seq.prefill_cache is None:
            seq.prefill_cache = DynamicCache()
        causal = torch.ones((end - start, end), dtype=torch.bool, device=device).tril(diagonal=start)
        layout.continued.append((slice(at, len(tokens)), seq.prefill_cache, causal))
        keep.append(len(tokens) - 1)
    ids = torch.tensor([tokens], device=device)
    cache = PackedCache(batch.cache, layout)
    at_keep = torch.tensor(keep, device=device)
    try:
        logits = model.packed_forward(ids, torch.cat(positions)[None], cache, layout, at_keep)
    except Exception:
        _undo_column(batch)
        raise
    batch.lengths = batch.lengths + 1
    done: list[tuple[Any, torch.Tensor]] = []
    if seqs:
        params, prompts, matchers = (
            [s.params for s in seqs],
            [s.prompt for s in seqs],
            [s.matcher for s in seqs],
        )
        sampling = SamplingBatch.build(params, prompts, logits.shape[-1], device, matchers)
        new = DecodeBatch(
            model, seqs, DynamicCache(ddp_cache_data=cache.prompt_layers), layout.real.long(), sampling
        )
        done.append((new, logits[rows : rows + len(seqs)]))
    for i, (seq, n) in enumerate(continued):
        seq.prefilled = min(len(seq.prompt), seq.prefilled + n)
        if seq.prefilled < len(seq.prompt):
            continue  # a chunk of a long prompt: more next step
        mask = torch.ones((1, seq.prefilled), dtype=torch.long, device=device)
        sampling = SamplingBatch.build([seq.params], [seq.prompt], logits.shape[-1], device, [seq.matcher])
        own, seq.prefill_cache = seq.prefill_cache, None
        at = rows + len(seqs) + i
        done.append((DecodeBatch(model, [seq], own, mask, sampling), logits[at : at + 1]))
    return logits[:rows], done


def _undo_column(batch: Any) -> None:
    """Take back the decode column a failed packed forward added (to the mask, and to the layers
    it reached), so the batch can decode as if the step had not been tried."""
    width = batch.attention_mask.shape[1] - 1
    batch.attention_mask = batch.attention_mask[:, :width]
    for layer in batch.cache.layers:
        if layer.keys is not None and layer.keys.shape[-2] > width:
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]


def packing_works(model: Any) -> bool:
    """Whether packed steps give this model's logits: a packed step is compared with the separate
    decode and prefill it replaces (and the step after it, which reads the cache it wrote), on a
    few tokens, when the model loads. Any error or difference keeps the separate forwards. A
    model with a lean decode step (``model_host.lean_decode``) runs its mixed steps that way too
    when they equal the model's packed forward bit for bit (or, for a model whose forward cannot
    take the packed row, when they are as close to the separate forwards)."""
    import torch.distributed as dist

    from model_host.batch import DecodeBatch, Sequence
    from model_host.ipc.messages import SamplingParams

    placed = {str(d) for d in (getattr(model.model, "hf_device_map", None) or {}).values()}
    if len(placed) > 1 or (dist.is_available() and dist.is_initialized()):
        return False  # layers on several devices, or ranks that must decide alike: not yet
    register()
    params = SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=())
    vocab = min(int(model.vocab_size), 1000)
    gen = torch.Generator().manual_seed(0)
    running = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (3, 9, 5)]
    arriving = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (4, 11)]
    chunked = [torch.randint(1, vocab, (12,), generator=gen).tolist()]  # 5 tokens in, 7 to come

    def seqs(prompts: list[list[int]], first: int) -> list[Any]:
        return [Sequence((-1, first + i), model.path, list(p), params) for i, p in enumerate(prompts)]

    def probe(packed: bool) -> tuple[torch.Tensor, ...]:
        """The step's logits: decode rows, new prompts, the chunk; then the next decode's."""
        batch, logits = DecodeBatch.prefill(model, seqs(running, 0))
        batch.sample(logits)
        if not batch.joinable:
            raise ValueError("its cache cannot join rows")
        batch.sample(batch.decode())
        new = seqs(arriving, len(running))
        (rest,) = seqs(chunked, 10)
        DecodeBatch.prefill_chunk(model, rest, 5)  # a prompt part-way in, with its own cache
        if packed:
            decoded, done = packed_step(batch, new, ((rest, 7),))
        else:
            decoded, whole = batch.decode(), DecodeBatch.prefill_chunk(model, rest, 7)
            assert whole is not None
            done = [DecodeBatch.prefill(model, new), whole]
        batch.sample(decoded)
        for joining, first in done:
            joining.sample(first)
            batch.concatenate(joining)
        return (decoded, *(first for _, first in done), batch.decode())

    tolerance = 1e-3 if next(model.model.parameters()).dtype == torch.float32 else 5e-2

    def close(ref: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> bool:
        return all(
            r.shape == g.shape and float((r - g).abs().max()) <= tolerance * max(1.0, float(r.abs().max()))
            for r, g in zip(ref, got, strict=True)
        )

    failures: list[str] = []

    def attempt(packed: bool) -> tuple[torch.Tensor, ...] | None:
        try:
            with torch.inference_mode():
                return probe(packed)
        except Exception as exc:  # a model whose forward does not take the packed row
            failures.append(f"{type(exc).__name__}: {exc}")
            return None

    separate = attempt(False)
    own = attempt(True) if separate is not None else None  # the model's forward, packed attention
    own_packs = separate is not None and own is not None and close(separate, own)
    lean = getattr(model, "lean", None)  # model_host.lean_decode: its own packed step
    if lean is not None and separate is not None:
        lean.packs = True
        mine = attempt(True)
        # Bit-identical to the model's packed forward where that works; else (a model whose
        # forward does not hand the layout to attention) as close to the separate forwards.
        lean.packs = mine is not None and (
            all(torch.equal(a, b) for a, b in zip(own, mine, strict=True))
            if own is not None and own_packs
            else close(separate, mine)
        )
        if own_packs and not lean.packs:
            log.info("%s: mixed steps run the model's own forward (the lean step differs)", model.path)
        if lean.packs:
            return True
    if not own_packs:
        why = failures[0] if failures else "their logits differ from separate forwards"
        log.info("%s: mixed steps off (%s)", model.path, why)
    return own_packs

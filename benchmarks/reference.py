"""In-process references a server is measured against: ``model.generate()`` on a static batch (the
ceiling the issue names) and the bare decode loop (the model's forward plus argmax on a KV cache,
nothing else: what a step could cost if serving added nothing)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


def _rows(folder: Path, prompts: list[str], batch: int) -> tuple[Any, Any, Any]:
    """The model, and the first ``batch`` prompts as chat prompts, left-padded: ids and mask."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = (folder / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = []
    for p in prompts[:batch]:
        (text,), _ = render_jinja_template(
            [[{"role": "user", "content": p}]], chat_template=template, add_generation_prompt=True
        )
        rows.append(tok.encode(text, add_special_tokens=False).ids)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return model, ids, mask


# Each reference is the median of this many timed runs: one run of a 2-second batch swung by
# +-10 % on the shared 2-core machine from one minute to the next.
REPEATS = 3


def _median_run(run: Any, repeats: int) -> tuple[float, list[float]]:
    """Seconds of ``run()``: the median of ``repeats`` timed calls, and each call's."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def ceiling(
    folder: Path, prompts: list[str], batch: int, new_tokens: int, repeats: int = REPEATS
) -> dict[str, Any]:
    """Output tokens/s of one static batch through ``model.generate()`` in this process (the
    median of ``repeats`` runs)."""
    import torch

    model, ids, mask = _rows(folder, prompts, batch)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], **kwargs)  # warm-up
        elapsed, runs = _median_run(
            lambda: model.generate(input_ids=ids, attention_mask=mask, **kwargs), repeats
        )
    return {
        "batch": batch,
        "seconds": elapsed,
        "runs_s": runs,
        "output_throughput": batch * new_tokens / elapsed,
        "params": sum(p.numel() for p in model.parameters()),
    }


def bare_loop(
    folder: Path, prompts: list[str], batch: int, new_tokens: int, repeats: int = REPEATS
) -> dict[str, Any]:
    """Output tokens/s of the bare decode loop: one prefill of the left-padded batch, then
    ``new_tokens - 1`` forward passes of one token per row on the grown cache, each followed by an
    argmax; the mask and positions are extended by hand. What ``generate()`` does, without its
    logits processors, stopping criteria and bookkeeping. The median of ``repeats`` runs."""
    import torch

    model, ids, mask = _rows(folder, prompts, batch)

    def run(ids: Any, mask: Any) -> None:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache, last = out.cache, out.logits[:, -1].argmax(-1)
        lengths = mask.sum(-1)
        ones = torch.ones((ids.shape[0], 1), dtype=mask.dtype)
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, ones], dim=-1)
            out = model(
                input_ids=last[:, None],
                attention_mask=mask,
                position_ids=lengths[:, None],
                cache=cache,
                use_cache=True,
            )
            cache, last = out.cache, out.logits[:, -1].argmax(-1)
            lengths = lengths + 1

    with torch.inference_mode():
        run(ids[:2], mask[:2])  # warm-up
        elapsed, runs = _median_run(lambda: run(ids, mask), repeats)
    return {
        "batch": batch,
        "seconds": elapsed,
        "runs_s": runs,
        "output_throughput": batch * new_tokens / elapsed,
    }

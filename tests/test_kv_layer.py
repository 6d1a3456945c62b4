"""The in-place KV layer against the plain tensors it stands for: a random life of steps, joins and
leaves must leave exactly the keys and values that concatenating and selecting rows would, while
copying only what moves."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from model_host.kv_layer import GrowableLayer

HEADS, DIM = 2, 4


def _block(rows: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, HEADS, width, DIM, generator=gen), torch.randn(
        rows, HEADS, width, DIM, generator=gen
    )


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[2], 0))


def _leave(rows: int, keep: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """What ``DecodeBatch.filter`` does: the new row order, and the moves that make it."""
    n, kept = len(keep), set(keep)
    holes = [i for i in range(n) if i not in kept]
    moves = list(zip([i for i in keep if i >= n], holes, strict=True))
    order = list(range(n))
    for src, dst in moves:
        order[dst] = src
    return order, moves


@torch.inference_mode()  # as the host runs its steps
def test_steps_joins_and_leaves_match_plain_tensors() -> None:
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    keys, values = _block(3, 5, gen)
    plain = DynamicLayer()
    plain.keys, plain.values, plain.is_initialized = keys.clone(), values.clone(), True
    layer = GrowableLayer.adopt(plain)
    ref_k, ref_v = keys.clone(), values.clone()
    in_place = 0
    for _ in range(300):
        rows, width = ref_k.shape[0], ref_k.shape[2]
        action = rng.random()
        if action < 0.6:  # a step: one column for every row
            col_k, col_v = _block(rows, 1, gen)
            got_k, got_v = layer.update(col_k, col_v)
            ref_k, ref_v = torch.cat([ref_k, col_k], 2), torch.cat([ref_v, col_v], 2)
            assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        elif action < 0.8 or rows == 1:  # a group joins, its prompts sometimes longer than the cache
            new_k, new_v = _block(rng.randint(1, 4), rng.randint(1, width + 20), gen)
            joined = max(width, new_k.shape[2])
            before = layer._keys_buf
            layer.join(new_k, new_v, joined)
            in_place += layer._keys_buf is before
            ref_k = torch.cat([_pad_left(ref_k, joined), _pad_left(new_k, joined)])
            ref_v = torch.cat([_pad_left(ref_v, joined), _pad_left(new_v, joined)])
        else:  # some rows leave, and the first columns when no row needs them
            keep = sorted(rng.sample(range(rows), rng.randint(1, rows - 1)))
            lead = rng.randint(0, 2)
            order, moves = _leave(rows, keep)
            before = layer._keys_buf
            if layer.compact(moves, len(keep), lead):
                assert layer._keys_buf is before or len(keep) * 2 < before.shape[0]  # type: ignore[union-attr]
            else:  # not in its buffer yet: the caller selects, as DecodeBatch.filter does
                layer.keys = layer.keys[:, :, lead:][order]  # type: ignore[index]
                layer.values = layer.values[:, :, lead:][order]  # type: ignore[index]
            ref_k, ref_v = ref_k[order][:, :, lead:], ref_v[order][:, :, lead:]
        assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)  # type: ignore[arg-type]
    assert in_place > 20  # most joins wrote only the new rows


def test_a_view_cut_by_someone_else_is_written_after_its_end() -> None:
    """A failed mixed step takes its column back by slicing ``keys``; the next step's column goes
    where the cut view ends."""
    gen = torch.Generator().manual_seed(1)
    layer = GrowableLayer()
    k, v = _block(2, 6, gen)
    layer.update(k, v)
    col_k, col_v = _block(2, 1, gen)
    layer.update(col_k, col_v)
    layer.keys, layer.values = layer.keys[:, :, :6], layer.values[:, :, :6]  # type: ignore[index]
    again_k, again_v = _block(2, 1, gen)
    got_k, _ = layer.update(again_k, again_v)
    assert torch.equal(got_k, torch.cat([k, again_k], 2))


def test_rows_leave_and_join_outside_inference_mode() -> None:
    """The host fills the cache under ``torch.inference_mode``; an abort arrives outside it and
    must still move rows in place (it crashed the host once)."""
    gen = torch.Generator().manual_seed(2)
    layer = GrowableLayer()
    with torch.inference_mode():
        k, v = _block(4, 6, gen)
        layer.update(k, v)
    assert layer.compact([(3, 1)], 2, 0)
    assert torch.equal(layer.keys, k[[0, 3]])  # type: ignore[arg-type]
    new_k, new_v = _block(1, 6, gen)
    layer.join(new_k, new_v, 6)
    assert torch.equal(layer.keys, torch.cat([k[[0, 3]], new_k]))  # type: ignore[arg-type]

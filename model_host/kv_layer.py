"""A KV cache layer that a decode step writes in place.

``transformers``' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``, which copies
the whole cache of every layer on every step, a cost that grows with the context (measured in
docs/design.md: 1.10x on the engine with 600-token prompts, about even with 40-token ones).
``GrowableLayer`` keeps them in a buffer with room to spare and writes
each step's column into it; ``keys`` and ``values`` are views of the filled part, so everything
that reads a ``DynamicLayer`` (attention, masks, ``get_seq_length``, the batch's ``filter`` and
``concatenate``, the prefix cache) reads it unchanged. When the room runs out, or when the batch
replaced ``keys``/``values`` with new tensors (a row joined or left), the next step copies once
into a new buffer with room again: the copy ``torch.cat`` made every step, made every ~64 steps.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

_MIN_ROOM_TOKENS = 64  # spare columns after a (re)allocation: one copy per this many steps at most


class GrowableLayer(DynamicLayer):
    _keys_buf: torch.Tensor | None = None
    _values_buf: torch.Tensor | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> GrowableLayer:
        """The same layer, same tensors, growing in place from its next update on."""
        grown = cls.__new__(cls)
        grown.__dict__.update(layer.__dict__)
        return grown

    def _in_buffer(self, keys: torch.Tensor, values: torch.Tensor, batch: int, needed: int) -> bool:
        buf, vbuf = self._keys_buf, self._values_buf
        return (
            buf is not None
            and vbuf is not None
            and keys.dim() == 4
            and keys.data_ptr() == buf.data_ptr()
            and values.data_ptr() == vbuf.data_ptr()
            and buf.shape[0] == batch
            and buf.shape[-2] >= needed
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        filled = keys.shape[-2] if keys.dim() == 4 else 0
        end = filled + key_states.shape[-2]
        if not self._in_buffer(keys, values, key_states.shape[0], end):
            room = max(_MIN_ROOM_TOKENS, end // 8)
            (batch, heads, _, dim), value_dim = key_states.shape, value_states.shape[-1]
            self._keys_buf = key_states.new_empty((batch, heads, end + room, dim))
            self._values_buf = value_states.new_empty((batch, heads, end + room, value_dim))
            if filled:
                self._keys_buf[:, :, :filled] = keys
                self._values_buf[:, :, :filled] = values
        assert self._keys_buf is not None and self._values_buf is not None
        self._keys_buf[:, :, filled:end] = key_states
        self._values_buf[:, :, filled:end] = value_states
        self.keys = self._keys_buf[:, :, :end]
        self.values = self._values_buf[:, :, :end]
        return self.keys, self.values

    def join(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Append the rows ``keys``/``values`` (another batch's, [B2, H, T2, D]) below this layer's
        rows, both left-padded to ``width`` columns, straight into a new buffer with room: one copy
        of each side, where concatenating and then re-buffering at the next step made two."""
        mine_k, mine_v = self.keys, self.values
        assert mine_k is not None and mine_v is not None
        rows = mine_k.shape[0]
        room = max(_MIN_ROOM_TOKENS, width // 8)
        bufs = []
        for mine, theirs in ((mine_k, keys), (mine_v, values)):
            batch, heads, _, dim = mine.shape
            buf = mine.new_empty((batch + theirs.shape[0], heads, width + room, dim))
            for part, src in ((buf[:rows], mine), (buf[rows:], theirs)):
                pad = width - src.shape[-2]
                part[:, :, :pad].zero_()  # masked out, but never garbage (0 x NaN is NaN)
                part[:, :, pad:width] = src
            bufs.append(buf)
        self._keys_buf, self._values_buf = bufs
        self.keys, self.values = bufs[0][:, :, :width], bufs[1][:, :, :width]

    def reset(self) -> None:
        self._keys_buf = self._values_buf = None
        super().reset()

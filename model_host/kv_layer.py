"""A KV cache layer that decode steps, joins and leaves change in place.

``transformers``' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``, which copies
the whole cache of every layer on every step, a cost that grows with the context (measured in
docs/design.md: 1.10x on the engine with 600-token prompts, about even with 40-token ones).
``GrowableLayer`` keeps them in a buffer with room to spare on every side: rows below the batch's
for requests that join, columns to the right for the next steps, columns to the left for a joining
prompt longer than the batch's cache. ``keys`` and ``values`` are views of the filled block, so
everything that reads a ``DynamicLayer`` (attention, masks, ``get_seq_length``, the prefix cache)
reads it unchanged.

- A step writes its column (``update``).
- Rows that join are written into the free rows below (``join``): only their own KV is copied.
- Rows that leave are replaced by the batch's last rows (``compact``): only the rows that move are
  copied, and padding columns no remaining row needs are dropped by moving the view's start.

When the room runs out, or when something else replaced ``keys``/``values`` (a view that no longer
starts where the buffer's block does), the layer copies once into a new buffer with room again.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

# Spare room after a (re)allocation, an eighth at least: columns on the right for the next steps
# (one copy per this many steps at most), columns on the left for a joining prompt longer than the
# batch's cache, rows below for the next joins.
_MIN_ROOM_TOKENS = 64
_MIN_ROOM_ROWS = 2


def _room(width: int) -> int:
    return max(_MIN_ROOM_TOKENS, width // 8)


def _rows_with_room(rows: int) -> int:
    return rows + max(_MIN_ROOM_ROWS, rows // 8)


class GrowableLayer(DynamicLayer):
    _keys_buf: torch.Tensor | None = None
    _values_buf: torch.Tensor | None = None
    _start = 0  # the buffer column where the filled block begins

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> GrowableLayer:
        """The same layer, same tensors, growing in place from its next update on."""
        grown = cls.__new__(cls)
        grown.__dict__.update(layer.__dict__)
        return grown

    def _in_buffer(self) -> bool:
        """Whether ``keys``/``values`` are still this layer's views of its buffer."""
        kb, vb, keys, values = self._keys_buf, self._values_buf, self.keys, self.values
        return (
            kb is not None
            and vb is not None
            and keys is not None
            and values is not None
            and keys.dim() == 4
            and keys.shape[0] <= kb.shape[0]
            and keys.stride() == kb.stride()
            and values.stride() == vb.stride()
            and keys.data_ptr() == kb[0, 0, self._start].data_ptr()
            and values.data_ptr() == vb[0, 0, self._start].data_ptr()
        )

    def _place(
        self, rows_cap: int, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int, new: int = 0
    ) -> None:
        """Copy ``parts`` (keys/values blocks of rows, stacked in order, each left-padded to
        ``width`` columns) into a new buffer of ``rows_cap`` rows with room on both sides, and
        ``new`` more columns on the right."""
        first_k, first_v = parts[0]
        rows = sum(k.shape[0] for k, _ in parts)
        left, right = _MIN_ROOM_TOKENS, _room(width) + new
        heads, dim, value_dim = first_k.shape[1], first_k.shape[-1], first_v.shape[-1]
        kb = first_k.new_empty((max(rows_cap, rows), heads, left + width + right, dim))
        vb = first_v.new_empty((max(rows_cap, rows), heads, left + width + right, value_dim))
        row = 0
        for keys, values in parts:
            n, pad = keys.shape[0], width - keys.shape[-2]
            for buf, src in ((kb, keys), (vb, values)):
                buf[row : row + n, :, left : left + pad].zero_()  # masked out, but never garbage
                buf[row : row + n, :, left + pad : left + width] = src
            row += n
        self._keys_buf, self._values_buf, self._start = kb, vb, left
        self.keys, self.values = kb[:rows, :, left : left + width], vb[:rows, :, left : left + width]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        rows, new = key_states.shape[0], key_states.shape[-2]
        filled = keys.shape[-2] if keys.dim() == 4 else 0
        kb = self._keys_buf
        fits = (
            self._in_buffer()
            and kb is not None
            and keys.shape[0] == rows
            and self._start + filled + new <= kb.shape[-2]
        )
        if not fits:
            rows_cap = max(rows, kb.shape[0] if kb is not None else 0)
            if filled:
                self._place(rows_cap, [(keys, values)], filled, new)
            else:
                self._place(rows_cap, [(key_states[:, :, :0], value_states[:, :, :0])], 0, new)
        kb, vb = self._keys_buf, self._values_buf
        assert kb is not None and vb is not None
        begin, end = self._start + filled, self._start + filled + new
        kb[:rows, :, begin:end] = key_states
        vb[:rows, :, begin:end] = value_states
        self.keys, self.values = kb[:rows, :, self._start : end], vb[:rows, :, self._start : end]
        return self.keys, self.values

    @torch.inference_mode()  # the buffers are inference tensors; an abort comes from outside it
    def join(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Append the rows ``keys``/``values`` (another batch's, [B2, H, T2, D]) below this layer's
        rows, both left-padded to ``width`` columns. In place when the buffer has the rows and the
        columns to the left: only the new rows are copied. Otherwise both sides are copied once
        into a new buffer, with rows to spare for the next joins."""
        mine_k, mine_v = self.keys, self.values
        assert mine_k is not None and mine_v is not None
        rows, theirs = mine_k.shape[0], keys.shape[0]
        kb, vb = self._keys_buf, self._values_buf
        start = self._start + mine_k.shape[-2] - width  # where the joined block begins
        in_place = self._in_buffer() and kb is not None and rows + theirs <= kb.shape[0] and start >= 0
        if not in_place or kb is None or vb is None:
            self._place(_rows_with_room(rows + theirs), [(mine_k, mine_v), (keys, values)], width)
            return
        end = self._start + mine_k.shape[-2]
        for buf, src in ((kb, keys), (vb, values)):
            buf[:rows, :, start : self._start].zero_()  # my rows' new padding, if the block widened
            pad = width - src.shape[-2]
            buf[rows : rows + theirs, :, start : start + pad].zero_()
            buf[rows : rows + theirs, :, start + pad : end] = src
        self._start = start
        self.keys, self.values = kb[: rows + theirs, :, start:end], vb[: rows + theirs, :, start:end]

    @torch.inference_mode()
    def compact(self, moves: list[tuple[int, int]], rows: int, lead: int) -> bool:
        """Keep the first ``rows`` rows after copying row ``src`` into row ``dst`` for each of
        ``moves``, and drop the first ``lead`` columns. False (nothing changed) when the layer is
        not in its buffer: the caller selects the rows itself."""
        if not self._in_buffer():
            return False
        kb, vb, keys = self._keys_buf, self._values_buf, self.keys
        assert kb is not None and vb is not None and keys is not None
        end = self._start + keys.shape[-2]
        for src, dst in moves:
            kb[dst, :, self._start : end] = kb[src, :, self._start : end]
            vb[dst, :, self._start : end] = vb[src, :, self._start : end]
        self._start += lead
        if rows * 2 < kb.shape[0] and kb.shape[0] > 8:  # most rows left: give the memory back
            block = (kb[:rows, :, self._start : end], vb[:rows, :, self._start : end])
            self._place(_rows_with_room(rows), [block], end - self._start)
            return True
        self.keys, self.values = kb[:rows, :, self._start : end], vb[:rows, :, self._start : end]
        return True

    def reset(self) -> None:
        self._keys_buf = self._values_buf = None
        self._start = 0
        super().reset()

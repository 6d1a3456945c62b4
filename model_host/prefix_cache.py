"""Prefix caching: the KV of finished requests, kept so that a new prompt which starts the same way
(the next turn of a conversation, a shared system prompt, an agent's growing transcript) is
prefilled only from where it differs.

Entries are whole sequences (prompt and reply), per model, evicted least recently used within a
byte budget. A sequence that extends a stored one replaces it, so a conversation keeps one entry.
Only models whose caches are plain ``DynamicLayer`` tensors take part (the same condition as
joining a batch): their KV can be cut at any length and continued.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, [1, heads, tokens, dim]


@dataclass
class _Entry:
    model_path: str
    tokens: torch.Tensor  # [tokens] long, on the CPU
    layers: Layers
    nbytes: int


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


class PrefixCache:
    def __init__(self, capacity_bytes: int, min_tokens: int = 16) -> None:
        self.capacity_bytes = capacity_bytes
        self.min_tokens = min_tokens  # shorter matches are not worth a separate prefill pass
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        # Entries by model and first ``min_tokens`` tokens: a prompt is compared only with the
        # few that could match it, however many are stored.
        self._by_head: dict[tuple[str, tuple[int, ...]], set[int]] = {}
        self._next_key = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, model_path: str, tokens: list[int], layers: Layers) -> None:
        """Keep the KV of ``tokens`` (one row, exactly ``len(tokens)`` positions)."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if len(tokens) < self.min_tokens or nbytes > self.capacity_bytes:
            return
        ids = torch.tensor(tokens, dtype=torch.long)
        head = self._head(model_path, tokens)
        for key in list(self._by_head.get(head, ())):
            shared = _common_prefix(self._entries[key].tokens, ids)
            if shared == len(ids):  # already covered by a longer (or the same) sequence
                self._entries.move_to_end(key)
                return
            if shared == self._entries[key].tokens.shape[0]:  # the new sequence extends this one
                self._drop(key)
        self._entries[self._next_key] = _Entry(model_path, ids, layers, nbytes)
        self._by_head.setdefault(head, set()).add(self._next_key)
        self._next_key += 1
        self.nbytes += nbytes
        while self.nbytes > self.capacity_bytes:
            self._drop(next(iter(self._entries)))

    def match(self, model_path: str, prompt: list[int]) -> tuple[int, Layers] | None:
        """The longest stored prefix of ``prompt``, as the number of tokens and their KV. At least
        the prompt's last token is left out, so that prefilling the rest gives the logits that
        pick the first new token."""
        if not self._entries or len(prompt) <= self.min_tokens:
            return None
        ids = torch.tensor(prompt, dtype=torch.long)
        best_key, best = None, 0
        for key in self._by_head.get(self._head(model_path, prompt), ()):
            shared = _common_prefix(self._entries[key].tokens, ids)
            if shared > best:
                best_key, best = key, shared
        best = min(best, len(prompt) - 1)
        if best_key is None or best < self.min_tokens:
            return None
        self._entries.move_to_end(best_key)
        layers = self._entries[best_key].layers
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def drop_model(self, model_path: str) -> int:
        """Forget every entry of a model (it is being unloaded); returns how many there were."""
        keys = [key for key, entry in self._entries.items() if entry.model_path == model_path]
        for key in keys:
            self._drop(key)
        return len(keys)

    def _head(self, model_path: str, tokens: list[int]) -> tuple[str, tuple[int, ...]]:
        return model_path, tuple(tokens[: self.min_tokens])

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        head = self._head(entry.model_path, entry.tokens[: self.min_tokens].tolist())
        keys = self._by_head[head]
        keys.discard(key)
        if not keys:
            del self._by_head[head]

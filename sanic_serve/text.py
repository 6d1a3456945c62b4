"""Incremental detokenization and stop-string matching for one generated stream."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns token ids into text as they arrive. ``DecodeStream`` holds back bytes of a character
    split across tokens, so no chunk ever carries broken UTF-8."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        skip_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._skip_ids = skip_ids

    def feed(self, token_ids: Iterable[int]) -> str:
        parts = []
        for tid in token_ids:
            if tid in self._skip_ids:
                continue
            chunk = self._stream.step(self._tokenizer, tid)
            if chunk:
                parts.append(chunk)
        return "".join(parts)


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that is the start of one of ``markers``: text that
    must be held back until the next chunk tells whether the marker is really there."""
    markers = list(markers)
    longest = max((len(m) for m in markers), default=1) - 1
    for k in range(min(longest, len(text)), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class StopMatcher:
    """Finds the first stop string in streamed text.

    Only text that might be the start of a stop string is held back, until it is known either way,
    so a stop string split across chunks is never streamed to the client.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._buffer = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit now. After a match, returns the text before the
        stop string and sets :attr:`matched`; feed nothing more."""
        if not self._stops:
            return text
        self._buffer += text
        cut = -1
        for stop in self._stops:
            at = self._buffer.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, self.matched = at, stop
        if cut != -1:
            out, self._buffer = self._buffer[:cut], ""
            return out
        keep = partial_suffix(self._buffer, self._stops)
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(out) :]
        return out

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out

"""Incremental detokenization and stop-string matching for one generated stream."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# A character is at most 4 bytes of UTF-8, so a byte-level tokenizer splits it over at most 4 tokens:
# ids held back longer than that are bytes that will never form a character (a model emitting stray
# bytes), and come out as U+FFFD, as a whole decode would show them.
_MAX_HELD_TOKENS = 4
# Ids decoded before the new ones once the Rust stream is left behind, so that word boundaries
# (a tokenizer's leading spaces) come out as in a decode of the whole sequence.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns token ids into text as they arrive. ``DecodeStream`` holds back bytes of a character
    split across tokens, so no chunk ever carries broken UTF-8; bytes that never complete one are
    released after ``_MAX_HELD_TOKENS`` tokens, and ``finish`` releases what is held at the end:
    the text of a whole generation is the tokenizer's decode of its ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        skip_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._skip_ids = skip_ids
        self._ids: list[int] = []
        self._read = 0  # ids whose text has been returned
        # Where the decoded window starts once the stream is left behind (after stray bytes):
        # from then on each step decodes ``ids[prefix:]`` against ``ids[prefix:read]``.
        self._prefix: int | None = None

    def feed(self, token_ids: Iterable[int]) -> str:
        parts = []
        for tid in token_ids:
            if tid in self._skip_ids:
                continue
            self._ids.append(tid)
            chunk = self._step(tid)
            if chunk:
                parts.append(chunk)
        return "".join(parts)

    def finish(self) -> str:
        """The text of ids still held back (a character cut off by the end): U+FFFD for its bytes."""
        if self._read == len(self._ids):
            return ""
        if self._prefix is None:
            self._prefix = max(0, self._read - _CONTEXT_TOKENS)
        return self._window(final=True)

    def _step(self, tid: int) -> str:
        if self._prefix is None:
            chunk = self._stream.step(self._tokenizer, tid)
            if chunk is not None:
                self._read = len(self._ids)
                return str(chunk)
            if len(self._ids) - self._read <= _MAX_HELD_TOKENS:
                return ""
            # The stream's state cannot be moved past bytes it will never release: go on without it.
            self._prefix = max(0, self._read - _CONTEXT_TOKENS)
        return self._window(final=False)

    def _window(self, final: bool) -> str:
        assert self._prefix is not None
        ids, read = self._ids, self._read
        before = self._decode(ids[self._prefix : read])
        text = self._decode(ids[self._prefix :])
        if not final and text.endswith("\ufffd") and len(ids) - read <= _MAX_HELD_TOKENS - 1:
            return ""  # perhaps a character split across tokens: wait for its other bytes
        self._prefix, self._read = read, len(ids)
        if text.startswith(before):
            return text[len(before) :]
        # A U+FFFD released before a character's last byte came now reads as that character: what
        # was returned stays returned, and only what follows the common part is new.
        common = 0
        while common < min(len(text), len(before)) and text[common] == before[common]:
            common += 1
        return text[common:]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens))


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

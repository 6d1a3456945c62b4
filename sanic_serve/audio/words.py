"""Word timestamps: a segment's text tokens grouped into words as Whisper groups them
(``transformers``' ``_combine_tokens_into_words``: tokens joined until a complete UTF-8 character,
then split at a leading space or a punctuation mark, for languages written without spaces at every
character; then leading punctuation joined to the word after it and trailing punctuation to the
word before), each word timed from its first token's start to its last token's end, as the host's
alignment heads placed them (``WindowResult.token_times``).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PREPENDED = "\"'“¡¿([{-"
APPENDED = "\"'.。,，!！?？:：”)]}、"
# Written without spaces between words: each character (complete UTF-8 sequence) is a word.
NO_SPACES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class Word:
    word: str
    start_s: float
    end_s: float


def group_words(ids: Sequence[int], decode: Decode, language: str) -> list[tuple[str, list[int]]]:
    """Words of text tokens ``ids``: each word's text (with its leading space) and the indices of
    its tokens in ``ids``."""
    pieces = _split_on_characters(ids, decode)
    if language not in NO_SPACES:
        pieces = _split_on_spaces(pieces)
    return _merge_punctuation(pieces)


def _split_on_characters(ids: Sequence[int], decode: Decode) -> list[tuple[str, list[int]]]:
    full = decode(ids)
    pieces: list[tuple[str, list[int]]] = []
    current: list[int] = []
    offset = 0
    for index in range(len(ids)):
        current.append(index)
        text = decode([ids[i] for i in current])
        cut = text.find("\ufffd")
        # A piece ends once it decodes to whole characters (a replacement character the full text
        # has too is a real one).
        if cut < 0 or offset + cut >= len(full) or full[offset + cut] == "\ufffd":
            pieces.append((text, current))
            current = []
            offset += len(text)
    return pieces


def _split_on_spaces(pieces: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    words: list[tuple[str, list[int]]] = []
    for text, indices in pieces:
        if not words or text.startswith(" ") or (text.strip() in string.punctuation):
            words.append((text, list(indices)))
        else:
            last_text, last_indices = words[-1]
            words[-1] = (last_text + text, last_indices + indices)
    return words


def _merge_punctuation(words: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    texts = [w for w, _ in words]
    indices = [list(i) for _, i in words]
    i, j = len(texts) - 2, len(texts) - 1
    while i >= 0:  # leading punctuation joins the word after it
        if texts[i].startswith(" ") and texts[i].strip() in PREPENDED:
            texts[j], indices[j] = texts[i] + texts[j], indices[i] + indices[j]
            texts[i], indices[i] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(texts):  # trailing punctuation joins the word before it
        if not texts[i].endswith(" ") and texts[j] in APPENDED:
            texts[i], indices[i] = texts[i] + texts[j], indices[i] + indices[j]
            texts[j], indices[j] = "", []
        else:
            i = j
        j += 1
    return [(t, ix) for t, ix in zip(texts, indices, strict=True) if t]


def segment_words(
    ids: Sequence[int],
    spans: Sequence[tuple[float, float] | None],
    decode: Decode,
    language: str,
    start_s: float,
    end_s: float,
) -> list[Word]:
    """The words of one segment's text tokens ``ids``, whose (start, end) times are ``spans``
    (None where the host sent none: such a word is left out). Times are kept inside the segment
    and never run backwards."""
    words: list[Word] = []
    floor_s = start_s
    for text, indices in group_words(ids, decode, language):
        first, last = spans[indices[0]], spans[indices[-1]]
        if first is None or last is None or not text.strip():
            continue
        begin = round(min(max(first[0], floor_s), end_s), 3)
        finish = round(min(max(last[1], begin), end_s), 3)
        words.append(Word(text.strip(), begin, finish))
        floor_s = finish
    return words

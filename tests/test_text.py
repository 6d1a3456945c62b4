"""Incremental detokenization and stop strings."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from sanic_serve.text import IncrementalDetokenizer, StopMatcher


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["STOP", "xyz"])
    out = m.feed("hello ST")
    assert out == "hello "
    assert m.feed("O") == ""
    assert m.feed("P and more") == ""
    assert m.matched == "STOP"


def test_stop_matcher_releases_false_alarms_and_flushes() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ""
    assert m.feed("ART S") == "START "  # nothing held back can still begin "STOP", but "S"
    assert m.flush() == "S"
    assert m.matched is None


def test_stop_matcher_earliest_match_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel"
    assert m.matched == "lo w"


def test_no_stops_passes_through() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == "abc"
    assert m.flush() == ""


def test_detokenizer_never_splits_utf8(demo_model: Path) -> None:
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    text = "Grüße 🙂 こんにちは and plain words"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multibyte characters span several byte tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.feed([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_skips_special_tokens(demo_model: Path) -> None:
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    ids = tok.encode("Hi there", add_special_tokens=False).ids + [tok.token_to_id("<|im_end|>")]
    assert IncrementalDetokenizer(tok).feed(ids) == "Hi there"


DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "model_host" / "demo" / "model" / "tokenizer.json"


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.feed([i]) for i in ids] + [detok.finish()]


def test_stray_bytes_come_out_as_a_decode_shows_them() -> None:
    """A byte-level token that starts a character no later token completes (a model emitting stray
    bytes) was held back for ever: a stream of them produced no text at all."""
    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    stray = tok.token_to_id("Í")  # the byte 0xCD: the first of a two-byte character
    cases = [
        [stray] * 10,
        [stray] * 6 + tok.encode(" wörld 日本 more").ids + [stray] * 2,
        [0, 1, 2, 0, 1, 2, *tok.encode(" hi").ids],  # special tokens, skipped
        tok.encode("héllo wörld 日本").ids,
    ]
    for ids in cases:
        parts = _stream(IncrementalDetokenizer(tok), ids)
        assert "".join(parts) == tok.decode(ids, skip_special_tokens=True), parts
    # Stray bytes are held no longer than a character's four: they stream, not all at the end.
    parts = _stream(IncrementalDetokenizer(tok), [stray] * 10)
    assert [i for i, p in enumerate(parts) if p] == [4, 8, 10]
    assert parts[4] == "\ufffd" * 5


def test_a_character_cut_off_by_the_end_is_released_by_finish() -> None:
    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    ids = tok.encode("ok 日").ids[:-1]  # the last character's final byte never comes
    detok = IncrementalDetokenizer(tok)
    assert detok.feed(ids) == "ok "
    assert detok.finish() == tok.decode(ids)[len("ok ") :] != ""


def test_stray_bytes_before_a_split_character_lose_and_repeat_no_text() -> None:
    """A stray byte, then a character whose bytes come one token at a time: a U+FFFD may come out
    before the character is whole, but no text is repeated or lost."""
    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    emoji = tok.encode("😀").ids
    assert len(emoji) > 1  # split across byte tokens
    ids = tok.encode("abc").ids + [tok.token_to_id("Í")] + emoji + tok.encode(" ok").ids
    for stray_run in range(1, 7):
        seq = ids[:3] + [tok.token_to_id("Í")] * stray_run + ids[4:]
        out = "".join(_stream(IncrementalDetokenizer(tok), seq))
        whole = tok.decode(seq)
        assert out.replace("\ufffd", "") == whole.replace("\ufffd", "") == "abc😀 ok", (out, whole)
        assert whole.count("\ufffd") <= out.count("\ufffd") <= whole.count("\ufffd") + 1, (out, whole)

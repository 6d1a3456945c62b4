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

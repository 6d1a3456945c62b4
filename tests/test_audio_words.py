"""Word timestamps and logprobs in the worker: tokens grouped into words as Whisper groups them, word
times from the host's token times kept inside their segment, and ``include[]=logprobs`` accepted
with ``json``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import orjson

from model_host.ipc.messages import WindowResult
from sanic_serve.audio.request import parse_audio_form
from sanic_serve.audio.route import _Output, _Prepared, _render
from sanic_serve.audio.route import _vocab as route_vocab
from sanic_serve.audio.words import group_words, segment_words
from sanic_serve.models import ModelBundle
from tests.test_audio_units import FILES, LANG_EN, _decode, _FakeTokenizer, _form, _frame, ts, validate

# byte-level ids (< 256) spell text; 1000-1005 are whole words (see test_audio_units)
HELLO, WORLD, HOW, ARE, YOU, CAF = 1000, 1001, 1002, 1003, 1004, 1005


def _ids(text: str) -> list[int]:
    return list(text.encode())


def test_words_split_at_spaces_with_punctuation_joined() -> None:
    ids = [*_ids(' "Hi'), *_ids(","), *_ids(" there"), *_ids("!"), *_ids(" ("), *_ids("ok"), *_ids(")")]
    words = [text for text, _ in group_words(ids, _decode, "en")]
    assert words == [' "Hi,', " there!", " (ok)"]
    # A character split over two tokens stays one piece, and only text tokens' indices come back.
    cafe = [CAF, *"é".encode(), *_ids(" au"), *_ids(" lait")]
    grouped = group_words(cafe, _decode, "fr")
    assert [t for t, _ in grouped] == [" Café", " au", " lait"] and grouped[0][1] == [0, 1, 2]
    # Languages written without spaces: a word per character.
    assert [t for t, _ in group_words(list("日本".encode()), _decode, "ja")] == ["日", "本"]


def test_word_times_stay_inside_their_segment_and_increase() -> None:
    ids = [HELLO, WORLD, HOW]
    spans = [(0.9, 1.4), (1.3, 2.0), (2.0, 9.0)]  # the second starts before the first ends; the last overruns
    words = segment_words(ids, spans, _decode, "en", start_s=1.0, end_s=3.0)
    assert [(w.word, w.start_s, w.end_s) for w in words] == [
        ("Hello", 1.0, 1.4),
        ("world.", 1.4, 2.0),
        ("How", 2.0, 3.0),
    ]


def test_host_token_times_become_verbose_json_words() -> None:
    bundle = cast(ModelBundle, SimpleNamespace(tokenizer=_FakeTokenizer(), id="m"))
    form = _form(model="m", response_format="verbose_json", timestamp_granularities__=["word", "segment"])
    req = parse_audio_form("transcribe", form, FILES)
    assert req.word_timestamps
    out = _Output(bundle, route_vocab(bundle), req)
    first = [LANG_EN, ts(0.0), HELLO, WORLD, ts(1.5), ts(1.5), HOW, ARE, YOU, ts(2.4)]
    times = (0.0, 0.1, 0.7, 1.5, 1.5, 1.6, 1.9, 2.1, 2.4)  # one per token after the language's
    out.take(_frame(first, [-0.1] * len(first), WindowResult(-0.2, 0.01, 0.0, False, times)))
    second = [ts(31.0), HELLO, ts(33.0)]
    out.take(_frame(second, [-0.1] * 3, WindowResult(-0.3, 0.02, 0.0, False, (31.0, 31.2, 32.5))))
    body = orjson.loads(_render(out, _Prepared(b"", 2, 80, 40.0)).body or b"")
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert [(w["word"], w["start"], w["end"]) for w in body["words"]] == [
        ("Hello", 0.1, 0.7),
        ("world.", 0.7, 1.5),
        ("How", 1.6, 1.9),
        ("are", 1.9, 2.1),
        ("you?", 2.1, 2.4),
        ("Hello", 31.2, 32.5),
    ]


def test_logprobs_are_accepted_with_json_only() -> None:
    req = parse_audio_form("transcribe", _form(model="m", include__=["logprobs"]), FILES)
    assert req.include_logprobs and req.response_format == "json"

"""Audio on the HTTP side, without a server: decoding uploads (``sanic_serve.audio.decode``),
Whisper's features (``features``) and the response formats (``formats``)."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import jsonschema
import numpy as np
import orjson
import pytest

from model_host.ipc.messages import TokenFrame, TokenLogprob, WindowResult
from sanic_serve.audio.decode import SAMPLE_RATE_HZ, AudioError, AudioTooLong, decode_audio
from sanic_serve.audio.features import FeatureConfig, log_mel_chunks, log_mel_windows, quiet_cuts
from sanic_serve.audio.formats import (
    TextStream,
    WhisperVocab,
    delta_event,
    done_event,
    json_body,
    render_srt,
    render_vtt,
    split_segments,
    token_usage,
    transcript_text,
    verbose_json,
)
from sanic_serve.audio.request import AudioRequest, Task, UploadTooLarge, parse_audio_form
from sanic_serve.audio.route import _Output, _Prepared, _render
from sanic_serve.audio.route import _vocab as route_vocab
from sanic_serve.errors import InvalidRequest
from sanic_serve.models import ModelBundle
from tests.openapi import validate
from tests.subtitles import encode_av, encode_soundfile, parse_srt, parse_vtt

RATE_HZ = 22_050  # not 16 kHz, so every format goes through the resampler


def _signal(seconds: float, rate_hz: int = RATE_HZ) -> np.ndarray:
    """A rising chirp under a slow tremolo: no period, so a misaligned decode cannot look right."""
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    tone = np.sin(2 * np.pi * (150 * t + 120 * t**2))
    return (0.4 * tone * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))).astype(np.float32)


SIGNAL = _signal(3.0)
ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "wav": lambda x: encode_soundfile(x, RATE_HZ, "WAV", "PCM_16"),
    "flac": lambda x: encode_soundfile(x, RATE_HZ, "FLAC"),
    "mp3": lambda x: encode_av(x, RATE_HZ, "mp3", "libmp3lame", RATE_HZ),
    "ogg": lambda x: encode_av(x, RATE_HZ, "ogg", "libopus", 48_000),
    "m4a": lambda x: encode_av(x, RATE_HZ, "ipod", "aac", RATE_HZ),
    "webm": lambda x: encode_av(x, RATE_HZ, "webm", "libopus", 48_000),
}


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return decode_audio(encode_soundfile(SIGNAL, RATE_HZ, "WAV", "FLOAT"), max_duration_s=60)


def test_reference_is_the_signal_at_16_khz(reference: np.ndarray) -> None:
    assert reference.dtype == np.float32 and reference.ndim == 1
    assert len(reference) == pytest.approx(3.0 * SAMPLE_RATE_HZ, abs=2)
    # The resampler's own check: the signal computed directly at 16 kHz, away from the edges.
    direct = _signal(3.0, SAMPLE_RATE_HZ)
    np.testing.assert_allclose(reference[800:-800], direct[800:-800], atol=2e-3)


def _aligned(decoded: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """The codec's delay in samples (priming, padding) and the correlation once aligned."""
    middle = reference[8000:40000]
    scores = np.correlate(decoded[: 48000 + 4000], middle, mode="valid")
    lag = int(np.argmax(scores)) - 8000
    seg = decoded[8000 + lag : 40000 + lag]
    return lag, float(np.corrcoef(seg, middle)[0, 1])


@pytest.mark.parametrize("fmt", list(ENCODERS))
def test_every_format_decodes_to_the_same_samples(fmt: str, reference: np.ndarray) -> None:
    decoded = decode_audio(ENCODERS[fmt](SIGNAL), max_duration_s=60)
    assert decoded.dtype == np.float32
    lag, corr = _aligned(decoded, reference)
    if fmt in ("wav", "flac"):  # lossless: sample for sample, within 16-bit rounding
        assert lag == 0 and len(decoded) == len(reference)
        np.testing.assert_allclose(decoded, reference, atol=2e-3)
    else:  # lossy codecs add priming/padding of at most a few tens of ms
        assert abs(lag) < 0.1 * SAMPLE_RATE_HZ
        assert abs(len(decoded) - len(reference)) < 0.1 * SAMPLE_RATE_HZ
        assert corr > 0.97, f"{fmt}: correlation {corr:.3f} with the reference"


def test_stereo_is_mixed_down() -> None:
    left, right = _signal(1.0), np.zeros(RATE_HZ, np.float32)
    decoded = decode_audio(
        encode_soundfile(np.stack([left, right], axis=1), RATE_HZ, "WAV", "FLOAT"), max_duration_s=9
    )
    mono = decode_audio(encode_soundfile(left / 2, RATE_HZ, "WAV", "FLOAT"), max_duration_s=9)
    np.testing.assert_allclose(decoded, mono, atol=1e-5)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg", "m4a", "webm"])
def test_a_file_cut_in_half_is_refused(fmt: str) -> None:
    data = ENCODERS[fmt](SIGNAL)
    with pytest.raises(AudioError) as err:
        decode_audio(data[: len(data) // 2], max_duration_s=60)
    assert err.value.param == "file"


@pytest.mark.parametrize(
    "data", [b"", b"RIFF", b"not audio at all, just some text " * 20, b"\x00" * 4096, bytes(range(256)) * 40]
)
def test_empty_and_non_audio_are_refused(data: bytes) -> None:
    with pytest.raises(AudioError) as err:
        decode_audio(data, max_duration_s=60)
    assert err.value.param == "file" and err.value.message
    assert "Errno" not in err.value.message and "libsndfile" not in err.value.message.lower()


def test_a_header_declaring_too_long_an_audio_is_refused_before_reading() -> None:
    data = encode_soundfile(_signal(5.0), RATE_HZ, "FLAC")
    with pytest.raises(AudioTooLong):
        decode_audio(data, max_duration_s=4.0)
    assert len(decode_audio(data, max_duration_s=6.0)) == pytest.approx(5 * SAMPLE_RATE_HZ, abs=2)


@pytest.mark.parametrize("fmt", ["ogg", "mp3", "webm"])
def test_a_compressed_bomb_is_refused_before_its_samples_exist(fmt: str) -> None:
    """3 minutes of silence compress to a few kB; decoded, they would be 11.5 MB of float32 samples.
    With a 3 s cap, decoding stops after a chunk or so: its peak memory stays far below that."""
    rate_hz = 8000 if fmt == "mp3" else 16_000
    silence = np.zeros(180 * rate_hz, np.float32)
    data = (
        encode_av(silence, rate_hz, "mp3", "libmp3lame", rate_hz)
        if fmt == "mp3"
        else encode_av(silence, rate_hz, "ogg" if fmt == "ogg" else "webm", "libopus", 48_000)
    )
    full_bytes = 180 * SAMPLE_RATE_HZ * 4
    assert len(data) < full_bytes / 20  # it is a bomb: far smaller than what it decodes to
    tracemalloc.start()
    try:
        with pytest.raises(AudioTooLong) as err:
            decode_audio(data, max_duration_s=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.param == "file" and err.value.code == "audio_too_long"
    assert peak < full_bytes / 10, f"peak {peak} bytes while refusing"


def test_decoding_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import sanic_serve.audio.decode, sanic_serve.audio.features, sanic_serve.audio.formats\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- features ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_features_equal_transformers_whisper_feature_extractor(n_mels: int) -> None:
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    noise = 0.02 * rng.standard_normal(12 * SAMPLE_RATE_HZ)
    audio = (_signal(12.0, SAMPLE_RATE_HZ) + noise).astype(np.float32)
    expected = WhisperFeatureExtractor(feature_size=n_mels)(
        audio, sampling_rate=SAMPLE_RATE_HZ, return_tensors="np"
    ).input_features
    ours = log_mel_windows(audio, FeatureConfig(n_mels=n_mels))
    assert ours.shape == expected.shape == (1, n_mels, 3000) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_long_audio_is_cut_into_chunks_each_featurised_alone() -> None:
    from transformers import WhisperFeatureExtractor

    audio = _signal(65.0, SAMPLE_RATE_HZ)
    audio[int(27.0 * SAMPLE_RATE_HZ) : int(27.5 * SAMPLE_RATE_HZ)] = 0.0  # a pause to cut in
    chunks = log_mel_chunks(audio, FeatureConfig())
    assert chunks.features.shape == (3, 80, 3000) and chunks.starts[0] == 0
    assert abs(chunks.starts[1] - 27.25 * SAMPLE_RATE_HZ) <= 320  # the middle of the pause
    assert chunks.start_frames(FeatureConfig())[1] == chunks.starts[1] // 160
    extractor = WhisperFeatureExtractor()
    ends = (*chunks.starts[1:], len(audio))
    for i, (begin, end) in enumerate(zip(chunks.starts, ends, strict=True)):
        chunk = audio[begin:end]
        expected = extractor(chunk, sampling_rate=SAMPLE_RATE_HZ, return_tensors="np").input_features[0]
        np.testing.assert_allclose(chunks.features[i], expected, atol=1e-4)


def _cover(starts: Sequence[int], n_samples: int) -> list[tuple[int, int]]:
    """The chunks ``starts`` make, checked to cover ``[0, n_samples)`` exactly, none over 30 s."""
    spans = list(zip(starts, (*starts[1:], n_samples), strict=True))
    assert starts[0] == 0 and all(0 < end - begin <= 30 * SAMPLE_RATE_HZ for begin, end in spans)
    assert all(begin % 320 == 0 for begin in starts)  # whole 0.02 s timestamp steps
    return spans


def test_a_cut_goes_in_the_silence_gap() -> None:
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal(70 * SAMPLE_RATE_HZ)).astype(np.float32)
    audio[26 * SAMPLE_RATE_HZ : int(26.4 * SAMPLE_RATE_HZ)] = 0.0
    starts = quiet_cuts(audio, FeatureConfig())
    spans = _cover(starts, len(audio))
    assert abs(starts[1] - 26.2 * SAMPLE_RATE_HZ) <= 320  # the middle of the gap
    assert len(spans) == 3
    # Every sample lands in exactly one chunk, in order.
    joined = np.concatenate([audio[begin:end] for begin, end in spans])
    np.testing.assert_array_equal(joined, audio)


def test_without_silence_the_cut_is_the_quietest_point_and_never_past_30_s() -> None:
    rng = np.random.default_rng(2)
    seconds = np.arange(95 * SAMPLE_RATE_HZ) / SAMPLE_RATE_HZ

    # Loud noise everywhere, softer at 22.5 s and at 48 s, softest at 31 s: past the first chunk's
    # 30 s, so the first cut takes the dip at 22.5 s, and the second chunk's the one at 48 s.
    def dip(at_s: float, depth: float) -> np.ndarray:
        return depth * np.exp(-(((seconds - at_s) / 0.3) ** 2))

    level = 0.3 - dip(22.5, 0.15) - dip(31.0, 0.28) - dip(48.0, 0.15)
    audio = (level * rng.standard_normal(len(seconds))).astype(np.float32)
    starts = quiet_cuts(audio, FeatureConfig())
    _cover(starts, len(audio))
    assert abs(starts[1] / SAMPLE_RATE_HZ - 22.5) < 0.2
    assert abs(starts[2] / SAMPLE_RATE_HZ - 48.0) < 0.2
    # Steady noise: still cut, each chunk at most 30 s.
    steady = (0.3 * rng.standard_normal(61 * SAMPLE_RATE_HZ + 17)).astype(np.float32)
    assert len(_cover(quiet_cuts(steady, FeatureConfig()), len(steady))) == 3


def test_a_clip_of_at_most_30_s_is_one_chunk() -> None:
    for seconds in (0.5, 29.0, 30.0):
        audio = _signal(seconds, SAMPLE_RATE_HZ)
        assert quiet_cuts(audio, FeatureConfig()) == (0,)
        assert log_mel_windows(audio, FeatureConfig()).shape == (1, 80, 3000)
    assert len(quiet_cuts(np.zeros(30 * SAMPLE_RATE_HZ + 1, np.float32), FeatureConfig())) == 2


def test_feature_config_reads_the_model_folder(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text('{"feature_size": 128, "chunk_length": 30}')
    assert FeatureConfig.from_folder(tmp_path).n_mels == 128
    assert FeatureConfig.from_folder(tmp_path / "missing").n_mels == 80


# ---- formats -----------------------------------------------------------------------------------

VOCAB = WhisperVocab(eot_id=50257, timestamp_begin_id=50364)
# A byte-level stand-in for Whisper's tokenizer: id i < 256 is byte i; a few word ids above.
WORDS = {1000: " Hello", 1001: " world.", 1002: " How", 1003: " are", 1004: " you?", 1005: " Caf"}


def _decode(ids: Sequence[int]) -> str:
    raw = b"".join(bytes([i]) if i < 256 else WORDS[i].encode() for i in ids)
    return raw.decode("utf-8", errors="replace")


def ts(seconds: float) -> int:
    return VOCAB.timestamp_begin_id + round(seconds / 0.02)


LANG_EN, SOT_PREV = 50259, 50361
TOKENS = [LANG_EN, ts(0.0), 1000, 1001, ts(1.5), ts(1.5), 1002, 1003, 1004, ts(2.4), ts(31.0), 1000, ts(33.0)]


def test_segments_follow_the_timestamp_pairs_across_windows() -> None:
    segments = split_segments(TOKENS, VOCAB, _decode, duration_s=40.0)
    assert [(s.start_s, s.end_s, s.text) for s in segments] == [
        (0.0, 1.5, " Hello world."),
        (1.5, 2.4, " How are you?"),
        (31.0, 33.0, " Hello"),
    ]
    assert segments[0].tokens == (1000, 1001)  # text ids only: no times, no language token


def test_segments_are_clamped_to_the_audio_and_an_open_one_ends_with_it() -> None:
    tokens = [ts(0.5), 1000, ts(9.0), ts(9.0), 1001, ts(3.0), 1002]  # past the end, then backwards
    segments = split_segments(tokens, VOCAB, _decode, duration_s=4.0)
    assert [(s.start_s, s.end_s) for s in segments] == [(0.5, 4.0), (4.0, 4.0), (4.0, 4.0)]
    untimed = split_segments([1000, 1001], VOCAB, _decode, duration_s=2.5)
    assert [(s.start_s, s.end_s, s.text) for s in untimed] == [(0.0, 2.5, " Hello world.")]


def test_srt_and_vtt_parse_strictly_and_cover_the_segments() -> None:
    segments = split_segments(TOKENS, VOCAB, _decode, duration_s=3725.0)
    srt, vtt = parse_srt(render_srt(segments)), parse_vtt(render_vtt(segments))
    for cues in (srt, vtt):
        assert [(c.start_s, c.end_s, c.text) for c in cues] == [
            (s.start_s, s.end_s, s.text.strip()) for s in segments
        ]
    late = split_segments([ts(0), 1000, ts(1)], VOCAB, _decode, duration_s=4000)
    shifted = [type(s)(s.id, s.start_s + 3723.456, s.end_s + 3723.456, s.text, s.tokens) for s in late]
    assert "01:02:03,456 --> 01:02:04,456" in render_srt(shifted)
    assert "01:02:03.456 --> 01:02:04.456" in render_vtt(shifted)
    assert render_vtt([]) == "WEBVTT\n\n" and parse_vtt(render_vtt([])) == []


def test_cue_text_cannot_break_a_cue() -> None:
    tokens = [ts(0), *b" a\n\nb --> c", ts(1)]
    body = render_srt(split_segments(tokens, VOCAB, _decode, duration_s=2))
    assert parse_srt(body)[0].text == "a b -> c"


def test_json_and_verbose_json_validate_against_the_spec() -> None:
    text = transcript_text(TOKENS, VOCAB, _decode)
    assert text == "Hello world. How are you? Hello"
    segments = split_segments(TOKENS, VOCAB, _decode, duration_s=40.0)
    body = verbose_json(
        task="transcribe", language="de", duration_s=40.0, text=text, segments=segments, temperature=0.0
    )
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["language"] == "german" and isinstance(body["duration"], float)
    assert body["segments"][2]["start"] == 31.0 and body["usage"] == {"type": "duration", "seconds": 40.0}
    translated = verbose_json(
        task="translate", language="de", duration_s=40.0, text=text, segments=segments, temperature=0.0
    )
    validate("CreateTranslationResponseVerboseJson", translated)
    assert translated["language"] == "english"
    validate("CreateTranscriptionResponseJson", json_body(text, 40.0))
    validate("CreateTranslationResponseJson", json_body(text, 40.0))
    with pytest.raises(
        jsonschema.ValidationError
    ):  # the check can fail: a duration as a string is what vLLM sends
        validate("CreateTranscriptionResponseVerboseJson", {**body, "duration": "40.0"})


def test_stream_deltas_concatenate_to_the_text_and_hold_split_characters() -> None:
    cafe = [1005, *"é".encode()]  # " Café", the é split over two byte tokens
    tokens = [LANG_EN, ts(0), *cafe, 1001, ts(1), ts(1), 1002, 32, 32, 1003, 32, ts(2)]
    stream = TextStream(VOCAB, _decode)
    deltas = [stream.push([t]) for t in tokens]
    deltas.append(stream.finish())
    assert all("\ufffd" not in d for d in deltas)
    assert (
        "".join(deltas)
        == stream.done_text()
        == transcript_text(tokens, VOCAB, _decode)
        == "Café world. How   are"
    )
    events = [delta_event(d) for d in deltas if d]
    events.append(done_event(stream.done_text(), token_usage(1, 3, len(tokens))))
    for event in events[:-1]:
        validate("TranscriptTextDeltaEvent", event)
    validate("TranscriptTextDoneEvent", events[-1])
    assert events[-1]["usage"]["total_tokens"] == 1500 + 3 + len(tokens)


# ---- the form ----------------------------------------------------------------------------------


@dataclass
class _Upload:
    body: bytes
    name: str = "speech.wav"
    type: str = "audio/wav"


def _form(**fields: str | list[str]) -> dict[str, list[str]]:
    return {k.replace("__", "[]"): v if isinstance(v, list) else [v] for k, v in fields.items()}


FILES = {"file": [_Upload(b"RIFF....WAVE")]}


def test_the_form_in_the_sdk_field_names() -> None:
    form = _form(
        model="whisper-base",
        language="DE",
        prompt="Hallo",
        response_format="verbose_json",
        temperature="0.2",
        timestamp_granularities__=["segment"],
    )
    req = parse_audio_form("transcribe", form, FILES)
    assert (req.model, req.language, req.prompt, req.response_format) == (
        "whisper-base",
        "de",
        "Hallo",
        "verbose_json",
    )
    assert req.temperature == 0.2 and req.timestamps and not req.word_timestamps and not req.stream
    assert req.audio == b"RIFF....WAVE" and req.filename == "speech.wav"
    plain = parse_audio_form("transcribe", _form(model="m", stream="true"), FILES)
    assert plain.response_format == "json" and plain.stream and not plain.include_logprobs
    assert plain.language is None and plain.temperature == 0.0 and not plain.timestamps


@pytest.mark.parametrize(
    ("task", "fields", "files", "param"),
    [
        ("transcribe", {"model": "m"}, {}, "file"),
        ("transcribe", {"model": "m", "file": "not a file"}, {}, "file"),
        ("transcribe", {"model": "m"}, {"file": [_Upload(b"a"), _Upload(b"b")]}, "file"),
        ("transcribe", {}, FILES, "model"),
        ("transcribe", {"model": "m", "language": "xx"}, FILES, "language"),
        ("transcribe", {"model": "m", "language": "english"}, FILES, "language"),
        ("transcribe", {"model": "m", "response_format": "diarized_json"}, FILES, "response_format"),
        ("transcribe", {"model": "m", "temperature": "1.5"}, FILES, "temperature"),
        ("transcribe", {"model": "m", "temperature": "nan"}, FILES, "temperature"),
        ("transcribe", {"model": "m", "stream": "maybe"}, FILES, "stream"),
        ("transcribe", {"model": "m", "stream": "true", "response_format": "srt"}, FILES, "stream"),
        (
            "transcribe",
            {"model": "m", "timestamp_granularities__": ["segment"]},
            FILES,
            "timestamp_granularities[]",
        ),
        (
            "transcribe",
            {"model": "m", "response_format": "json", "timestamp_granularities__": ["word"]},
            FILES,
            "timestamp_granularities[]",
        ),
        (
            "transcribe",
            {"model": "m", "include__": ["logprobs"], "response_format": "text"},
            FILES,
            "include[]",
        ),
        ("transcribe", {"model": "m", "include__": ["everything"]}, FILES, "include[]"),
        ("transcribe", {"model": "m", "keywords__": ["hfserve"]}, FILES, "keywords[]"),
        ("transcribe", {"model": "m", "known_speaker_names__": ["Ann"]}, FILES, "known_speaker_names[]"),
        ("translate", {"model": "m", "language": "de"}, FILES, "language"),
        ("translate", {"model": "m", "stream": "true"}, FILES, "stream"),
    ],
)
def test_bad_forms_are_400s_naming_their_field(
    task: Task, fields: dict[str, Any], files: dict[str, list[_Upload]], param: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_audio_form(task, _form(**fields), files)
    assert err.value.status == 400 and err.value.param == param
    validate("ErrorResponse", err.value.body())


def test_unknown_extra_fields_are_accepted_as_on_the_other_routes() -> None:
    form = _form(model="m", speed="2", chunking_strategy="auto", user="u")
    assert parse_audio_form("transcribe", form, FILES).model == "m"


def test_an_upload_over_the_limit_is_a_413_naming_file() -> None:
    files = {"file": [_Upload(b"\0" * (1024 * 1024 + 1))]}
    with pytest.raises(UploadTooLarge) as err:
        parse_audio_form("transcribe", _form(model="m"), files, max_audio_mb=1)
    assert err.value.status == 413 and err.value.param == "file" and err.value.code == "file_too_large"
    assert (
        parse_audio_form("transcribe", _form(model="m"), files, max_audio_mb=2).audio == files["file"][0].body
    )


# ---- the route's assembly of host frames -------------------------------------------------------


class _FakeTokenizer:
    """What the route asks of a Whisper tokenizer, over the byte-level stand-in above."""

    special = {50257: "<|endoftext|>", LANG_EN: "<|en|>", 50261: "<|de|>", 50364: "<|0.00|>"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return _decode([i for i in ids if VOCAB.is_text(i)])

    def id_to_token(self, token_id: int) -> str | None:
        return self.special.get(token_id)

    def token_to_id(self, token: str) -> int | None:
        return {v: k for k, v in self.special.items()}.get(token)


def _frame(ids: list[int], lps: list[float], window: WindowResult | None = None) -> TokenFrame:
    return TokenFrame(1, tuple(ids), logprobs=tuple(TokenLogprob(lp) for lp in lps), window=window)


def _request(fmt: str) -> AudioRequest:
    form = _form(model="m", response_format=fmt)
    return parse_audio_form("transcribe", form, FILES)


def test_host_frames_become_a_verbose_json_with_the_detected_language() -> None:
    bundle = cast(ModelBundle, SimpleNamespace(tokenizer=_FakeTokenizer(), id="m"))
    out = _Output(bundle, route_vocab(bundle), _request("verbose_json"), (0, 2850))  # window 1: 28.5 s
    tokens = [50261, *TOKENS[1:]]  # the host detected German
    out.take(_frame(tokens[:5], [-0.5] * 5))
    out.take(_frame(tokens[5:10], [-1.0] * 5, WindowResult(-0.4, 0.05, 0.0)))  # window 0 ends at 2.4 s
    out.take(_frame(tokens[10:], [-1.0] * 3, WindowResult(-0.9, 0.3, 0.2)))  # window 1: a fallback
    prepared = _Prepared(b"", 2, 80, 40.0)
    response = _render(out, prepared)
    body = orjson.loads(response.body or b"")
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["language"] == "german" and body["text"] == "Hello world. How are you? Hello"
    # Each segment reports its window's measures, as Whisper does.
    assert [s["avg_logprob"] for s in body["segments"]] == [-0.4, -0.4, -0.9]
    assert [s["no_speech_prob"] for s in body["segments"]] == [0.05, 0.05, 0.3]
    assert [s["temperature"] for s in body["segments"]] == [0.0, 0.0, 0.2]
    assert [s["seek"] for s in body["segments"]] == [0, 0, 2850]  # the window's start in 10 ms frames
    srt_out = _Output(bundle, route_vocab(bundle), _request("srt"))
    srt_out.take(_frame(tokens, [-0.1] * len(tokens)))
    cues = parse_srt((_render(srt_out, prepared).body or b"").decode())
    assert [(c.start_s, c.end_s) for c in cues] == [(0.0, 1.5), (1.5, 2.4), (31.0, 33.0)]

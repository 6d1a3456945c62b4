"""``/v1/audio/transcriptions`` and ``/v1/audio/translations`` end to end: one real ``hfserve
start`` pinned to whisper-base (rebuilt offline by ``model_host.whisper_build``), speech spoken by
espeak-ng, requests through the OpenAI SDK. One server for the module; each transcription costs
seconds of CPU, so the default run asks for few of them and the rest is ``slow``."""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from sanic_serve.audio.words import group_words
from tests.openapi import validate
from tests.server import ServerProcess
from tests.speech_helpers import FRENCH, SENTENCES, Reference, espeak, word_error_rate, words
from tests.subtitles import encode_av, encode_soundfile, parse_srt, parse_vtt

MAX_AUDIO_MB, MAX_AUDIO_S = 1, 90  # small limits, so refusals are cheap to provoke
SENTENCE = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _matches_loosely(heard: str, spoken: str = SENTENCE) -> bool:
    """Most spoken words are heard (whisper-base mishears a few of espeak-ng's words)."""
    heard_words = set(_words(heard))
    spoken_words = _words(spoken)
    return sum(w in heard_words for w in spoken_words) >= 0.7 * len(spoken_words)


@pytest.fixture(scope="module")
def model(whisper_base_model: Path) -> Path:
    return whisper_base_model


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SENTENCE], check=True, timeout=60)
    return path.read_bytes()


@pytest.fixture(scope="module")
def whisper_server(cache_dir: Path, model: Path) -> Iterator[ServerProcess]:
    limits = ("--max-audio-mb", str(MAX_AUDIO_MB), "--max-audio-s", str(MAX_AUDIO_S))
    with ServerProcess.start(cache_dir, workers=2, args=("--model", str(model), *limits)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(whisper_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{whisper_server.base_url}/v1", api_key="unused", timeout=600, max_retries=0)


def test_json_text_is_the_spoken_sentence(client: OpenAI, model: Path, speech: bytes) -> None:
    result = client.audio.transcriptions.create(model=str(model), file=("s.wav", speech), language="en")
    assert _matches_loosely(result.text), result.text
    assert result.text == result.text.strip()


def test_verbose_json_validates_and_its_segments_cover_the_audio(
    client: OpenAI, model: Path, speech: bytes, whisper_server: ServerProcess
) -> None:
    reply = httpx.post(
        f"{whisper_server.base_url}/v1/audio/transcriptions",
        files={"file": ("s.wav", speech, "audio/wav")},
        data={"model": str(model), "response_format": "verbose_json", "timestamp_granularities[]": "segment"},
        timeout=600,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["language"] == "english"  # detected: no language was given
    assert isinstance(body["duration"], float) and 4.0 < body["duration"] < 8.0
    assert _matches_loosely(body["text"]), body["text"]
    segments = body["segments"]
    assert segments and segments[0]["start"] < 1.0 and segments[-1]["end"] <= body["duration"]
    assert all(a["end"] <= b["start"] for a, b in zip(segments, segments[1:], strict=False))
    assert "".join(s["text"] for s in segments).strip() == body["text"]


def test_srt_parses_strictly(client: OpenAI, model: Path, speech: bytes) -> None:
    srt = client.audio.transcriptions.create(
        model=str(model), file=("s.wav", speech), language="en", response_format="srt"
    )
    cues = parse_srt(str(srt))
    assert cues and _matches_loosely(" ".join(c.text for c in cues))


def test_bad_uploads_are_400s_naming_file(client: OpenAI, model: Path, speech: bytes) -> None:
    for data in (speech[: len(speech) // 2], b"this is plain text, not audio" * 10, b""):
        with pytest.raises(BadRequestError) as err:
            client.audio.transcriptions.create(model=str(model), file=("s.wav", data))
        assert err.value.param == "file"
    with pytest.raises(BadRequestError) as err:
        client.audio.transcriptions.create(model=str(model), file=("s.wav", speech), language="xx")
    assert err.value.param == "language"


def test_oversized_uploads_and_bombs_are_refused_and_the_server_keeps_serving(
    whisper_server: ServerProcess, model: Path, speech: bytes
) -> None:
    url = f"{whisper_server.base_url}/v1/audio/transcriptions"

    def post(data: bytes, name: str = "s.wav") -> httpx.Response:
        return httpx.post(url, files={"file": (name, data)}, data={"model": str(model)}, timeout=120)

    just_over = post(b"\0" * (MAX_AUDIO_MB * 1024 * 1024 + 1))  # the form's own check
    far_over = post(b"\0" * (3 * MAX_AUDIO_MB * 1024 * 1024))  # refused while the body arrives
    for reply in (just_over, far_over):
        assert reply.status_code == 413, reply.text
        validate("ErrorResponse", reply.json())
    assert just_over.json()["error"]["param"] == "file"
    # 4 minutes of silence in a few kB of Opus: refused once 90 s are decoded (MAX_AUDIO_S)
    bomb = encode_av(np.zeros(240 * 16_000, np.float32), 16_000, "ogg", "libopus", 48_000)
    assert len(bomb) < 100_000
    reply = post(bomb, "bomb.ogg")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "audio_too_long", reply.text
    assert reply.json()["error"]["param"] == "file"
    assert whisper_server.health().status_code == 200


def test_models_say_which_take_audio(
    whisper_server: ServerProcess, server: ServerProcess, model: Path
) -> None:
    listing = httpx.get(f"{whisper_server.base_url}/v1/models", timeout=10).json()
    validate("ListModelsResponse", listing)
    assert [m["endpoints"] for m in listing["data"]] == [
        ["/v1/audio/transcriptions", "/v1/audio/translations"]
    ]
    one = httpx.get(f"{server.base_url}/v1/models/hfserve-demo", timeout=10).json()
    validate("Model", one)
    assert "/v1/chat/completions" in one["endpoints"] and "/v1/audio/transcriptions" not in one["endpoints"]


def test_a_text_model_is_a_400_naming_model(server: ServerProcess, speech: bytes) -> None:
    """The session's demo server serves a causal LM: the audio routes refuse it by name."""
    for path in ("transcriptions", "translations"):
        reply = httpx.post(
            f"{server.base_url}/v1/audio/{path}",
            files={"file": ("s.wav", speech, "audio/wav")},
            data={"model": "hfserve-demo"},
            timeout=60,
        )
        assert reply.status_code == 400, reply.text
        validate("ErrorResponse", reply.json())
        assert reply.json()["error"]["param"] == "model"


@pytest.mark.slow
def test_stream_deltas_join_to_the_done_text_and_the_json_text(
    client: OpenAI, model: Path, speech: bytes
) -> None:
    plain = client.audio.transcriptions.create(model=str(model), file=("s.wav", speech), language="en")
    events = list(
        client.audio.transcriptions.create(
            model=str(model), file=("s.wav", speech), language="en", stream=True
        )
    )
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and events[-1] is done[0]
    assert "".join(deltas) == done[0].text == plain.text
    assert done[0].usage is not None and done[0].usage.output_tokens > 0


@pytest.mark.slow
def test_vtt_and_text_formats(client: OpenAI, model: Path, speech: bytes) -> None:
    vtt = client.audio.transcriptions.create(
        model=str(model), file=("s.wav", speech), language="en", response_format="vtt"
    )
    assert parse_vtt(str(vtt))
    text = client.audio.transcriptions.create(
        model=str(model), file=("s.wav", speech), language="en", response_format="text"
    )
    assert _matches_loosely(str(text))


@pytest.mark.slow
def test_worker_features_and_segments_equal_transformers_in_process(model: Path, speech: bytes) -> None:
    """The worker's side alone against transformers: its features give the same greedy tokens as
    the processor's, and its segments are the tokenizer's own offsets."""
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from sanic_serve.audio.decode import decode_audio
    from sanic_serve.audio.features import FeatureConfig, log_mel_windows
    from sanic_serve.audio.formats import WhisperVocab, split_segments, transcript_text

    audio = decode_audio(speech, max_duration_s=60)
    processor = WhisperProcessor.from_pretrained(model)
    whisper = WhisperForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    ours = torch.from_numpy(log_mel_windows(audio, FeatureConfig.from_folder(model)))
    theirs = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = whisper.generate(ours, return_timestamps=True, language="en")[0].tolist()
        assert ids == whisper.generate(theirs, return_timestamps=True, language="en")[0].tolist()
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    eot, begin = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|0.00|>")
    assert eot is not None and begin is not None
    vocab = WhisperVocab(eot, begin)

    def decode(x: Sequence[int]) -> str:
        return str(tokenizer.decode(list(x), skip_special_tokens=False))

    segments = split_segments(ids, vocab, decode, len(audio) / 16_000)
    offsets = processor.tokenizer.decode(ids, output_offsets=True, skip_special_tokens=True)["offsets"]
    assert [(s.text, (s.start_s, s.end_s)) for s in segments] == [
        (o["text"], o["timestamp"]) for o in offsets
    ]
    assert (
        transcript_text(ids, vocab, decode)
        == processor.batch_decode([ids], skip_special_tokens=True)[0].strip()
    )


GERMAN = "Guten Morgen. Das Wetter ist heute sehr schön, und wir gehen in den Park."


def _espeak(text: str, voice: str, folder: Path) -> bytes:
    path = folder / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, timeout=60)
    return path.read_bytes()


@pytest.mark.slow
def test_german_is_detected_and_translated_to_english(
    whisper_server: ServerProcess, client: OpenAI, model: Path, tmp_path: Path
) -> None:
    german = _espeak(GERMAN, "de", tmp_path)
    reply = httpx.post(
        f"{whisper_server.base_url}/v1/audio/transcriptions",
        files={"file": ("de.wav", german, "audio/wav")},
        data={"model": str(model), "response_format": "verbose_json"},
        timeout=600,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["language"] == "german"
    heard = set(_words(reply.json()["text"]))
    assert len(heard & {"morgen", "wetter", "heute", "park"}) >= 2, reply.json()["text"]
    translated = client.audio.translations.create(model=str(model), file=("de.wav", german))
    english = set(_words(translated.text))
    assert len(english & {"good", "morning", "weather", "today", "park", "very"}) >= 2, translated.text
    assert not english & {"morgen", "wetter", "heute"}, translated.text


@pytest.mark.slow
def test_every_container_gives_the_same_text(client: OpenAI, model: Path, speech: bytes) -> None:
    import io

    import soundfile as sf

    samples, rate_hz = sf.read(io.BytesIO(speech), dtype="float32")
    encoded = {
        "s.wav": speech,
        "s.flac": encode_soundfile(samples, rate_hz, "FLAC"),
        # At the bit rates people upload speech at (FFmpeg's defaults for 22 kHz mono are lower).
        "s.mp3": encode_av(samples, rate_hz, "mp3", "libmp3lame", rate_hz, 96_000),
        "s.ogg": encode_av(samples, rate_hz, "ogg", "libopus", 48_000, 64_000),
        "s.m4a": encode_av(samples, rate_hz, "ipod", "aac", rate_hz, 96_000),
    }
    texts = {
        name: client.audio.transcriptions.create(model=str(model), file=(name, data), language="en").text
        for name, data in encoded.items()
    }
    # Lossless containers hold the same samples: the same text. A lossy codec may tip a word the
    # model hears on the edge (espeak-ng's "brown" is "round" or "brown"): at most one word apart.
    assert texts["s.wav"] == texts["s.flac"], texts
    for name in ("s.mp3", "s.ogg", "s.m4a"):
        matcher = difflib.SequenceMatcher(a=_words(texts["s.wav"]), b=_words(texts[name]))
        changed = sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal")
        assert changed <= 1, f"{name}: {texts[name]!r} against {texts['s.wav']!r}"


@pytest.mark.slow
def test_a_75_s_clip_is_one_continuous_transcript(
    whisper_server: ServerProcess, model: Path, speech: bytes
) -> None:
    import io

    import soundfile as sf

    samples, rate_hz = sf.read(io.BytesIO(speech), dtype="float32")
    gap = np.zeros(int(rate_hz * 2.5), np.float32)
    clip = np.concatenate([np.concatenate([samples, gap])] * 12)[: int(75 * rate_hz)]
    reply = httpx.post(
        f"{whisper_server.base_url}/v1/audio/transcriptions",
        files={"file": ("long.ogg", encode_av(clip, rate_hz, "ogg", "libopus", 48_000), "audio/ogg")},
        data={"model": str(model), "response_format": "verbose_json", "language": "en"},
        timeout=600,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["duration"] == pytest.approx(75.0, abs=0.01)
    segments = body["segments"]
    assert all(a["end"] <= b["start"] for a, b in zip(segments, segments[1:], strict=False))
    assert segments[-1]["end"] > 60.0 and any(30.0 < s["start"] < 60.0 for s in segments)
    assert _words(body["text"]).count("fox") >= 8, body["text"]  # the sentence is heard throughout


PAUSE_S = 0.4  # between the sentences of the long clip
LONG_SENTENCES = (*SENTENCES, *SENTENCES[:3])  # about 36 s spoken


@pytest.fixture(scope="module")
def sentences_over_30_s(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, float]:
    """``LONG_SENTENCES`` with short pauses, led by enough silence that one sentence's middle is at
    30 s (a fixed 30 s cut would split it): the FLAC file, that sentence's index and the clip's length."""
    import io

    import soundfile as sf

    folder = tmp_path_factory.mktemp("long")
    spoken, rates_hz = [], set()
    for i, sentence in enumerate(LONG_SENTENCES):
        samples, rate_hz = sf.read(io.BytesIO(espeak(sentence, "en", folder / f"{i}.wav")), dtype="float32")
        spoken.append(samples)
        rates_hz.add(rate_hz)
    assert len(rates_hz) == 1
    pause = np.zeros(int(PAUSE_S * rate_hz), np.float32)
    starts, t = [], 0
    for samples in spoken:
        starts.append(t)
        t += len(samples) + len(pause)
    middles_s = [(start + len(s) / 2) / rate_hz for start, s in zip(starts, spoken, strict=True)]
    straddling = max(i for i, m in enumerate(middles_s) if m <= 30.0)
    lead = np.zeros(int((30.0 - middles_s[straddling]) * rate_hz), np.float32)
    clip = np.concatenate([lead, *(np.concatenate([s, pause]) for s in spoken)])
    begin_s = (len(lead) + starts[straddling]) / rate_hz
    assert begin_s < 29.5 and begin_s + len(spoken[straddling]) / rate_hz > 30.5
    # FLAC: lossless (the pauses stay silent) and under the module's 1 MB upload limit.
    return encode_soundfile(clip, rate_hz, "FLAC"), straddling, len(clip) / rate_hz


def test_sentences_across_30_s_are_each_heard_once_with_continuous_times(
    whisper_server: ServerProcess, model: Path, sentences_over_30_s: tuple[bytes, int, float]
) -> None:
    """Audio over 30 s is cut at a quiet point, not at 30 s: the sentence spoken across 30 s is
    heard whole and once, every sentence is heard, and segment and word times run forward over
    the whole clip."""
    flac, straddling, length_s = sentences_over_30_s
    reply = httpx.post(
        f"{whisper_server.base_url}/v1/audio/transcriptions",
        files={"file": ("long.flac", flac, "audio/flac")},
        data={
            "model": str(model),
            "response_format": "verbose_json",
            "language": "en",
            "timestamp_granularities[]": ["word", "segment"],
        },
        timeout=600,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    validate("CreateTranscriptionResponseVerboseJson", body)
    assert body["duration"] == pytest.approx(length_s, abs=0.01)
    spoken = " ".join(LONG_SENTENCES)
    rate = word_error_rate(body["text"], spoken)
    assert rate < 0.15, (rate, body["text"])
    # The straddling sentence, aligned word by word against what was heard: at most one word of it
    # misheard (whisper-base hears espeak-ng's "jumps" as "dumps"), none dropped or doubled (a word
    # doubled at a cut is an insertion inside the sentence or at its edges).
    ref, hyp = words(spoken), words(body["text"])
    first = sum(len(words(x)) for x in LONG_SENTENCES[:straddling])
    last = first + len(words(LONG_SENTENCES[straddling]))
    wrong = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_opcodes():
        if tag == "insert" and first <= i1 <= last:
            wrong += j2 - j1
        elif tag in ("replace", "delete"):
            wrong += max(0, min(i2, last) - max(i1, first))
    assert wrong <= 1, (LONG_SENTENCES[straddling], body["text"])
    segments = body["segments"]
    assert all(a["start"] <= a["end"] <= b["start"] for a, b in zip(segments, segments[1:], strict=False))
    assert segments[0]["start"] < 5.0 and segments[-1]["end"] > length_s - 5.0
    assert any(s["seek"] > 0 for s in segments) and sorted(s["seek"] for s in segments) == [
        s["seek"] for s in segments
    ]
    # The second window starts at its chunk's start (a quiet point before 30 s), not at 3000 frames.
    assert all(s["seek"] < 3000 for s in segments), [s["seek"] for s in segments]
    times = [(w["start"], w["end"]) for w in body["words"]]
    assert all(a[0] <= a[1] <= b[0] + 1e-9 for a, b in zip(times, times[1:], strict=False))
    assert times[-1][1] > length_s - 5.0


# -- word timestamps, logprobs, acceptance 1 (fast variant; the 10 sentences are in test_audio_acceptance)
@pytest.fixture(scope="module")
def reference(model: Path) -> Reference:
    return Reference(model)


def test_word_times_equal_transformers_token_timestamps(
    client: OpenAI, model: Path, speech: bytes, reference: Reference
) -> None:
    """Words inside their segments and increasing, each timed as generate(return_token_timestamps)
    times its tokens (a word from its first token's start to the next token's start)."""
    result = client.audio.transcriptions.create(
        model=str(model),
        file=("s.wav", speech),
        language="en",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    body = result.model_dump()
    validate("CreateTranscriptionResponseVerboseJson", body)
    words, segments = body["words"], body["segments"]
    assert [w["word"] for w in words] == result.text.split()
    previous_end = 0.0
    for w in words:
        assert w["start"] >= previous_end - 1e-9 and w["end"] >= w["start"]
        assert any(s["start"] <= w["start"] and w["end"] <= s["end"] for s in segments), w
        previous_end = w["end"]
    out = reference.tokens(speech, language="en", return_timestamps=True, return_token_timestamps=True)
    ids, times = out["sequences"][0].tolist(), out["token_timestamps"][0].tolist()
    tokenizer = reference.processor.tokenizer
    text_positions = [k for k, t in enumerate(ids) if t < tokenizer.eos_token_id]
    grouped = group_words([ids[k] for k in text_positions], lambda x: tokenizer.decode(list(x)), "en")
    expected = []
    for text, idx in grouped:
        first, last = text_positions[idx[0]], text_positions[idx[-1]]
        expected.append((text.strip(), times[first], times[min(last + 1, len(times) - 1)]))
    assert [w["word"] for w in words] == [e[0] for e in expected]
    for w, (_, start, end) in zip(words, expected, strict=True):
        # A segment's last word ends by the segment's closing timestamp at the latest.
        seg = next(s for s in segments if s["start"] <= w["start"] and w["end"] <= s["end"])
        start, end = max(start, seg["start"]), min(end, seg["end"])
        assert abs(w["start"] - start) <= 0.04 and abs(w["end"] - end) <= 0.04, (w, start, end)


def test_logprobs_in_json_and_in_the_stream(client: OpenAI, model: Path, speech: bytes) -> None:
    plain = client.audio.transcriptions.create(
        model=str(model), file=("s.wav", speech), language="en", include=["logprobs"]
    )
    body = plain.model_dump(exclude_unset=True)
    validate("CreateTranscriptionResponseJson", body)
    entries = body["logprobs"]
    assert "".join(e["token"] for e in entries).strip() == plain.text
    assert all(
        e["logprob"] <= 0 and bytes(int(b) for b in e["bytes"]).decode() == e["token"] for e in entries
    )
    events = list(
        client.audio.transcriptions.create(
            model=str(model), file=("s.wav", speech), language="en", include=["logprobs"], stream=True
        )
    )
    streamed = [
        lp.model_dump() for e in events if e.type == "transcript.text.delta" for lp in e.logprobs or ()
    ]
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == plain.text
    assert streamed == [lp.model_dump() for lp in done.logprobs or ()] == entries


def test_sentences_equal_generate_and_french_is_detected(
    client: OpenAI, model: Path, reference: Reference, tmp_path: Path
) -> None:
    """Acceptance 1, fast: a sentence equals generate() greedy with a word error rate under 0.30;
    French without a language is detected and answered in French. (Ten sentences: the slow
    acceptance module.)"""
    rates = []
    for i, sentence in enumerate(SENTENCES[:1]):
        wav = espeak(sentence, "en", tmp_path / f"{i}.wav")
        heard = client.audio.transcriptions.create(model=str(model), file=("s.wav", wav), language="en").text
        assert heard == reference.text(wav, language="en")
        rates.append(word_error_rate(heard, sentence))
    assert sum(rates) / len(rates) < 0.30, rates
    wav = espeak(FRENCH, "fr", tmp_path / "fr.wav")
    french = client.audio.transcriptions.create(
        model=str(model), file=("fr.wav", wav), response_format="verbose_json"
    )
    assert french.language == "french"
    assert {"bonjour", "marie"} & set(words(french.text)), french.text
    assert french.text == reference.text(wav, return_timestamps=True)  # verbose_json decodes with times

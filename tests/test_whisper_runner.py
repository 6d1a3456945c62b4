"""The seq2seq runner driven through the host harness with OpenAI's whisper-base (float32, CPU) on
clips spoken by espeak-ng: its tokens equal in-process ``generate()`` greedy, token for token;
transcriptions batched together equal each alone; long audio's windows follow each other with
continuous timestamps; an abort frees the slot. Features come from transformers' own feature
extractor here, so the runner and ``generate()`` see the very same input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from model_host.engine import Engine
from model_host.ipc.codec import decode_message, encode
from model_host.ipc.messages import (
    AddRequest,
    ErrorKind,
    FinishReason,
    SamplingParams,
    Task,
    Transcribe,
)
from model_host.ipc.model_kind import ModelKind, detect_kind
from model_host.ipc.settings import HostSettings
from model_host.registry import ModelRegistry
from model_host.runners.seq2seq import Seq2SeqRunner
from tests.host_harness import Host

ENGLISH = "The quick brown fox jumps over the lazy dog. Today the weather is sunny and warm."
GERMAN = "Guten Morgen, wie geht es dir heute? Das Wetter ist schön."
TIMESTAMP_BEGIN = 50364  # <|0.00|> of whisper-base

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _speak(text: str, voice: str, folder: Path) -> np.ndarray:
    """16 kHz mono float32 samples of espeak-ng saying ``text``."""
    import soundfile

    path = folder / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, timeout=60)
    samples, rate = soundfile.read(path, dtype="float32")
    # Linear interpolation is resampling enough here: the runner and generate() get the same samples.
    times = np.arange(round(len(samples) * 16000 / rate)) / 16000
    return np.interp(times, np.arange(len(samples)) / rate, samples).astype(np.float32)


@pytest.fixture(scope="module")
def model_path(whisper_base_model: Path) -> str:
    return str(whisper_base_model)


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry("cpu", "float32", False)


@pytest.fixture(scope="module")
def features(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Log-mel features ``(1, 80, 3000)`` of the English and the German clip."""
    from transformers import WhisperFeatureExtractor

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    extractor = WhisperFeatureExtractor.from_pretrained(model_path)
    folder = tmp_path_factory.mktemp("speech")
    out = {}
    for name, text, voice in (("en", ENGLISH, "en"), ("de", GERMAN, "de")):
        audio = _speak(text, voice, folder)
        out[name] = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    return out


@pytest.fixture(scope="module")
def reference(registry: ModelRegistry, model_path: str, features: dict[str, torch.Tensor]) -> Any:
    """``generate()`` greedy of the same model object, cached per (clip, options)."""
    runner = registry.get(model_path)
    assert isinstance(runner, Seq2SeqRunner)
    model = runner.model.model
    done: dict[tuple[str, bool, str | None], list[int]] = {}

    def generate(clip: str, timestamps: bool = False, language: str | None = None) -> list[int]:
        key = (clip, timestamps, language)
        if key not in done:
            with torch.inference_mode():
                out = model.generate(features[clip], language=language, return_timestamps=timestamps)
            done[key] = [int(t) for t in out[0].tolist()]
        return done[key]

    return generate


def _host(registry: ModelRegistry, max_batch_size: int = 8) -> Host:
    settings = HostSettings(device="cpu", max_batch_size=max_batch_size)
    return Host(Engine(registry, settings, 256))


def _payload(
    windows: torch.Tensor,
    language: str | None = "en",
    timestamps: bool = False,
    max_new_tokens: int = 120,
    window_starts: tuple[int, ...] = (),
) -> Transcribe:
    raw = windows.numpy().astype("<f4", copy=False).tobytes()
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return Transcribe(
        raw,
        windows.shape[0],
        windows.shape[1],
        language,
        "transcribe",
        (),
        timestamps,
        sampling,
        window_starts=window_starts,
    )


def _language(model_path: str, code: str) -> int:
    from transformers import GenerationConfig

    return int(GenerationConfig.from_pretrained(model_path).lang_to_id[f"<|{code}|>"])


# -- the contract, without the model ---------------------------------------------------------------
def test_transcribe_round_trips_through_the_codec() -> None:
    sampling = SamplingParams(max_new_tokens=5, temperature=0.0)
    payload = Transcribe(b"\0" * 80 * 3000 * 4, 1, 80, None, "translate", (1, 2), True, sampling)
    decoded = decode_message(encode(AddRequest(7, 1, 0, "m", payload)))
    assert isinstance(decoded, AddRequest) and decoded.task is Task.TRANSCRIBE
    assert decoded.payload == payload
    wire = msgspec.msgpack.decode(encode(AddRequest(7, 1, 0, "m", payload)))
    assert wire["payload"]["task"] == Task.TRANSCRIBE and wire["payload"]["mode"] == "translate"
    chunked = msgspec.structs.replace(payload, n_windows=2, audio_frames=5000, window_starts=(0, 2610))
    decoded = decode_message(encode(AddRequest(7, 1, 0, "m", chunked)))
    assert isinstance(decoded, AddRequest) and decoded.payload == chunked
    # Each window's place in the audio: its start, and its frames of audio up to the next start.
    assert [chunked.window_start_s(i) for i in (0, 1)] == [0.0, 26.1]
    assert [chunked.window_audio_frames(i) for i in (0, 1)] == [2610, 2390]
    assert payload.window_start_s(1) == 30.0 and payload.window_audio_frames(0) == 3000  # fixed cuts


def test_window_starts_that_cannot_cut_the_audio_are_refused() -> None:
    sampling = SamplingParams(max_new_tokens=5, temperature=0.0)
    two = Transcribe(b"", 2, 80, None, "transcribe", (), True, sampling, audio_frames=5000)
    assert msgspec.structs.replace(two, window_starts=(0, 2610)).window_starts_problem() is None
    for starts in ((0,), (10, 2610), (0, 3002), (0, 2611), (0, 0)):
        assert msgspec.structs.replace(two, window_starts=starts).window_starts_problem(), starts
    far = msgspec.structs.replace(two, window_starts=(0, 1000))  # the last window over 30 s
    assert far.window_starts_problem()


def test_whisper_configs_are_seq2seq(tmp_path: Path, model_path: str) -> None:
    assert detect_kind(model_path) is ModelKind.SEQ2SEQ
    (tmp_path / "config.json").write_text(
        '{"model_type": "whisper", "architectures": ["WhisperForCausalLM"]}'
    )
    assert detect_kind(tmp_path) is ModelKind.CAUSAL  # a bare Whisper decoder transcribes nothing


def test_features_of_the_wrong_size_or_language_are_refused(registry: ModelRegistry, model_path: str) -> None:
    host = _host(registry)
    short = Transcribe(b"\0" * 16, 1, 80, None, "transcribe", (), False, SamplingParams(5))
    frame = host.add(1, model_path, short)
    assert frame is not None and frame.error is not None and frame.error.kind is ErrorKind.INVALID_REQUEST
    assert host.add(2, model_path, _payload(torch.zeros(1, 80, 3000), language="xx")) is None
    assert host.add(3, model_path, _payload(torch.zeros(1, 128, 3000))) is None
    host.run()
    for rid in (2, 3):
        error = host.last(rid).error
        assert error is not None and error.kind is ErrorKind.INVALID_REQUEST


# -- against generate() ----------------------------------------------------------------------------
@needs_espeak
def test_batched_tokens_equal_generate_and_each_alone(
    registry: ModelRegistry, model_path: str, features: dict[str, torch.Tensor], reference: Any
) -> None:
    """English with its language given, German detected: in one batch, each equals generate()
    (after the language token, which comes first), and each equals its run alone."""
    batched = _host(registry)
    assert batched.add(1, model_path, _payload(features["en"], language="en")) is None
    assert batched.add(2, model_path, _payload(features["de"], language=None)) is None
    batched.run()
    shared = set(batched.steps_of(1)) & set(batched.steps_of(2))
    assert len(shared) >= 5, "the two transcriptions never shared decoder steps"

    en, de = batched.tokens(1), batched.tokens(2)
    assert en[0] == _language(model_path, "en") and de[0] == _language(model_path, "de")
    assert en[1:] == reference("en", language="en")
    assert de[1:] == reference("de")
    assert batched.last(1).finish_reason is FinishReason.STOP
    assert batched.last(2).finish_reason is FinishReason.STOP

    # English alone is generate() itself; German alone through the runner (to keep the suite short).
    alone = _host(registry)
    assert alone.add(2, model_path, _payload(features["de"], language=None)) is None
    alone.run()
    assert alone.tokens(2) == de


@pytest.mark.slow  # two 30 s windows and generate() with timestamps: about a minute on a small CPU
@needs_espeak
def test_timestamps_equal_generate_and_continue_across_windows(
    registry: ModelRegistry, model_path: str, features: dict[str, torch.Tensor], reference: Any
) -> None:
    """Two windows of the same clip, the second a chunk starting at 24.6 s: its tokens are the
    first's, with every timestamp 24.6 s later; each window's tokens equal generate() with
    timestamps."""
    host = _host(registry)
    two_windows = torch.cat([features["en"], features["en"]])
    assert host.add(1, model_path, _payload(two_windows, timestamps=True, window_starts=(0, 2460))) is None
    host.run()
    expected = reference("en", timestamps=True)
    assert expected[0] == TIMESTAMP_BEGIN and expected[-1] >= TIMESTAMP_BEGIN
    shifted = [t + 1230 if t >= TIMESTAMP_BEGIN else t for t in expected]  # 24.6 s in 0.02 s steps
    assert host.tokens(1) == [_language(model_path, "en"), *expected, *shifted]
    assert host.last(1).finish_reason is FinishReason.STOP


@needs_espeak
def test_max_new_tokens_ends_with_length(
    registry: ModelRegistry, model_path: str, features: dict[str, torch.Tensor], reference: Any
) -> None:
    host = _host(registry)
    assert host.add(1, model_path, _payload(features["en"], max_new_tokens=4)) is None
    host.run()
    assert host.tokens(1)[1:] == reference("en", language="en")[:4]
    assert host.last(1).finish_reason is FinishReason.LENGTH


@needs_espeak
def test_an_abort_frees_the_slot(
    registry: ModelRegistry, model_path: str, features: dict[str, torch.Tensor]
) -> None:
    """With one batch slot, a second transcription waits; aborting the first lets it start."""
    host = _host(registry, max_batch_size=1)
    assert host.add(1, model_path, _payload(features["en"])) is None
    assert host.add(2, model_path, _payload(features["de"], language="de", max_new_tokens=3)) is None
    while not host.tokens(1):  # its window is encoded a layer per step first
        assert host.steps < 50
        host.step()
    host.step()
    assert not host.tokens(2)
    runner = registry.get(model_path)
    assert runner.num_running == 1
    assert host.engine.abort((0, 1))
    assert runner.num_running == 0
    host.step()
    assert runner.num_running == 1
    host.run()
    assert host.tokens(2)[0] == _language(model_path, "de")
    assert runner.num_running == 0 and host.last(2).finish_reason is FinishReason.LENGTH
    assert len(host.tokens(2)) == 1 + 3


@pytest.mark.slow  # two more generate() runs
@needs_espeak
def test_prompt_and_translate_equal_generate(
    registry: ModelRegistry, model_path: str, features: dict[str, torch.Tensor]
) -> None:
    """A previous-text prompt (sent without special tokens; the host adds ``<|startofprev|>``), and
    translation of the German clip with its language detected, each as generate() does them."""
    from transformers import WhisperProcessor

    processor: Any = WhisperProcessor.from_pretrained(model_path)
    text = " Weather report about a brown fox."
    prompt_ids = processor.tokenizer.encode(text, add_special_tokens=False)
    sampling = SamplingParams(max_new_tokens=120, temperature=0.0)
    en = features["en"].numpy().tobytes()
    de = features["de"].numpy().tobytes()
    host = _host(registry)
    assert (
        host.add(1, model_path, Transcribe(en, 1, 80, "en", "transcribe", tuple(prompt_ids), False, sampling))
        is None
    )
    assert host.add(2, model_path, Transcribe(de, 1, 80, None, "translate", (), False, sampling)) is None
    host.run()
    model = registry.get(model_path)
    assert isinstance(model, Seq2SeqRunner)
    with torch.inference_mode():
        prompted = model.model.model.generate(
            features["en"], language="en", prompt_ids=torch.tensor(processor.get_prompt_ids(text))
        )
        translated = model.model.model.generate(features["de"], task="translate")
    assert host.tokens(1)[1:] == prompted[0].tolist()
    assert host.tokens(2) == [_language(model_path, "de"), *translated[0].tolist()]
    assert "morning" in processor.tokenizer.decode(host.tokens(2), skip_special_tokens=True).lower()


def test_an_abort_during_encoding_frees_the_slot(registry: ModelRegistry, model_path: str) -> None:
    """A request aborted while its window is part-way through the encoder leaves nothing behind."""
    host = _host(registry)
    assert host.add(1, model_path, _payload(torch.zeros(1, 80, 3000))) is None
    host.step()  # admitted: queued for encoding
    host.step()  # the encoder pass began (one stage of it on a CPU budget)
    runner = registry.get(model_path)
    assert runner.num_running == 1 and not host.tokens(1)
    assert host.engine.abort((0, 1))
    assert runner.num_running == 0 and not runner.has_work() and not host.engine.has_work()

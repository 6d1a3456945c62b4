"""What the seq2seq runner measures of each window, on OpenAI's whisper-base (float32, CPU) driven
through the host harness: token logprobs, the no-speech probability, token times from the alignment
heads equal to ``generate(return_token_timestamps=True)``, and Whisper's temperature fallback
(the decision as a unit; a window decoded again and a silent one skipped, end to end)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model_host.ipc.messages import SamplingParams, TokenFrame, Transcribe, WindowResult
from model_host.registry import ModelRegistry
from model_host.runners.seq2seq import Seq2SeqRunner
from model_host.whisper_quality import Fallback, token_compression_ratio
from tests.test_whisper_runner import ENGLISH, _host, _speak, needs_espeak

VOCAB = 51865


# -- the fallback decision, without the model --------------------------------------------------------
def test_fallback_settings_come_from_the_generation_config() -> None:
    class Config:
        compression_ratio_threshold = 1.35
        logprob_threshold = -1.0
        no_speech_threshold = 0.6

    fallback = Fallback.of(Config())
    assert fallback.active
    assert fallback.temperatures(0.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert fallback.temperatures(0.5) == [0.5]  # a sampling request keeps its temperature
    none = Fallback.of(object())
    assert not none.active and none.temperatures(0.0) == [0.0]


def test_the_fallback_decision_is_generates() -> None:
    fallback = Fallback(compression_ratio_threshold=1.35, logprob_threshold=-1.0, no_speech_threshold=0.6)
    varied = list(range(100, 140))
    loop = [100, 101, 102, 103] * 10
    assert token_compression_ratio(loop, VOCAB) > 1.35 > token_compression_ratio(varied, VOCAB)
    assert fallback.judge(varied, -0.3, 0.01, VOCAB) == (False, False)
    assert fallback.judge(loop, -0.3, 0.01, VOCAB) == (True, False)  # a repetition loop
    assert fallback.judge(varied, -1.5, 0.01, VOCAB) == (True, False)  # unsure
    assert fallback.judge(varied, -1.5, 0.9, VOCAB) == (False, True)  # unsure and silent: skipped
    assert fallback.judge(varied, -0.3, 0.9, VOCAB) == (False, False)  # sure of itself: kept
    # The token ratio is generate()'s: ids as 2 little-endian bytes each (51,865 ids need 16 bits).
    assert token_compression_ratio([1, 2], VOCAB) == 4 / len(__import__("zlib").compress(b"\x01\x00\x02\x00"))


# -- on the model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(whisper_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The English clip's features and attention mask (feature frames that hold audio)."""
    from transformers import WhisperFeatureExtractor

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    extractor = WhisperFeatureExtractor.from_pretrained(str(whisper_base_model))
    audio = _speak(ENGLISH, "en", tmp_path_factory.mktemp("speech"))
    out = extractor(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    return {"features": out.input_features, "mask": out.attention_mask}


def _payload(
    features: torch.Tensor,
    *,
    frames: int = 0,
    words: bool = False,
    timestamps: bool = True,
    max_new: int = 120,
) -> Transcribe:
    raw = features.numpy().astype("<f4", copy=False).tobytes()
    sampling = SamplingParams(max_new_tokens=max_new, temperature=0.0, logprobs=0)
    return Transcribe(raw, features.shape[0], 80, "en", "transcribe", (), timestamps, sampling, words, frames)


def _windows(frames: list[TokenFrame]) -> list[WindowResult]:
    return [f.window for f in frames if f.window is not None]


@needs_espeak
def test_logprobs_no_speech_and_token_times_equal_transformers(whisper_base_model: Path, clip: Any) -> None:
    registry = ModelRegistry("cpu", "float32", False)
    path = str(whisper_base_model)
    host = _host(registry)
    frames = int(clip["mask"].sum())
    assert host.add(1, path, _payload(clip["features"], frames=frames, words=True)) is None
    assert host.add(2, path, _payload(clip["features"], timestamps=False)) is None
    assert host.add(3, path, _payload(torch.full_like(clip["features"], -1.5), max_new=20)) is None
    host.run()
    runner = registry.get(path)
    assert isinstance(runner, Seq2SeqRunner)
    model = runner.model.model
    with torch.inference_mode():
        reference = model.generate(
            clip["features"],
            attention_mask=clip["mask"],
            language="en",
            return_timestamps=True,
            return_token_timestamps=True,
        )
    expected = reference["sequences"][0].tolist()
    tokens = host.tokens(1)[1:]
    assert tokens == expected
    (window,) = _windows([f for _, f in host.frames[(0, 1)]])
    assert len(window.token_times) == len(tokens)
    want = reference["token_timestamps"][0][: len(tokens)].tolist()
    assert max(abs(a - b) for a, b in zip(window.token_times, want, strict=True)) <= 0.021
    assert window.temperature == 0.0 and not window.skipped

    # Logprobs of the text-only decode: the log-softmax of the logits with generate()'s masks (the
    # suppressed tokens, and at the first step the begin-suppressed ones), each token's own.
    plain = host.tokens(2)[1:]
    logprobs = [lp.logprob for _, f in host.frames[(0, 2)] for lp in f.logprobs or ()]
    assert math.isnan(logprobs[0]) and len(logprobs) == len(plain) + 1
    prefix = runner.model.rules.prefix(runner.model.rules.languages["en"], "transcribe", (), False)
    with torch.inference_mode():
        encoded = model.model.encoder(clip["features"]).last_hidden_state
        logits = model(decoder_input_ids=torch.tensor([prefix + plain]), encoder_outputs=(encoded,)).logits
        masked = logits[0].float().clone()
        masked[:, model.generation_config.suppress_tokens] = float("-inf")
        masked[len(prefix) - 1, model.generation_config.begin_suppress_tokens] = float("-inf")
        raw = torch.log_softmax(masked, -1)
    for k, token in enumerate(plain):
        assert logprobs[1 + k] == pytest.approx(float(raw[len(prefix) - 1 + k, token]), abs=1e-3)
    (plain_window,) = _windows([f for _, f in host.frames[(0, 2)]])
    eot = float(raw[len(prefix) - 1 + len(plain), runner.model.rules.eot])
    mean = (sum(logprobs[1:]) + eot) / (len(plain) + 1)
    assert plain_window.avg_logprob == pytest.approx(mean, abs=2e-3)
    sot_probs = torch.softmax(logits[0, prefix.index(runner.model.rules.sot)].float(), -1)
    assert plain_window.no_speech_prob == pytest.approx(
        float(sot_probs[runner.model.rules.no_speech]), abs=1e-4
    )
    assert plain_window.no_speech_prob < 0.1
    (silent,) = _windows([f for _, f in host.frames[(0, 3)]])
    assert silent.no_speech_prob > 0.5  # a silent window (the log-mel floor) says so


@pytest.fixture(scope="module")
def fallback_model(whisper_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of whisper-base whose generation config asks for Whisper's fallback, with a logprob
    threshold no decode passes: every window goes through all the temperatures."""
    folder = tmp_path_factory.mktemp("whisper-fallback")
    for item in whisper_base_model.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "generation_config.json").unlink()
    config = json.loads((whisper_base_model / "generation_config.json").read_text())
    config.update(compression_ratio_threshold=1.35, logprob_threshold=0.0, no_speech_threshold=0.6)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@needs_espeak
def test_a_failing_window_is_decoded_again_up_to_temperature_one(fallback_model: Path, clip: Any) -> None:
    """Speech fails the impossible logprob threshold at every temperature: the window is decoded six
    times (0.0 to 1.0) in the batch, and the last decode is kept and sent, held until then. A
    silent window with a high no-speech probability is skipped: no tokens."""
    registry = ModelRegistry("cpu", "float32", False)
    path = str(fallback_model)
    host = _host(registry)
    assert host.add(1, path, _payload(clip["features"], max_new=6)) is None
    assert host.add(2, path, _payload(torch.full_like(clip["features"], -1.5), max_new=6)) is None
    host.run()
    frames = [f for _, f in host.frames[(0, 1)]]
    assert len(frames) == 1, "a held window's tokens come in one frame"
    (window,) = _windows(frames)
    assert window.temperature == 1.0 and not window.skipped
    assert len(host.tokens(1)) == 1 + 6
    (silent,) = _windows([f for _, f in host.frames[(0, 2)]])
    assert silent.skipped and silent.temperature == 0.0 and host.tokens(2) == [host.tokens(1)[0]]
    assert registry.get(path).num_running == 0
    assert np.isfinite(window.avg_logprob)

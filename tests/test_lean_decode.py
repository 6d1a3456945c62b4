"""Decode and mixed steps without transformers' module machinery (``model_host.lean_decode``):
taken for the Llama family only when its logits equal the model's forward bit for bit (mixed
steps: its packed forward, or where that does not run, the separate forwards), and then greedy
tokens of a batch with mixed lengths and arrivals stay those of a lone ``generate()``. Through the server,
the demo model (Qwen2) decodes this way in every test that compares it with ``generate()``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from model_host import lean_decode
from model_host.engine import Engine
from model_host.ipc.settings import HostSettings
from model_host.registry import ModelRegistry
from model_host.runners.causal import CausalRunner
from tests.host_harness import Host, generate, prompt
from tests.server import ServerProcess

VOCAB = 1000  # the harness's prompts use ids 3-775


def _save(folder: Path, config: Any) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def _config(family: str, **extra: Any) -> Any:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen3Config

    small = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if family == "llama":
        return LlamaConfig(**small, attention_bias=True, mlp_bias=True, **extra)
    if family == "mistral":
        return MistralConfig(**{**small, "sliding_window": None, **extra})  # its default is 4096
    if family == "qwen3":
        return Qwen3Config(**small, head_dim=16, **extra)
    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512)


def _runner(folder: Path, lean: bool = True) -> tuple[ModelRegistry, CausalRunner]:
    registry = ModelRegistry("cpu", "float32", False, lean_decode=lean)
    runner = registry.get(str(folder))
    assert isinstance(runner, CausalRunner)
    return registry, runner


class _Counting:
    """A lean step that counts its decode and mixed steps."""

    def __init__(self, lean: lean_decode.LeanDecode) -> None:
        self.lean, self.packs = lean, lean.packs
        self.calls = {"decode": 0, "packed": 0}

    def __call__(self, *args: Any) -> torch.Tensor:
        self.calls["decode"] += 1
        return self.lean(*args)

    def packed(self, *args: Any) -> torch.Tensor:
        self.calls["packed"] += 1
        return self.lean.packed(*args)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_greedy_tokens_equal_lone_generate(family: str, tmp_path: Path) -> None:
    folder = _save(tmp_path / family, _config(family))
    registry, runner = _runner(folder)
    lean = runner.model.lean
    assert lean is not None and lean.packs  # mixed steps too: equal to the model's packed forward
    counting = _Counting(lean)
    runner.model.lean = counting  # type: ignore[assignment]
    cases = [prompt(n, 500 + i) for i, n in enumerate([3, 9, 17, 30, 5, 44, 1])]  # 1: no cache yet
    host = Host(Engine(registry, HostSettings(device="cpu"), 64))  # a small budget: staggered starts
    for rid, ids in enumerate(cases):
        host.add(rid, str(folder), generate(ids, 20, stop=()))
    host.run()
    assert counting.calls["decode"] > 10 and counting.calls["packed"] > 0, counting.calls
    model = runner.model.model
    for rid, ids in enumerate(cases):
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None)
        assert host.tokens(rid) == out[0, len(ids) :].tolist(), f"{family} request {rid}"
    registry.unload(str(folder))


def test_other_models_keep_their_forward(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="model_host.lean_decode")
    cases = {
        "gpt2": _config("gpt2"),  # not of the family
        "sliding": _config("mistral", sliding_window=8),  # a mask that the lean step does not build
    }
    for name, config in cases.items():
        folder = _save(tmp_path / name, config)
        registry, runner = _runner(folder)
        assert runner.model.lean is None, name
        host = Host(Engine(registry, HostSettings(device="cpu"), 256))
        host.add(0, str(folder), generate(prompt(20, 1), 12, stop=()))
        host.run()
        assert len(host.tokens(0)) == 12
    assert "sliding-window layers" in caplog.text or "a sliding window" in caplog.text
    assert "gpt2 is not of the Llama family" in caplog.text


def test_logits_that_differ_keep_the_models_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model_host.lean_decode")
    original = lean_decode.LeanDecode.__call__
    monkeypatch.setattr(lean_decode.LeanDecode, "__call__", lambda self, *a: original(self, *a) + 1e-6)
    _, runner = _runner(_save(tmp_path / "llama", _config("llama")))
    assert runner.model.lean is None
    assert "its logits differ from the model's forward" in caplog.text


def test_the_demo_model_decodes_lean_unless_turned_off(demo_model: Path) -> None:
    for lean in (True, False):
        registry, runner = _runner(demo_model, lean)
        assert (runner.model.lean is not None) is lean
        # Qwen2's forward takes the packed row: the lean mixed step equals it bit for bit.
        assert runner.model.lean is None or runner.model.lean.packs
        registry.unload(str(demo_model))


def test_the_server_decodes_lean_by_default(server: ServerProcess) -> None:
    """The shared demo server (its greedy outputs are compared with ``generate()`` elsewhere)
    takes the lean steps; ``--no-lean-decode`` is the switch that keeps the model's forward."""
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    c.chat.completions.create(
        model="hfserve-demo", messages=[{"role": "user", "content": "Hello!"}], max_tokens=2
    )
    assert "decode steps run lean" in server.log_text()


def test_no_lean_decode_keeps_the_models_forward(cache_dir: Path) -> None:
    with ServerProcess.start(cache_dir, workers=1, args=("--no-lean-decode",)) as srv:
        c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
        reply = c.chat.completions.create(
            model="hfserve-demo", messages=[{"role": "user", "content": "Hello!"}], temperature=0
        )
        assert reply.choices[0].message.content == "Hello! How can I help you today?"
        assert "decode steps run lean" not in srv.log_text()

"""Unit tests under the end-to-end ones in test_transformers_chat.py: how ``generation_config``
folds into a request, and how the model host unloads models on ``/reset``."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from model_host.prefix_cache import PrefixCache
from model_host.registry import ModelRegistry
from sanic_serve.chat.request import parse_chat_request
from sanic_serve.completions.request import parse_completion_request
from sanic_serve.errors import APIError
from sanic_serve.generation_config import config_stop_token_ids, config_temperature

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(**body: Any) -> Any:
    return parse_chat_request({"model": "m", "messages": MESSAGES, **body})


def test_config_fills_what_the_request_leaves_unset() -> None:
    req = chat(generation_config='{"max_new_tokens": 7, "temperature": 0.4, "top_k": 5, "stop_strings": "x"}')
    assert (req.max_new_tokens, req.temperature, req.top_k, req.stop_strings) == (7, 0.4, 5, ["x"])
    req = chat(
        max_completion_tokens=3,
        temperature=0.9,
        stop=["y"],
        generation_config={"max_new_tokens": 7, "temperature": 0.4, "stop_strings": ["x"], "top_p": 0.5},
    )
    assert (req.max_new_tokens, req.temperature, req.stop_strings, req.top_p) == (3, 0.9, ["y"], 0.5)


def test_completions_default_max_tokens_gives_way_to_the_config() -> None:
    req = parse_completion_request({"model": "m", "prompt": "a", "generation_config": {"max_new_tokens": 40}})
    assert req.max_new_tokens == 40
    assert parse_completion_request({"model": "m", "prompt": "a"}).max_new_tokens == 16


def test_do_sample_false_means_greedy_even_with_a_temperature() -> None:
    assert chat(temperature=1.2, generation_config={"do_sample": False}).temperature == 0.0
    assert chat(generation_config={"do_sample": False, "temperature": 0.7}).temperature == 0.0


def test_max_length_is_ignored_beside_max_new_tokens_only() -> None:
    assert chat(generation_config={"max_new_tokens": 4, "max_length": 99}).max_new_tokens == 4
    with pytest.raises(APIError) as info:
        chat(generation_config={"max_length": 99})
    assert info.value.param == "generation_config.max_length"


@pytest.mark.parametrize(
    ("config", "param"),
    [
        ({"num_beams": True}, "generation_config.num_beams"),  # a boolean is not the integer 1
        ({"top_p": 0}, "generation_config.top_p"),
        ({"stop_strings": [""]}, "generation_config.stop_strings"),
        ({"do_sample": "yes"}, "generation_config.do_sample"),
        ({"eos_token_id": [-1]}, "generation_config.eos_token_id"),
        ({"seed": 1}, "generation_config.seed"),  # GenerationConfig has none; the request field does
    ],
)
def test_bad_fields_are_named(config: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as info:
        chat(generation_config=config)
    assert info.value.status == 400 and info.value.param == param


def fake_bundle(default_temperature: float = 0.0, vocab: int = 100) -> Any:
    tokenizer = SimpleNamespace(get_vocab_size=lambda with_added_tokens: vocab)
    return SimpleNamespace(default_temperature=default_temperature, stop_token_ids=(2,), tokenizer=tokenizer)


def test_sampling_asked_of_a_greedy_model() -> None:
    sample = chat(generation_config={"do_sample": True})
    assert config_temperature(sample, fake_bundle(0.0)) == 1.0  # transformers' default
    assert config_temperature(sample, fake_bundle(0.6)) == 0.6  # a sampling model keeps its own
    assert config_temperature(chat(generation_config={"max_new_tokens": 3}), fake_bundle(0.0)) == 0.0
    assert (
        config_temperature(chat(temperature=0.3, generation_config={"do_sample": True}), fake_bundle()) == 0.3
    )


def test_eos_token_id_replaces_the_models_end_tokens() -> None:
    assert config_stop_token_ids(chat(generation_config={"eos_token_id": [7, 8]}), fake_bundle()) == (7, 8)
    assert config_stop_token_ids(chat(generation_config={"eos_token_id": 9}), fake_bundle()) == (9,)
    assert config_stop_token_ids(chat(), fake_bundle()) == (2,)
    assert (
        config_stop_token_ids(chat(ignore_eos=True, generation_config={"eos_token_id": 7}), fake_bundle())
        == ()
    )
    with pytest.raises(APIError) as info:
        config_stop_token_ids(chat(generation_config={"eos_token_id": 100}), fake_bundle(vocab=100))
    assert info.value.param == "generation_config.eos_token_id"


# -- unloading in the model host ---------------------------------------------------------------


def test_prefix_cache_drops_one_models_entries() -> None:
    cache = PrefixCache(capacity_bytes=1 << 20, min_tokens=2)
    layers = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]
    cache.store("a", [1, 2, 3, 4], layers)
    cache.store("b", [1, 2, 3, 4], layers)
    assert cache.drop_model("a") == 1
    assert cache.match("a", [1, 2, 3, 4, 5]) is None and cache.match("b", [1, 2, 3, 4, 5]) is not None
    assert cache.nbytes == sum(k.numel() * 4 + v.numel() * 4 for k, v in layers)


def test_registry_unload_frees_the_model(demo_model: Path, tmp_path: Path) -> None:
    # Which models may go (not the preloaded one, none with requests in flight) is tested end to
    # end in test_transformers_chat.py; here: an unloaded model is really let go of.
    other = tmp_path / "other"
    shutil.copytree(demo_model, other)
    keep, idle = str(demo_model), str(other)
    registry = ModelRegistry("cpu", "float32", False)
    registry.get(keep)
    freed = weakref.ref(registry.get(idle))
    assert registry.unload(idle)
    gc.collect()
    assert freed() is None  # nothing holds the weights any more
    assert registry.loaded() == (keep,)
    assert not registry.unload(idle)

"""The model host's compute threads (``model_host.threads``): timed per model on the CPU, the most
any loaded model wants applied, a fixed ``--torch-threads`` left alone. The demo model is timed for
real; where a test needs one verdict or the other, the measured speedup is replaced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from model_host import threads
from model_host.registry import ModelRegistry
from model_host.threads import ThreadPolicy


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture()
def two_threads() -> None:
    torch.set_num_threads(2)  # the policy reads torch's count as its default


class _Untouchable(torch.nn.Module):
    """A model that must not be run."""

    def forward(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("the model was timed")


def test_a_fixed_count_is_neither_timed_nor_changed(two_threads: None) -> None:
    policy = ThreadPolicy(3)
    assert policy.choose(_Untouchable(), torch.device("cpu"), "m") == 3
    assert policy.apply([1]) == 1
    assert torch.get_num_threads() == 2  # the host set the fixed count at start; apply leaves it


def test_a_big_model_is_not_timed(two_threads: None) -> None:
    big = _Untouchable()
    big.weight = torch.nn.Parameter(torch.empty(20_000, 10_000, device="meta"))  # 200M params
    assert ThreadPolicy(0).choose(big, torch.device("cpu"), "big") == 2


def test_a_model_off_the_cpu_is_not_timed(two_threads: None) -> None:
    assert ThreadPolicy(0).choose(_Untouchable(), torch.device("meta"), "m") == 2


@pytest.mark.parametrize(("speedup", "chosen"), [(0.9, 1), (1.1, 1), (1.2, 2), (1.9, 2), (None, 2)])
def test_one_thread_when_more_do_not_pay(
    two_threads: None, monkeypatch: pytest.MonkeyPatch, speedup: float | None, chosen: int
) -> None:
    monkeypatch.setattr(threads, "_speedup", lambda *_: speedup)
    assert ThreadPolicy(0).choose(_Untouchable(), torch.device("cpu"), "m") == chosen


def test_a_model_that_cannot_be_timed_wants_the_default(two_threads: None) -> None:
    assert ThreadPolicy(0).choose(_Untouchable(), torch.device("cpu"), "m") == 2
    assert torch.get_num_threads() == 2


def test_the_demo_model_is_timed_for_real(two_threads: None, demo_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32).eval()
    speedup = threads._speedup(model, torch.device("cpu"), 2)
    # None only when a forward took over 10 ms: a machine too loaded to time anything.
    assert speedup is None or 0.2 < speedup < 5
    assert ThreadPolicy(0).choose(model, torch.device("cpu"), "demo") in (1, 2)
    assert torch.get_num_threads() == 2  # timing leaves the count where it was


def test_the_most_wanted_count_applies(two_threads: None) -> None:
    policy = ThreadPolicy(0)
    assert policy.apply([1]) == 1 and torch.get_num_threads() == 1
    assert policy.apply([1, 2]) == 2 and torch.get_num_threads() == 2
    policy.apply([1])
    assert policy.apply([]) == 2 and torch.get_num_threads() == 2  # nothing loaded: the default


def test_the_registry_applies_the_choice_on_load_and_unload(
    two_threads: None, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "_speedup", lambda *_: 0.95)
    registry = ModelRegistry("cpu", "float32", False, torch_threads=0)
    registry.get(str(demo_model))
    assert torch.get_num_threads() == 1
    registry.unload(str(demo_model))
    assert torch.get_num_threads() == 2


def test_a_registry_without_a_policy_leaves_the_count_alone(
    two_threads: None, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "_speedup", lambda *_: 0.95)
    registry = ModelRegistry("cpu", "float32", False)
    registry.get(str(demo_model))
    assert torch.get_num_threads() == 2
    registry.unload(str(demo_model))

"""The step pacer's arithmetic (model_host/pacer.py); the engine's use of it is covered by the host
unit tests and, in time, by ``benchmarks/engine_ab.py``."""

from __future__ import annotations

import pytest

from cli.preflight import ConfigError, check_placement
from model_host.ipc.settings import HostSettings
from model_host.pacer import StepPacer


def test_without_a_target_the_budget_is_fixed() -> None:
    pacer = StepPacer(256)
    pacer.observe(decode_s=0.5, decoded=True, admit_s=1.0, work_tokens=100)
    assert pacer.budget_tokens(decoding=True) == 256


def test_the_budget_fills_what_the_decode_leaves_of_the_target() -> None:
    pacer = StepPacer(256, target_s=0.1)
    assert pacer.budget_tokens(decoding=True) == 256  # nothing measured yet
    pacer.observe(decode_s=0.04, decoded=True, admit_s=0.05, work_tokens=100)  # 0.5 ms a token
    assert pacer.budget_tokens(decoding=True) == 120  # (100 - 40) ms / 0.5 ms
    assert pacer.budget_tokens(decoding=False) == 256  # no stream to hold up


def test_the_budget_stays_within_floor_and_cap() -> None:
    pacer = StepPacer(256, target_s=0.1)
    pacer.observe(decode_s=0.2, decoded=True, admit_s=0.05, work_tokens=100)  # decoding alone overruns
    assert pacer.budget_tokens(decoding=True) == pacer.floor_tokens == 32
    fast = StepPacer(256, target_s=0.1)
    fast.observe(decode_s=0.001, decoded=True, admit_s=0.001, work_tokens=100)
    assert fast.budget_tokens(decoding=True) == 256


def test_estimates_follow_a_change_within_a_few_steps() -> None:
    pacer = StepPacer(1024, target_s=0.2)
    pacer.observe(decode_s=0.02, decoded=True, admit_s=0.02, work_tokens=100)
    before = pacer.budget_tokens(decoding=True)
    for _ in range(8):  # the machine got four times slower
        pacer.observe(decode_s=0.02, decoded=True, admit_s=0.08, work_tokens=100)
    after = pacer.budget_tokens(decoding=True)
    assert before == 900 and 225 <= after < 260  # 180 ms at 0.8 ms a token would be 225
    pacer.observe(decode_s=0.02, decoded=True, admit_s=0.0, work_tokens=2)  # too small to say
    assert pacer.budget_tokens(decoding=True) == after


def test_step_target_by_device_and_never_under_tensor_parallelism() -> None:
    assert HostSettings().step_target_s("cpu") > 0
    assert HostSettings().step_target_s("cuda") == 0
    assert HostSettings(step_target_ms=0).step_target_s("cpu") == 0
    assert HostSettings(step_target_ms=250).step_target_s("cuda") == 0.25
    assert HostSettings(tp_size=2).step_target_s("cpu") == 0
    with pytest.raises(ConfigError, match="--step-target-ms cannot be used with --tp"):
        check_placement("cpu", "", 2, 0.0, 100.0)

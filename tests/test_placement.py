"""Models bigger than one device: ``--device-map`` (accelerate's placement) is wired end to end, and
``--tp`` (tensor parallelism) refuses clearly where it cannot run; on CPU it runs its ranks over
gloo (a slow test)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.preflight import ConfigError, check_placement
from tests.server import ServerProcess
from tests.test_startup import _assert_one_line_error, _run_start

MODEL = "hfserve-demo"
PROMPTS = [("Hello!", 24), ("Tell me a joke", 9), ("What is 4 plus 5?", 17), ("Who are you?", 30)]


def greedy(server: ServerProcess, prompts: list[tuple[str, int]]) -> list[str]:
    """Every prompt at once (so they share batches), greedy, each with its own length."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=180) as client:

            async def one(text: str, max_tokens: int) -> str:
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": text}],
                    "temperature": 0,
                    "max_tokens": max_tokens,
                }
                resp = await client.post(f"{server.base_url}/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                return str(resp.json()["choices"][0]["message"]["content"])

            return list(await asyncio.gather(*(one(t, n) for t, n in prompts)))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def mapped(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(cache_dir, workers=1, args=("--device-map", "auto")) as srv:
        yield srv


def test_device_map_auto_places_through_accelerate_and_replies_the_same(
    mapped: ServerProcess, server: ServerProcess
) -> None:
    # accelerate's map of a CPU-only machine is one device: the host says where it went.
    assert "placed by device_map=auto: cpu" in mapped.log_text()
    assert greedy(mapped, PROMPTS) == greedy(server, PROMPTS)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(
    "device, device_map, tp, idle_unload_s, needle",
    [
        ("auto", "everywhere", 1, 0.0, "--device-map 'everywhere'"),
        ("auto", "auto", 2, 0.0, "choose one"),
        ("cpu", "auto", 1, 0.0, "leave --device at auto"),
        ("cpu", "", 2, 5.0, "--idle-unload-s"),
        ("cuda:1", "", 2, 0.0, "leave --device at auto"),
    ],
)
def test_placement_options_that_cannot_work_are_refused(
    device: str, device_map: str, tp: int, idle_unload_s: float, needle: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_placement(device, device_map, tp, idle_unload_s)


def test_placement_options_that_can_work_pass() -> None:
    check_placement("auto", "auto", 1)  # accelerate is installed with the test extra
    check_placement("cpu", "", 2)  # ranks over gloo: runs anywhere


def test_tensor_parallelism_without_enough_gpus_is_refused(cache_dir: Path) -> None:
    # End to end: the option reaches the check, and the refusal is one line and exit 1.
    count = _cuda_devices()
    if count >= 2:
        pytest.skip("this machine has GPUs for --tp 2")
    _assert_one_line_error(
        _run_start(cache_dir, "--tp", "2"), "--tp 2: tensor parallelism needs 2 CUDA devices", f"has {count}"
    )


@pytest.mark.slow
def test_tensor_parallelism_on_cpu_replies_the_same_and_stops_its_ranks(
    cache_dir: Path, demo_model: Path, server: ServerProcess
) -> None:
    with ServerProcess.start(cache_dir, workers=1, args=("--device", "cpu", "--tp", "2")) as tp:
        assert "placed by tensor parallelism over 2 ranks" in tp.log_text()
        # A second round finds the first's prompts in the prefix cache of every rank alike.
        for _ in range(2):
            assert greedy(tp, PROMPTS) == greedy(server, PROMPTS)
        followers = tp.titled("model_host.tensor_parallel")
        assert len(followers) == 1
        assert tp.stop() == 0  # rank 0 tells its follower to stop, and it does
        followers[0].wait(10)

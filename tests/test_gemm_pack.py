"""Linear weights packed for the decode step's row count (``model_host.gemm_pack``): the products
match the plain ones, the packed row count follows the batch, greedy tokens stay those of a lone
``generate()``, in process and through the real server."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from torch import nn

from model_host import gemm_pack
from model_host.engine import Engine
from model_host.gemm_pack import MIN_ROWS, WINDOW_STEPS, GemmPacks, PackedLinear, pack_linears
from model_host.ipc.settings import HostSettings
from model_host.registry import ModelRegistry
from model_host.runners.causal import CausalRunner
from tests.host_harness import Host, generate, prompt
from tests.server import ServerProcess, stream_chat_text
from tests.test_batching import _lone_generate, _prompts

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs MKL (x86 torch)")


def _linears(n: int, in_features: int = 512, out_features: int = 384) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(in_features, out_features) for _ in range(n)]


@torch.inference_mode()
def test_products_match_plain_ones_packed_padded_or_not() -> None:
    (linear,) = _linears(1)
    weight, bias = linear.weight.clone(), linear.bias.clone()
    packs = GemmPacks([linear])
    assert isinstance(linear, PackedLinear) and isinstance(linear, nn.Linear)
    packs.pack(16)
    for rows in (1, 5, 8, 9, 12, 16, 17, 40):  # 9-16 take the packed path, 9-15 padded
        x = torch.randn(rows, 1, 512)
        before = packs.products
        out = linear(x)
        assert out.shape == (rows, 1, 384)
        torch.testing.assert_close(out, nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        assert packs.products - before == (1 if 8 < rows <= 16 else 0), rows
    packs.unpack()
    assert linear.packed is None and packs.rows == 0
    x = torch.randn(16, 512)
    torch.testing.assert_close(linear(x), nn.functional.linear(x, weight, bias))


def test_the_packed_row_count_follows_the_batch() -> None:
    packs = GemmPacks(_linears(2))
    for _ in range(WINDOW_STEPS - 1):
        packs.observe(30)
    assert packs.rows == 0  # a window is not full yet
    packs.observe(29)
    assert packs.rows == 32  # the usual rows, rounded up
    # Just packed: the time spent packing is far over its share of the time since load.
    for _ in range(WINDOW_STEPS):
        packs.observe(MIN_ROWS)
    assert packs.rows == 32
    packs._created_s -= 1000.0  # as if loaded long ago: a repack is within the share
    for _ in range(WINDOW_STEPS):
        packs.observe(MIN_ROWS)
    assert packs.rows == MIN_ROWS
    for _ in range(WINDOW_STEPS):  # a lone stream: too few rows to pack for, the copy stays
        packs.observe(1)
    assert packs.rows == MIN_ROWS


def test_a_packed_product_that_differs_turns_packing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    linears = _linears(2)
    packs = GemmPacks(linears)
    monkeypatch.setattr(gemm_pack, "_matches", lambda linear, rows: False)
    packs.pack(16)
    assert packs.disabled and packs.rows == 0 and all(linear.packed is None for linear in linears)
    monkeypatch.undo()
    for _ in range(WINDOW_STEPS):
        packs.observe(16)
    assert packs.rows == 0  # never again
    x = torch.randn(16, 512)
    with torch.inference_mode():
        torch.testing.assert_close(linears[0](x), nn.functional.linear(x, linears[0].weight, linears[0].bias))
    assert packs.products == 0


def test_not_packed_when_the_copy_would_not_fit_or_not_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(*_linears(2))
    monkeypatch.setattr(gemm_pack, "available_bytes", lambda: 4 * 512 * 384 * 2 * 3)  # copy > 1/4
    assert pack_linears(model, "m") is None
    assert pack_linears(nn.Sequential(nn.Linear(64, 256)), "m") is None  # too small to gain
    assert all(type(m) is nn.Linear for m in model)
    monkeypatch.setattr(gemm_pack, "available_bytes", lambda: 1 << 40)
    assert pack_linears(nn.Sequential(*_linears(2)).to(torch.bfloat16), "m") is None
    assert pack_linears(model, "m") is not None
    assert all(type(m) is PackedLinear for m in model)


@pytest.fixture(scope="module")
def wide_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's tokenizer and template on random weights wide enough to be packed (the demo
    model's own layers are under ``MIN_WEIGHT_ELEMENTS``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("wide") / "model"
    shutil.copytree(demo_model, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = AutoConfig.from_pretrained(demo_model)
    config.update({"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def packed_runner(wide_model: Path) -> Iterator[tuple[ModelRegistry, CausalRunner]]:
    registry = ModelRegistry("cpu", "float32", False, pack_weights=True)
    runner = registry.get(str(wide_model))
    assert isinstance(runner, CausalRunner)
    yield registry, runner
    registry.unload(str(wide_model))


def test_the_demo_model_is_too_small_to_pack(demo_model: Path) -> None:
    registry = ModelRegistry("cpu", "float32", False, pack_weights=True)
    runner = registry.get(str(demo_model))
    assert isinstance(runner, CausalRunner) and runner.model.gemm is None
    registry.unload(str(demo_model))


def test_greedy_tokens_with_packed_weights_equal_lone_generate(
    packed_runner: tuple[ModelRegistry, CausalRunner], wide_model: Path
) -> None:
    registry, runner = packed_runner
    gemm = runner.model.gemm
    assert gemm is not None
    gemm.pack(8)  # six rows are padded to eight; as they finish, the plain path takes over
    cases = [prompt(n, 300 + i) for i, n in enumerate([3, 9, 17, 30, 5, 44])]
    host = Host(Engine(registry, HostSettings(device="cpu"), 6 * 44))
    for rid, ids in enumerate(cases):
        host.add(rid, str(wide_model), generate(ids, 24, stop=()))
    before = gemm.products
    host.run()
    assert gemm.products > before
    model = runner.model.model
    for rid, ids in enumerate(cases):
        with torch.inference_mode():  # one row: the plain product
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert host.tokens(rid) == out[0, len(ids) :].tolist(), f"request {rid}"


@pytest.fixture(scope="module")
def wide_server(cache_dir: Path, wide_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(cache_dir, workers=2, args=("--model", str(wide_model))) as srv:
        yield srv


def test_server_packs_for_its_batch_and_keeps_greedy_outputs(
    wide_server: ServerProcess, wide_model: Path
) -> None:
    """16 streams long enough for a window of decode steps make the host pack for ~16 rows;
    16 greedy requests then decode on the packed weights and equal a lone ``generate()``."""
    server = wide_server
    prompts = _prompts(16, seed=11)
    expected = _lone_generate(wide_model, prompts, 40)
    model = str(wide_model)

    async def run(max_tokens: int, ignore_eos: bool) -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        extra = {"extra_body": {"ignore_eos": True}} if ignore_eos else {}
        try:
            return list(
                await asyncio.gather(
                    *(
                        stream_chat_text(c, p, model=model, temperature=0, max_tokens=max_tokens, **extra)
                        for p in prompts
                    )
                )
            )
        finally:
            await c.close()

    asyncio.run(run(2 * WINDOW_STEPS, True))
    packed = [int(n) for n in re.findall(r"linear weights packed for (\d+) rows", server.log_text())]
    assert packed and packed[-1] >= MIN_ROWS, server.log_text()[-3000:]
    got = asyncio.run(run(40, False))
    assert got == expected

"""Loaded models, keyed by the local folder the worker resolved the request's model to, each behind
the runner of its kind (chosen from the folder's own files by ``detect_kind``)."""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Callable

import torch

from model_host.causal_lm import CausalLM, Placement
from model_host.embedding import EmbeddingModel
from model_host.errors import DeviceError, ModelLoadError
from model_host.ipc.embedding_files import EmbeddingLoadError
from model_host.ipc.model_kind import ModelKind, detect_kind
from model_host.prefix_cache import PrefixCache
from model_host.runners.base import Runner
from model_host.runners.causal import CausalRunner
from model_host.runners.embedding import EmbeddingRunner
from model_host.runners.seq2seq import Seq2SeqRunner
from model_host.runners.vision import VisionRunner
from model_host.threads import ThreadPolicy
from model_host.vision_lm import VisionLM
from model_host.whisper_model import WhisperModel

__all__ = ["DeviceError", "ModelLoadError", "ModelRegistry", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not (
        torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    ):
        raise DeviceError(f"device {name!r} is not usable by this build of torch ({torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r} is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 where the hardware is built for it; CPUs here are fastest and exact in fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRegistry:
    def __init__(
        self,
        device: str,
        dtype: str,
        trust_remote_code: bool,
        prefix_cache: PrefixCache | None = None,
        placement: Placement | None = None,
        torch_threads: int | None = None,
        pack_weights: bool = False,
        lean_decode: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self.prefix_cache = prefix_cache
        # Causal LMs spread by accelerate's device map or tensor parallelism instead of ``device``.
        self.placement = placement
        self._runners: dict[str, Runner] = {}
        # ``--torch-threads`` (0: chosen per model, ``model_host.threads``); None leaves torch's
        # thread count alone (a caller that manages it, tests).
        self._threads = ThreadPolicy(torch_threads) if torch_threads is not None else None
        self._wanted_threads: dict[str, int] = {}
        self.pack_weights = pack_weights  # causal LMs on the CPU: packed weights (model_host.gemm_pack)
        self.lean_decode = lean_decode  # causal LMs: decode steps by model_host.lean_decode
        self._last_used: dict[str, float] = {}  # path -> CLOCK_MONOTONIC of its last admission or work
        # Told of every completed load (path, seconds): the host counts them for /metrics.
        self.on_load: Callable[[str, float], None] | None = None
        # Told when a load starts: a load holds the host's loop far longer than a step may.
        self.on_load_start: Callable[[str], None] | None = None

    def loaded(self) -> tuple[str, ...]:
        return tuple(self._runners)

    def runners(self) -> list[Runner]:
        return list(self._runners.values())

    def get(self, path: str) -> Runner:
        """The runner of the model in ``path``, loading it first; raises ``ModelLoadError``."""
        found = self._runners.get(path)
        runner = found if found is not None else self._load(path)
        self._last_used[path] = time.monotonic()
        return runner

    def touch(self, path: str, now: float) -> None:
        """``path`` has work (a request waiting or running) at ``now``."""
        if path in self._runners:
            self._last_used[path] = now

    def idle_for_s(self, path: str, now: float) -> float:
        return now - self._last_used.get(path, now)

    def _load(self, path: str) -> Runner:
        if self.on_load_start is not None:
            self.on_load_start(path)
        started = time.monotonic()
        kind = detect_kind(path)
        runner: Runner
        if kind is ModelKind.EMBEDDING:
            try:
                model = EmbeddingModel.load(
                    path, self.device, self.dtype, trust_remote_code=self.trust_remote_code
                )
            except EmbeddingLoadError as exc:
                raise ModelLoadError(f"cannot load embedding model from {path}: {exc}") from exc
            runner = EmbeddingRunner(path, model)
        elif kind is ModelKind.SEQ2SEQ:
            runner = Seq2SeqRunner(path, WhisperModel.load(path, self.device, self.dtype))
        elif kind is ModelKind.VISION:
            runner = VisionRunner(
                VisionLM.load(path, self.device, self.dtype, self.trust_remote_code, None, self.pack_weights),
                self.prefix_cache,
            )
        else:
            lm = CausalLM.load(
                path,
                self.device,
                self.dtype,
                self.trust_remote_code,
                self.placement,
                self.pack_weights,
                self.lean_decode,
            )
            if self._threads is not None and self.placement is None:  # placed: every rank alike
                self._wanted_threads[path] = self._threads.choose(lm.model, self.device, path)
            runner = CausalRunner(lm, self.prefix_cache)
        self._runners[path] = runner
        self._apply_threads()
        load_s = time.monotonic() - started
        log.info("loaded %s (%s) on %s (%s) in %.2f s", path, kind, self.device, self.dtype, load_s)
        if self.on_load is not None:
            self.on_load(path, load_s)
        return runner

    def _apply_threads(self) -> None:
        """The most threads any loaded model wants; a model that was not timed wants the default."""
        if self._threads is not None:
            default = self._threads.default_threads
            self._threads.apply(self._wanted_threads.get(path, default) for path in self._runners)

    def unload(self, path: str) -> bool:
        """Forget a loaded model and give its memory back. The caller makes sure nothing still
        uses it (no request in flight, no batch holding it)."""
        runner = self._runners.pop(path, None)
        self._last_used.pop(path, None)
        self._wanted_threads.pop(path, None)
        if runner is None:
            return False
        self._apply_threads()
        runner.close()
        del runner
        # Layers reference each other (modules, tied weights, hooks): a collection frees them now
        # rather than at some later allocation, and the CUDA allocator can then hand the blocks
        # back to the device.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        _trim_heap()
        log.info("unloaded %s", path)
        return True


def _trim_heap() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise, so the host's memory
    would not shrink after an unload). A no-op where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

"""The model host's settings: declared once, here, with their defaults. The command line takes its
defaults from this class, the HTTP workers read the limits they pre-check from it, and the host and
its scheduler run by it. Torch-free and picklable: the main process hands it to the host."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# The host's exit status for a setting it cannot start with (a model that does not load, a device
# this torch cannot use): the server stops (see ``config_error_exit``) instead of restarting the
# host forever.
HOST_CONFIG_ERROR_EXIT = 78  # EX_CONFIG in sysexits.h

# ``hfserve start``'s exit status for settings it cannot use is 1, like any failure of a command a
# person typed. A service manager needs to tell "a restart would only repeat this" from a crash: the
# systemd unit sets this variable to 78 (EX_CONFIG) and says RestartPreventExitStatus=78.
CONFIG_ERROR_EXIT_ENV = "HFSERVE_CONFIG_ERROR_EXIT"


def config_error_exit(env: Mapping[str, str] | None = None) -> int:
    """The exit status for a settings error: ``$HFSERVE_CONFIG_ERROR_EXIT`` when it is a status
    (1-255), else 1."""
    value = (os.environ if env is None else env).get(CONFIG_ERROR_EXIT_ENV, "")
    return int(value) if value.isdigit() and 1 <= int(value) <= 255 else 1


@dataclass(frozen=True)
class HostSettings:
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    # Causal LMs placed by accelerate across the GPUs and CPU memory (auto, balanced,
    # balanced_low_0, sequential) instead of on ``device``; "": off.
    device_map: str = ""
    # Tensor parallelism: causal LMs sharded over this many GPUs (transformers' tp_plan "auto"),
    # one host process per GPU under torch.distributed, rank 0 serving (model_host/tensor_parallel.py).
    tp_size: int = 1
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16
    trust_remote_code: bool = False
    preload: tuple[str, ...] = ()  # local model folders to load at start (and never unload)
    log_level: str = "INFO"
    torch_threads: int = 0  # 0: torch's default
    # Float32 causal LMs on the CPU multiply by Linear weights packed for their decode steps' row
    # count (model_host/gemm_pack.py): faster steps for one extra copy of those weights in memory.
    pack_weights: bool = True
    # Decode steps of Llama-family models skip transformers' module machinery (same operators,
    # bit-identical logits, checked at load; model_host/lean_decode.py).
    lean_decode: bool = True
    max_batch_size: int = 64  # requests running at once, all models together
    max_batch_tokens: int = 0  # prompt tokens computed per step; 0: by device (see prefill_budget)
    # A token in the middle of a stream may wait this long to go out with the next ones: fewer,
    # larger chunks when steps are faster than this; 0: every step's tokens at once.
    stream_interval_ms: int = 0
    max_queue: int = 256  # requests waiting for a batch slot, all workers together
    prefix_cache_mb: int = 1024  # KV kept for prompts that start like earlier ones; 0: off
    # Models loaded on demand (not preloaded) that served nothing for this long are unloaded; 0: never.
    idle_unload_s: float = 0.0

    def prefill_budget(self, device_type: str) -> int:
        """``max_batch_tokens``, or the default for the device. Measured on a 2-core CPU
        (benchmarks/): 256 tokens per step keeps TTFT and inter-token latency low at no cost in
        throughput, where 2048 stalled every decode for ~1 s; a GPU prefills thousands of tokens
        in the time of one decode step."""
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return 4096 if device_type == "cuda" else 256

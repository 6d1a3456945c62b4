"""Entry point of the model-host process, importable without torch.

The main process hands this function to Sanic's worker manager; torch is imported only inside the
spawned host process, so neither the main process nor the HTTP workers ever load it.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from types import FrameType

from model_host.ipc.channels import HostSide

# The host's exit status for a setting it cannot start with (a model that does not load, a device
# this torch cannot use): the server reports it and exits 1 instead of restarting the host forever.
HOST_CONFIG_ERROR_EXIT = 78  # EX_CONFIG in sysexits.h


@dataclass(frozen=True)
class HostSettings:
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    preload: tuple[str, ...] = ()  # local model folders to load at start
    log_level: str = "INFO"
    torch_threads: int = 0  # 0: torch's default
    max_batch_size: int = 64  # running requests
    max_batch_tokens: int = 0  # prompt tokens prefilled per step; 0: by device (see process.py)
    max_queue: int = 256  # waiting requests, all workers together
    prefix_cache_mb: int = 1024  # KV kept for prompts that start like earlier ones; 0: off


def run_host(side: HostSide, settings: HostSettings) -> None:
    # A stop that arrives while torch is still being imported or a model loaded has nothing to
    # save: leave quietly (host_main installs the graceful handlers once the host exists).
    signal.signal(signal.SIGINT, _exit_quietly)
    signal.signal(signal.SIGTERM, _exit_quietly)
    from model_host.process import host_main

    host_main(side, settings)


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)

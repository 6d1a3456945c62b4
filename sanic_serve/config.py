"""Server settings shared by the main process and every worker (picklable, torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from model_host.ipc.channels import DEFAULT_RING_CAPACITY_BYTES
from model_host.ipc.launch import HostSettings


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # The model served when none is pinned, or the pinned one (``pinned=True``): its id and folder.
    default_model_id: str | None = None
    default_model_path: str | None = None
    pinned: bool = False
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    log_level: str = "INFO"
    max_request_bytes: int = 16 * 1024 * 1024  # the body limit of the generation routes
    # How long a request's headers, and then its body, may take to arrive: a slow or stalled
    # client gets a 408 (responses, streamed or not, have no such limit).
    request_timeout_s: float = 60.0
    ring_capacity_bytes: int = DEFAULT_RING_CAPACITY_BYTES
    torch_threads: int = 0
    max_batch_size: int = 64
    max_batch_tokens: int = 0  # 0: chosen by the host for its device
    max_queue: int = 256
    prefix_cache_mb: int = 1024
    tool_parser: str | None = None  # None: chosen from each model's chat template

    def host_settings(self) -> HostSettings:
        preload = (self.default_model_path,) if self.default_model_path else ()
        return HostSettings(
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            preload=preload,
            log_level=self.log_level,
            torch_threads=self.torch_threads,
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_queue=self.max_queue,
            prefix_cache_mb=self.prefix_cache_mb,
        )

"""Server settings shared by the main process and every worker (picklable, torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from model_host.ipc.channels import DEFAULT_RING_CAPACITY_BYTES
from model_host.ipc.settings import HostSettings
from sanic_serve.mcp.settings import MCPSettings
from sanic_serve.media.policy import MediaPolicy

# Room in a generation route's body for the text beside one image at the byte limit as a data URL.
_IMAGE_BODY_SLACK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # The model served when none is pinned, or the pinned one (``pinned=True``): its id and folder.
    default_model_id: str | None = None
    default_model_path: str | None = None
    pinned: bool = False
    log_level: str = "INFO"
    max_request_bytes: int = 16 * 1024 * 1024  # the body limit of the generation routes
    # How long a request's headers, and then its body, may take to arrive: a slow or stalled
    # client gets a 408 (responses, streamed or not, have no such limit).
    request_timeout_s: float = 60.0
    # On SIGTERM/SIGINT: how long requests in flight may take to finish before they are ended
    # (new requests get 503 meanwhile; sanic_serve.lifecycle.drain).
    drain_timeout_s: float = 30.0
    ring_capacity_bytes: int = DEFAULT_RING_CAPACITY_BYTES
    tool_parser: str | None = None  # None: chosen from each model's chat template
    engine: HostSettings = field(default_factory=HostSettings)  # the model host's own settings
    # Stored responses (sanic_serve.responses.store): the SQLite file every worker shares (None: no
    # store; `hfserve start` always names one), its bound in MB, and how long a response is kept
    # (None: until it is deleted or evicted).
    responses_db: str | None = None
    responses_max_mb: float = 1024.0
    responses_ttl_s: float | None = None
    # /v1/audio/*: the largest upload (MB; OpenAI's limit by default) and the longest decoded audio,
    # counted while decoding (sanic_serve.audio.decode).
    max_audio_mb: float = 25.0
    max_audio_s: float = 3600.0
    # Images in requests (sanic_serve.media): where they may be read from and how large they may be.
    media: MediaPolicy = field(default_factory=MediaPolicy)
    # Server-side MCP tools of /v1/responses: --mcp-config servers, the outbound policy, the timeout.
    mcp: MCPSettings = field(default_factory=MCPSettings)
    # Running as a service (sanic_serve.ops): API keys (none: no check; never in a repr or a log),
    # whether /metrics needs one too, CORS origins, and vLLM's own metric names instead of hfserve:.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    metrics_vllm_names: bool = False

    def large_body_bytes(self) -> int:
        """The body limit of the generation routes: ``max_request_bytes``, raised when needed so
        that one image at ``--max-image-mb`` fits as a base64 data URL (4 characters per 3 bytes)."""
        image_url_bytes = -(-self.media.max_image_bytes // 3) * 4 + _IMAGE_BODY_SLACK_BYTES
        return max(self.max_request_bytes, image_url_bytes)

    def host_settings(self) -> HostSettings:
        preload = (self.default_model_path,) if self.default_model_path else ()
        return replace(self.engine, preload=preload, log_level=self.log_level)

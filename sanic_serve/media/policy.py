"""What the operator lets requests' images be read from, and how large they may be (``hfserve start``
``--max-image-mb``, ``--max-image-pixels``, ``--max-images-per-request``, ``--allow-remote-media``,
``--allow-private-media``, ``--media-allow-hosts``, ``--media-root``, ``--media-timeout-s``).
Picklable and Pillow-free: the main process hands it to every worker inside ``ServerConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from sanic_serve.errors import InvalidRequest
from sanic_serve.mcp.policy import OutboundPolicy

DEFAULT_MAX_IMAGE_MB = 20.0  # OpenAI's limit per image
# About 50 megapixels (7,000 x 7,000): a decoded RGBA image of that size is 200 MB in the worker while
# it is checked. Pillow's own bomb warning starts at 89 M.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_MAX_IMAGES_PER_REQUEST = 8
DEFAULT_MEDIA_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class MediaPolicy:
    # Remote http(s) URLs: off unless the operator turns them on; then loopback, private, link-local
    # and other non-public addresses stay refused unless ``allow_private``, and when ``allow_hosts``
    # is not empty only those hosts (``*.example.com``: subdomains) may be named, at every hop.
    allow_remote: bool = False
    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()
    # ``file://`` URLs and bare paths are read only under this folder (None: never).
    media_root: str | None = None
    max_image_bytes: int = int(DEFAULT_MAX_IMAGE_MB * 1024 * 1024)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    # One fetch, redirects and body included, may take this long.
    fetch_timeout_s: float = DEFAULT_MEDIA_TIMEOUT_S

    def outbound(self) -> OutboundPolicy:
        """The address rules, shared with the MCP gateway's, worded for images."""
        return OutboundPolicy(
            self.allow_private, self.allow_hosts, subject="The image", private_option="--allow-private-media"
        )

    def check_count(self, count: int, param: str) -> None:
        """A 400 naming ``param`` when a request brings more images than ``--max-images-per-request``."""
        if count > self.max_images_per_request:
            raise InvalidRequest(
                f"The request has {count} images; this server takes at most {self.max_images_per_request} "
                "per request.",
                param=param,
                code="too_many_images",
            )

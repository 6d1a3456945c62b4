"""How a refused image leaves the server: a 400 naming the part, or a 413 for bytes over the limit."""

from __future__ import annotations

from sanic_serve.errors import APIError, InvalidRequest


class MediaRefused(Exception):
    """An image that cannot be used; the message is safe to show to the client (it never carries an
    exception's own text, a resolved address or a server path)."""

    code = "invalid_image"


class NotAnImage(MediaRefused):
    """The bytes are not a PNG, JPEG, WebP or GIF that decodes whole."""


class SourceRefused(MediaRefused):
    """The policy does not let this server read from where the URL points."""

    code = "image_url_refused"


class FetchFailed(MediaRefused):
    """The URL was allowed, but no image came back from it (timeout, HTTP error, closed connection)."""

    code = "image_fetch_failed"


class BytesOverLimit(MediaRefused):
    """More bytes than ``--max-image-mb`` allows."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"The image is larger than this server's limit of {limit_bytes / 1024 / 1024:g} MB.")
        self.limit_bytes = limit_bytes


class ImageTooLarge(APIError):
    status = 413

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param, code="image_too_large")


def to_api_error(exc: MediaRefused, param: str) -> APIError:
    """The HTTP error a refusal means, naming the request's part."""
    if isinstance(exc, BytesOverLimit):
        return ImageTooLarge(str(exc), param)
    return InvalidRequest(str(exc), param=param, code=exc.code)

"""Images a request brings (data URLs, fetched URLs, files under ``--media-root``): read under the
operator's ``MediaPolicy``, checked with Pillow in the worker, and handed to the host as
``ImageInput`` (file bytes + digest). ``load_image`` is the one entry point the routes call."""

from sanic_serve.media.errors import ImageTooLarge, MediaRefused
from sanic_serve.media.load import load_image
from sanic_serve.media.policy import MediaPolicy

__all__ = ["ImageTooLarge", "MediaPolicy", "MediaRefused", "load_image"]

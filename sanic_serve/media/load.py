"""``load_image``: an image part's URL -> the checked file bytes the host receives.

Where the bytes come from: a ``data:`` URL (base64); an http(s) URL when ``--allow-remote-media``
(``fetch.py``); a ``file://`` URL or a bare path under ``--media-root`` (``local.py``). Then Pillow
checks them (``decode.py``) in a thread, off the worker's event loop. Every refusal is a 400 naming
the request's part (413 for bytes over ``--max-image-mb``), never a 5xx and never an exception's text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re

import httpcore2

from model_host.ipc.messages import ImageInput
from sanic_serve.media.decode import MIME_TYPES, check_image
from sanic_serve.media.errors import BytesOverLimit, MediaRefused, NotAnImage, SourceRefused, to_api_error
from sanic_serve.media.fetch import fetch_image_bytes
from sanic_serve.media.local import read_local
from sanic_serve.media.policy import MediaPolicy

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


async def load_image(
    url: str, param: str, policy: MediaPolicy, *, backend: httpcore2.AsyncNetworkBackend | None = None
) -> ImageInput:
    """The image ``url`` names, checked; ``param`` is the part the errors name (e.g.
    ``messages[1].content[0].image_url``). ``backend``: a stand-in network for tests."""
    try:
        data = await _read(url, policy, backend)
        await asyncio.get_running_loop().run_in_executor(None, check_image, data, policy.max_image_pixels)
    except MediaRefused as exc:
        raise to_api_error(exc, param) from None
    return ImageInput(data=data, digest=hashlib.sha256(data).digest())


async def _read(url: str, policy: MediaPolicy, backend: httpcore2.AsyncNetworkBackend | None) -> bytes:
    if not isinstance(url, str) or not url.strip():
        raise SourceRefused("The image URL is empty.")
    url = url.strip()
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme == "data":
        return decode_data_url(url, policy.max_image_bytes)
    if scheme in ("http", "https"):
        return await fetch_image_bytes(url, policy, backend)
    if scheme == "file" or not scheme or _looks_like_windows_path(url):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, read_local, url, policy.media_root, policy.max_image_bytes)
    raise SourceRefused(f"Image URLs with the scheme {scheme!r} are not read; use a data URL or http(s).")


def _looks_like_windows_path(url: str) -> bool:
    return len(url) > 2 and url[1] == ":" and url[2] in "\\/"


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of ``data:image/<png|jpeg|webp|gif>;base64,<data>``; over the limit is refused
    from the text's length, before anything is decoded."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise NotAnImage("The data URL has no data (data:image/png;base64,...).")
    fields = [f.strip().lower() for f in header[len("data:") :].split(";")]
    mime, options = fields[0], fields[1:]
    if "base64" not in options:
        raise NotAnImage("The data URL must be base64-encoded (data:image/png;base64,...).")
    if mime not in MIME_TYPES:
        raise NotAnImage(
            f"The data URL's type {mime or '(none)'!r} is not one this server reads: use image/png, "
            "image/jpeg, image/webp or image/gif."
        )
    payload = payload.strip()
    if len(payload) // 4 * 3 - 2 > max_bytes:
        raise BytesOverLimit(max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise NotAnImage("The data URL's data is not valid base64.") from None
    if len(data) > max_bytes:
        raise BytesOverLimit(max_bytes)
    if not data:
        raise NotAnImage("The data URL's image is empty.")
    return data

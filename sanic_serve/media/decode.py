"""Checking an image's bytes with Pillow, in the worker (no torch): a PNG, JPEG, WebP or GIF whose
pixel count, read from its header, is within the limit, and which then decodes whole.

The pixel count is checked before anything is decoded, so a small file that claims 100,000 x 100,000
pixels (a decompression bomb) costs a header read. Pillow's own bomb check is a process-wide setting
(``Image.MAX_IMAGE_PIXELS``) that only warns below twice its limit and would refuse an operator's
higher limit with its own; it is turned off in the worker, where every image goes through this
function, and the operator's limit, passed per call, refuses instead. The full decode (``load()``)
then catches truncated and corrupt files, which ``Image.open`` alone accepts. Only the first frame
of an animation is decoded, as the model sees it.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from sanic_serve.media.errors import NotAnImage

# Pillow's format names of what the models' processors read; nothing else is tried (Pillow knows
# dozens of formats, each a parser an attacker could aim at).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# The MIME types a data URL may declare for them.
MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"})

Image.MAX_IMAGE_PIXELS = None  # see the module's docstring: check_image's own limit replaces it


def check_image(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) of a valid image; ``NotAnImage`` (the message safe for a client) for
    anything else. Blocking: call it from a thread."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # the header only
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise NotAnImage("The image is not a PNG, JPEG, WebP or GIF image.") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise NotAnImage("The image has no pixels.")
        if width * height > max_pixels:
            raise NotAnImage(
                f"The image is {width} x {height} pixels, more than this server's limit of "
                f"{max_pixels:,} pixels."
            )
        try:
            image.load()  # the first frame, whole: a cut or corrupt file fails here
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError):
            raise NotAnImage("The image is truncated or corrupt: it does not decode.") from None
        return str(image.format), width, height

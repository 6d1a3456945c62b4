"""Images read from the server's own disk: ``file://`` URLs and bare paths, only under ``--media-root``.

The path is resolved first (``..`` and every symlink followed) and must then lie inside the resolved
root, so neither ``../../etc/passwd`` nor a symlink in the root that points out of it reads anything
outside. The file is opened without following a final symlink (one swapped in after the check),
without blocking (a FIFO would hang the open), and must be a regular file within the byte limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sanic_serve.media.errors import BytesOverLimit, SourceRefused

_NOT_UNDER_ROOT = "The image path is not inside the folder this server reads images from (--media-root)."


def local_path(url: str) -> str:
    """The path a ``file://`` URL or a bare path names (relative paths are taken from the root)."""
    if not url.startswith("file:"):
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise SourceRefused("A file URL must name a local file (file:///path).")
    return unquote(parts.path)


def read_local(url: str, media_root: str | None, max_bytes: int) -> bytes:
    """The file's bytes. Blocking: call it from a thread."""
    if media_root is None:
        raise SourceRefused(
            "This server reads no local files as images (the operator can allow a folder with --media-root)."
        )
    root = Path(media_root).resolve()
    raw = local_path(url)
    if "\x00" in raw:
        raise SourceRefused(_NOT_UNDER_ROOT)
    try:
        # Checked before anything must exist, so a refusal never tells whether a path outside
        # the root exists. An absolute ``raw`` replaces the root here.
        if not (root / raw).resolve().is_relative_to(root):
            raise SourceRefused(_NOT_UNDER_ROOT)
        path = (root / raw).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, unreadable
        raise SourceRefused("The image file does not exist under the media folder.") from None
    if not path.is_relative_to(root):
        raise SourceRefused(_NOT_UNDER_ROOT)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise SourceRefused("The image file could not be opened.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceRefused("The image path is not a regular file.")
        if info.st_size > max_bytes:
            raise BytesOverLimit(max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)  # the file may have grown since fstat
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BytesOverLimit(max_bytes)
    return data

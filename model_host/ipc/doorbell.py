"""A doorbell: one byte on a pipe tells the worker's event loop that its ring has new frames.

The worker registers :meth:`Doorbell.fileno` with ``loop.add_reader``, so it neither polls nor
sleeps. Both ends are non-blocking: a full pipe already means "ring", so the host drops the byte.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection


class Doorbell:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn  # keep the Connection alive: it owns the file descriptor
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        try:
            os.write(self._fd, b"\x01")
        except (BlockingIOError, BrokenPipeError):
            pass

    def drain(self) -> None:
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass

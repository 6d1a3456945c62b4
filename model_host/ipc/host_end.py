"""The model host's end of the IPC, as ``client.py`` is the worker's: messages in from every worker's
pipe, frames out into every worker's ring.

A full ring never blocks the host's loop: its frames are parked and retried on the next pass, in
order (nothing overtakes a parked frame). One selector serves the life of the host: multiprocessing's
``wait()`` builds a new one per call, which showed up as ~15 % of a busy host's time with a tiny model.

A worker's bell may be held back (``--stream-interval-ms``) while everything in its ring is a token in
the middle of a stream: the worker then wakes once for several steps' tokens, and each stream sends
them as one chunk. A request's first and last frames, errors and a full ring ring at once.
"""

from __future__ import annotations

import logging
import math
import selectors
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection

from model_host.ipc.channels import HostSide
from model_host.ipc.codec import DecodeError, decode_message, encode
from model_host.ipc.doorbell import Doorbell
from model_host.ipc.messages import HostMessage, TokenFrame, WorkerReset
from model_host.ipc.ring import RingBuffer

log = logging.getLogger(__name__)


class _Outbox:
    """Frames on their way to one worker: straight into the ring, or parked while it is full."""

    def __init__(self, ring: RingBuffer, bell: Doorbell) -> None:
        self.ring = ring
        self.bell = bell
        self.parked: deque[bytes] = deque()
        self.dirty = False  # frames written that the bell has not announced yet
        self.urgent = False  # one of them may not wait (see ``TokenFrame.mid_stream``)
        self.oldest_s = 0.0  # when the first of them was written (time.monotonic)

    def put(self, frame: TokenFrame) -> None:
        raw = encode(frame)
        if not self.dirty:
            self.oldest_s = time.monotonic()
        self.urgent = self.urgent or not frame.mid_stream
        if self.parked or not self.ring.try_write(raw):
            self.parked.append(raw)
        else:
            self.dirty = True

    def flush(self, hold_after_s: float) -> None:
        while self.parked and self.ring.try_write(self.parked[0]):
            self.parked.popleft()
            self.dirty = True
        held = not self.urgent and not self.parked and self.oldest_s >= hold_after_s
        if self.dirty and not held:
            self.bell.ring()
            self.dirty = self.urgent = False


class HostEnd:
    def __init__(self, side: HostSide) -> None:
        self._readers: dict[Connection, int] = {c: i for i, c in enumerate(side.request_readers)}
        self._selector = selectors.DefaultSelector()
        for conn in self._readers:
            self._selector.register(conn, selectors.EVENT_READ, conn)
        self._outboxes = [
            _Outbox(RingBuffer(ring), Doorbell(bell))
            for ring, bell in zip(side.rings, side.doorbell_writers, strict=True)
        ]

    @property
    def has_parked(self) -> bool:
        return any(box.parked for box in self._outboxes)

    def receive(self, timeout_s: float) -> Iterator[HostMessage]:
        """Every message waiting on any pipe, waiting up to ``timeout_s`` for the first. A worker
        whose pipe closed for good comes out as a ``WorkerReset`` (its requests have no reader)."""
        for key, _ in self._selector.select(timeout_s):
            conn: Connection = key.data
            while conn.poll():
                try:
                    raw = conn.recv_bytes()
                except EOFError:  # every writer closed: that worker is gone for good
                    self._selector.unregister(conn)
                    yield WorkerReset(self._readers.pop(conn))
                    break
                try:
                    yield decode_message(raw)
                except DecodeError as exc:  # a bug on the other side; never the host's end
                    log.error("dropping an undecodable message: %s", exc)

    def send(self, worker_index: int, frame: TokenFrame) -> None:
        self._outboxes[worker_index].put(frame)

    def flush(self, hold_after_s: float = math.inf) -> None:
        """Write parked frames that now fit, and ring the bell of every worker that got some,
        but one whose frames are all mid-stream tokens written at or after ``hold_after_s``
        (time.monotonic): those wait for a later flush."""
        for box in self._outboxes:
            box.flush(hold_after_s)

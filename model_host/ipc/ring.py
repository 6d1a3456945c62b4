"""Single-producer / single-consumer ring buffer of length-prefixed frames in shared memory.

Layout of the shared buffer::

    [0:8)     write position (u64, bytes ever written, monotonic; only the producer stores it)
    [64:72)   read position  (u64, bytes ever consumed, monotonic; only the consumer stores it)
    [128:..)  data area of ``capacity`` bytes

Frames are stored at ``position % capacity`` as their u32 length then their bytes, padded to 8 bytes.
When a frame does not fit before the end of the data area the producer writes a wrap marker
(length ``0xFFFFFFFF``) and continues at offset 0. Alignment guarantees at least 8 bytes before the
end, so the marker itself always fits. The producer publishes the write position only after the
frame's bytes are in place, and the consumer publishes the read position only after copying the
frame out, so neither side ever sees a half-written frame. Each position has a single writer, and an
aligned 8-byte store is atomic on the platforms we run on, so no lock is needed (a lock held by a
SIGKILLed host would deadlock its successor).
"""

from __future__ import annotations

import struct
from typing import Protocol

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
WRAP_MARKER = 0xFFFFFFFF
_WRITE_POS_OFFSET = 0
_READ_POS_OFFSET = 64  # separate cache line from the write position
DATA_OFFSET = 128
ALIGN = 8


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def ring_buffer_size(capacity: int) -> int:
    """Bytes of shared memory needed for a ring with ``capacity`` data bytes."""
    return DATA_OFFSET + capacity


class _Buffer(Protocol):
    def __len__(self) -> int: ...


class FrameTooLarge(ValueError):
    """A frame can never fit into this ring, whatever the consumer does."""


class RingBuffer:
    """One end of a shared ring. The same class serves producer and consumer; each side must only
    call its own methods (``try_write`` for the producer, ``read_frames`` for the consumer)."""

    def __init__(self, buffer: _Buffer) -> None:
        self._mem = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        self.capacity = len(self._mem) - DATA_OFFSET
        if self.capacity <= 0 or self.capacity % ALIGN:
            raise ValueError(f"ring data capacity must be a positive multiple of {ALIGN}")
        self._data = self._mem[DATA_OFFSET:]

    # -- positions -------------------------------------------------------------------------------
    def _load(self, offset: int) -> int:
        return int(_U64.unpack_from(self._mem, offset)[0])

    def _store(self, offset: int, value: int) -> None:
        _U64.pack_into(self._mem, offset, value)

    @property
    def used_bytes(self) -> int:
        return self._load(_WRITE_POS_OFFSET) - self._load(_READ_POS_OFFSET)

    @property
    def max_frame_size(self) -> int:
        # The largest frame that fits an empty ring wherever its positions stand: the padding
        # before a wrap can take up to half the ring when the frame is this big.
        return self.capacity // 2

    # -- producer --------------------------------------------------------------------------------
    def try_write(self, frame: bytes) -> bool:
        """Append one frame. Returns False (and writes nothing) when the ring is too full now."""
        size = _aligned(_U32.size + len(frame))
        if size > self.max_frame_size:
            raise FrameTooLarge(f"frame of {len(frame)} bytes does not fit a {self.capacity} ring")
        write = self._load(_WRITE_POS_OFFSET)
        free = self.capacity - (write - self._load(_READ_POS_OFFSET))
        index = write % self.capacity
        tail = self.capacity - index
        padding = tail if size > tail else 0
        if padding + size > free:
            return False
        if padding:
            _U32.pack_into(self._data, index, WRAP_MARKER)
            index = 0
        _U32.pack_into(self._data, index, len(frame))
        self._data[index + _U32.size : index + _U32.size + len(frame)] = frame
        self._store(_WRITE_POS_OFFSET, write + padding + size)
        return True

    # -- consumer --------------------------------------------------------------------------------
    def read_frames(self, limit: int | None = None) -> list[bytes]:
        """Copy out every complete frame published so far (at most ``limit``)."""
        frames: list[bytes] = []
        read = self._load(_READ_POS_OFFSET)
        write = self._load(_WRITE_POS_OFFSET)
        while read < write and (limit is None or len(frames) < limit):
            index = read % self.capacity
            length = _U32.unpack_from(self._data, index)[0]
            if length == WRAP_MARKER:
                read += self.capacity - index
                continue
            frames.append(bytes(self._data[index + _U32.size : index + _U32.size + length]))
            read += _aligned(_U32.size + length)
        self._store(_READ_POS_OFFSET, read)
        return frames

    def release(self) -> None:
        """Drop the views so the underlying shared buffer can be freed."""
        self._data.release()
        self._mem.release()

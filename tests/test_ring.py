"""Ring buffer and frame encoding, in one process and across processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import pytest

from model_host.ipc.codec import decode_frame, encode
from model_host.ipc.messages import ErrorInfo, ErrorKind, FinishReason, TokenFrame
from model_host.ipc.ring import (
    ALIGN,
    DATA_OFFSET,
    FrameTooLarge,
    RingBuffer,
    ring_buffer_size,
)


def make_ring(capacity: int) -> RingBuffer:
    return RingBuffer(bytearray(ring_buffer_size(capacity)))


def frame(n: int, tag: int = 0) -> bytes:
    """A frame that takes exactly ``n`` bytes of the ring (with the ring's 4-byte length prefix),
    with recognisable content."""
    return bytes((tag + i) % 251 for i in range(n - 4))


def test_frame_round_trip() -> None:
    f = TokenFrame(7, (1, 2, 300000), FinishReason.LENGTH)
    assert decode_frame(encode(f)) == f
    e = TokenFrame(9, (), FinishReason.ERROR, ErrorInfo(ErrorKind.MODEL_LOAD_FAILED, "bad ü"))
    assert decode_frame(encode(e)) == e


def test_frames_straddling_the_wrap_point() -> None:
    ring = make_ring(512)
    for tag in (1, 2):
        assert ring.try_write(frame(248, tag))
        assert ring.read_frames() == [frame(248, tag)]
    # 16 bytes left before the end: a 100-byte frame must wrap to offset 0, whole.
    assert ring.try_write(frame(100, 3))
    assert ring.used_bytes == 16 + 104
    assert ring.read_frames() == [frame(100, 3)]
    for tag in range(50):  # keep wrapping with odd sizes, up to the largest allowed frame
        f = frame(min(13 + tag * 7, ring.max_frame_size), tag)
        assert ring.try_write(f)
        assert ring.read_frames() == [f]
    assert ring.used_bytes == 0


def test_full_ring_refuses_then_accepts_after_read() -> None:
    ring = make_ring(128)
    assert ring.try_write(frame(56, 1))
    assert ring.try_write(frame(56, 2))
    assert not ring.try_write(frame(24, 3))  # 112 of 128 used: 24 bytes do not fit
    assert ring.used_bytes == 112
    assert ring.read_frames(limit=1) == [frame(56, 1)]
    assert ring.try_write(frame(24, 3))
    assert ring.read_frames() == [frame(56, 2), frame(24, 3)]


def test_wrap_needs_room_for_padding_too() -> None:
    ring = make_ring(256)
    assert ring.try_write(frame(96, 1))
    assert ring.try_write(frame(96, 2))
    assert ring.read_frames(limit=1) == [frame(96, 1)]
    # 160 bytes free, but only 64 before the end: a 120-byte frame needs 64 + 120 of them.
    assert not ring.try_write(frame(120, 3))
    assert ring.read_frames() == [frame(96, 2)]
    assert ring.try_write(frame(120, 3))
    assert ring.read_frames() == [frame(120, 3)]


def test_many_small_and_one_large_frame() -> None:
    ring = make_ring(4096)
    small = [frame(12, i) for i in range(100)]
    for f in small:
        assert ring.try_write(f)
    large = frame(2000, 9)
    assert ring.try_write(large)
    assert ring.read_frames() == small + [large]
    for tag in range(5):  # the largest frame fits an empty ring wherever the positions stand
        assert ring.try_write(frame(ring.max_frame_size - tag * 4, tag))
        assert ring.read_frames() == [frame(ring.max_frame_size - tag * 4, tag)]
    with pytest.raises(FrameTooLarge):
        ring.try_write(frame(ring.max_frame_size + ALIGN, 4))


def test_reader_slower_than_writer_keeps_order_and_content() -> None:
    rng = random.Random(1)
    ring = make_ring(1024)
    sent: list[bytes] = []
    received: list[bytes] = []
    pending: list[bytes] = []
    for i in range(5000):
        pending.append(frame(rng.randint(4, 500), i))
        while pending and ring.try_write(pending[0]):
            sent.append(pending.pop(0))
        if i % 7 == 0:  # the reader wakes rarely and takes a few
            received += ring.read_frames(limit=rng.randint(1, 3))
    while pending or ring.used_bytes:
        received += ring.read_frames()
        while pending and ring.try_write(pending[0]):
            sent.append(pending.pop(0))
    assert received == sent
    assert len(sent) == 5000


def _producer(buf: object, count: int) -> None:
    ring = RingBuffer(buf)  # type: ignore[arg-type]
    rng = random.Random(2)
    for i in range(count):
        f = encode(TokenFrame(i, tuple(range(rng.randint(0, 40))), FinishReason.NONE))
        while not ring.try_write(f):  # full: spin until the reader catches up
            pass


def test_across_processes_in_shared_memory() -> None:
    ctx = mp.get_context("spawn")
    buf = ctx.RawArray("B", DATA_OFFSET + 2048)  # small: forces many wraps and full rings
    proc = ctx.Process(target=_producer, args=(buf, 3000))
    proc.start()
    ring = RingBuffer(buf)
    rng = random.Random(2)
    got = 0
    while got < 3000:
        for raw in ring.read_frames():
            f = decode_frame(raw)
            assert f.request_id == got
            assert f.token_ids == tuple(range(rng.randint(0, 40)))
            got += 1
    proc.join(30)
    assert proc.exitcode == 0


def _rings(reader: object) -> int:
    """How many times the host rang this worker's bell since the last call."""
    from model_host.ipc.doorbell import Doorbell

    assert isinstance(reader, Doorbell)
    count = 0
    try:
        while chunk := os.read(reader.fileno(), 4096):
            count += len(chunk)
    except BlockingIOError:
        pass
    return count


def test_mid_stream_tokens_wait_for_the_bell_and_nothing_else_does() -> None:
    """``--stream-interval-ms``: a worker's bell is held while its ring has only mid-stream tokens
    written at or after the flush's ``hold_after_s``; a first or last frame, an error, an old
    enough token or a full ring ring it at once. Held frames are in the ring all along."""
    from model_host.ipc.channels import create_channels
    from model_host.ipc.doorbell import Doorbell
    from model_host.ipc.host_end import HostEnd

    channels = create_channels(mp.get_context("spawn"), 1, ring_capacity_bytes=256)
    try:
        end, bell = HostEnd(channels.host_side()), Doorbell(channels.doorbell_readers[0])
        ring = RingBuffer(channels.rings[0])
        mid = TokenFrame(7, (11,), mid_stream=True)
        later = time.monotonic() + 60  # "the tokens are still young": they may wait

        end.send(0, mid)
        end.flush(time.monotonic() - 60)  # written after the cut-off: held
        assert _rings(bell) == 0
        assert decode_frame(ring.read_frames()[0]) == mid  # readable, only not announced
        end.flush(later)  # old enough now: rung
        assert _rings(bell) == 1

        for urgent in (
            TokenFrame(8, (1,)),  # a first token
            TokenFrame(7, (12,), FinishReason.LENGTH),
            TokenFrame(9, (), FinishReason.ERROR, ErrorInfo(ErrorKind.GENERATION_FAILED, "x")),
        ):
            end.send(0, mid)
            end.send(0, urgent)
            end.flush(time.monotonic() - 60)
            assert _rings(bell) == 1, urgent
            ring.read_frames()

        end.send(0, mid)
        end.flush()  # the default: nothing waits
        assert _rings(bell) == 1
        ring.read_frames()

        for _ in range(64):  # more than the ring holds: the rest is parked, and the bell rings
            end.send(0, mid)
        end.flush(time.monotonic() - 60)
        assert _rings(bell) == 1
    finally:
        channels.close()

"""The worker's handle on the model host: submit and abort requests, receive token streams.

Runs inside a Sanic worker's event loop. Sends go through a one-thread executor so the loop never
blocks on a full pipe; frames arrive through the shared ring, announced by the doorbell that the
loop watches with ``add_reader``. A watchdog fails every open request with ``ENGINE_DEAD`` when the
host dies or restarts, so no client waits forever.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from model_host.ipc.channels import WorkerSide
from model_host.ipc.codec import decode_frame, encode
from model_host.ipc.doorbell import Doorbell
from model_host.ipc.messages import (
    AbortRequest,
    AddRequest,
    Embed,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    Generate,
    HostMessage,
    Payload,
    SamplingParams,
    TokenFrame,
    Transcribe,
    UnloadModels,
    WorkerReset,
)
from model_host.ipc.ring import RingBuffer
from model_host.ipc.status import HostStatus, StatusField

log = logging.getLogger(__name__)

HOST_DEAD_AFTER_S = 3.0
_WATCHDOG_INTERVAL_S = 0.25


class RequestStream:
    """Frames of one request, in order. ``frames()`` hands over everything pending at once so a
    caller that fell behind catches up in one step."""

    def __init__(self, request_id: int, epoch: int) -> None:
        self.request_id = request_id
        self.epoch = epoch
        self.finished = False
        self._pending: deque[TokenFrame] = deque()
        self._ready = asyncio.Event()

    def push(self, frame: TokenFrame) -> None:
        self._pending.append(frame)
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    @property
    def empty(self) -> bool:
        """No frame waiting to be read."""
        return not self._pending

    async def frames(self) -> list[TokenFrame]:
        await self._ready.wait()
        out = list(self._pending)
        self._pending.clear()
        self._ready.clear()
        if out and out[-1].finish_reason is not FinishReason.NONE:
            self.finished = True
        return out


class HostClient:
    def __init__(self, side: WorkerSide) -> None:
        self.worker_index = side.index
        self.status: HostStatus = side.status()
        self._writer = side.request_writer
        self._ring = RingBuffer(side.ring)
        self._doorbell = Doorbell(side.doorbell_reader)
        self._streams: dict[int, RequestStream] = {}
        # Ids unique across incarnations of this worker: a restarted worker must never take a
        # frame still in the ring for its predecessor's request as one of its own.
        self._ids = itertools.count(((os.getpid() & 0xFFFFFF) << 32) + 1)
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfserve-send")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._ending: str | None = None  # set by end_all: the server is stopping

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._doorbell.fileno(), self._on_doorbell)
        self._watchdog = loop.create_task(self._watch_host())
        self._send_soon(WorkerReset(self.worker_index))
        self._on_doorbell()  # frames left from a previous incarnation of this worker

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._doorbell.fileno())
        if self._watchdog is not None:
            self._watchdog.cancel()
        for rid in list(self._streams):
            self._fail(rid, ErrorKind.ENGINE_DEAD, "server is shutting down")
        self._sender.shutdown(wait=False, cancel_futures=True)

    def end_all(self, message: str) -> int:
        """End every open request at once with an ``ENGINE_DEAD`` error (a server that must stop
        now), tell the host to drop them, and refuse whatever is opened afterwards. Returns how
        many were ended."""
        self._ending = message
        rids = list(self._streams)
        for rid in rids:
            self._fail(rid, ErrorKind.ENGINE_DEAD, message)
            self._send_soon(AbortRequest(rid, self.worker_index))
        return len(rids)

    # -- requests --------------------------------------------------------------------------------
    @property
    def open_requests(self) -> int:
        return len(self._streams)

    def host_alive(self) -> bool:
        return self.status.host_alive(HOST_DEAD_AFTER_S)

    def submit(self, model_path: str, prompt_token_ids: list[int], sampling: SamplingParams) -> RequestStream:
        """Register a generation and queue its message; returns at once. Synchronous on purpose: a
        caller cancelled mid-await could otherwise leave a request running that nobody aborts."""
        return self.submit_task(model_path, Generate(tuple(prompt_token_ids), sampling))

    def embed(self, model_path: str, inputs: list[list[int]]) -> RequestStream:
        """One vector per input, in frames that carry their input's ``index``."""
        return self.submit_task(model_path, Embed(tuple(tuple(ids) for ids in inputs)))

    def transcribe(
        self,
        model_path: str,
        features: bytes,
        n_windows: int,
        n_mels: int,
        *,
        language: str | None,
        task: Literal["transcribe", "translate"],
        prompt_ids: list[int],
        timestamps: bool,
        sampling: SamplingParams,
        word_timestamps: bool = False,
        audio_frames: int = 0,
        window_starts: tuple[int, ...] = (),
    ) -> RequestStream:
        """Speech to text over log-mel ``features`` (see ``Transcribe`` for their layout and for
        what the frames carry)."""
        payload = Transcribe(
            features,
            n_windows,
            n_mels,
            language,
            task,
            tuple(prompt_ids),
            timestamps,
            sampling,
            word_timestamps,
            audio_frames,
            window_starts,
        )
        return self.submit_task(model_path, payload)

    def submit_task(self, model_path: str, payload: Payload) -> RequestStream:
        return self._open(lambda rid, epoch: AddRequest(rid, self.worker_index, epoch, model_path, payload))

    def unload_models(self) -> RequestStream:
        """Ask the host to unload every model it may (see ``UnloadModels``); the stream finishes
        when it has."""
        return self._open(lambda rid, _epoch: UnloadModels(rid, self.worker_index))

    def _open(self, message: Callable[[int, int], AddRequest | UnloadModels]) -> RequestStream:
        """A new stream, and its message (built from the request id and epoch) on its way."""
        rid = next(self._ids)
        epoch = self.status.get(StatusField.EPOCH)
        stream = RequestStream(rid, epoch)
        self._streams[rid] = stream
        if self._ending is not None:
            self._fail(rid, ErrorKind.ENGINE_DEAD, self._ending)
            return stream
        if not self.host_alive():
            self._fail(rid, ErrorKind.ENGINE_DEAD, "the model host is not running")
            return stream
        self._send_soon(message(rid, epoch))
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Stop a request early (client gone, stop string hit). Safe to call more than once."""
        if self._streams.pop(stream.request_id, None) is None or stream.finished:
            return
        stream.finished = True
        stream.wake()  # a reader waiting for frames that will never come returns, with none
        self._send_soon(AbortRequest(stream.request_id, self.worker_index))

    def release(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)

    def _send_soon(self, msg: HostMessage) -> None:
        # Tasks start in creation order and the sender is one thread, so messages keep their
        # order: an abort never overtakes its add.
        if self._loop is None or self._loop.is_closed():
            return
        task = self._loop.create_task(self._send(msg))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, msg: HostMessage) -> None:
        payload = encode(msg)
        assert self._loop is not None
        try:
            await self._loop.run_in_executor(self._sender, self._writer.send_bytes, payload)
        except (OSError, RuntimeError) as exc:  # pipe closed or executor shut down
            if isinstance(msg, AddRequest | UnloadModels):
                log.warning("request %d: cannot reach the model host: %s", msg.request_id, exc)
                self._fail(msg.request_id, ErrorKind.ENGINE_DEAD, "the model host cannot be reached; retry")

    # -- frames ----------------------------------------------------------------------------------
    def _on_doorbell(self) -> None:
        # Drain the bell before reading: a frame published after the read rings again.
        self._doorbell.drain()
        for raw in self._ring.read_frames():
            frame = decode_frame(raw)
            stream = self._streams.get(frame.request_id)
            if stream is None:
                continue  # aborted or failed already
            if frame.finish_reason is not FinishReason.NONE:
                del self._streams[frame.request_id]
            stream.push(frame)

    def _fail(self, rid: int, kind: ErrorKind, message: str) -> None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.push(TokenFrame(rid, (), FinishReason.ERROR, ErrorInfo(kind, message)))

    async def _watch_host(self) -> None:
        while True:
            await asyncio.sleep(_WATCHDOG_INTERVAL_S)
            if not self._streams:
                continue
            epoch = self.status.get(StatusField.EPOCH)
            alive = self.host_alive()
            for rid, stream in list(self._streams.items()):
                if not alive or stream.epoch != epoch:
                    log.warning("request %d lost: the model host died or restarted", rid)
                    self._fail(rid, ErrorKind.ENGINE_DEAD, "the model host died; retry")

"""The shared multiprocessing objects that connect N workers to the one model host.

:func:`create_channels` runs in the main process (Sanic's ``main_process_start``) before any child
starts, so every object travels to the children when they are spawned. Per worker there is:

* a request pipe (worker → host) carrying pickled :mod:`messages`; one pipe per worker rather than
  one shared ``multiprocessing.Queue`` because a queue's reader lock, held by a host that is
  SIGKILLed mid-``get``, would deadlock the restarted host; a pipe with a single reader has no lock;
* a shared-memory ring (host → worker) for token frames, an anonymous ``RawArray`` mapping that the
  kernel frees with its last process, so no named segment can be left behind;
* a doorbell pipe (host → worker) that wakes the worker's event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from model_host.ipc.ring import ring_buffer_size
from model_host.ipc.status import HostStatus

DEFAULT_RING_CAPACITY_BYTES = 1 << 20


@dataclass(frozen=True)
class Channels:
    """Everything, as created in the main process. Tuples are indexed by worker."""

    request_readers: tuple[Connection, ...]
    request_writers: tuple[Connection, ...]
    rings: tuple[Any, ...]
    doorbell_readers: tuple[Connection, ...]
    doorbell_writers: tuple[Connection, ...]
    status_fields: Any
    status_models: Any

    @property
    def num_workers(self) -> int:
        return len(self.rings)

    def status(self) -> HostStatus:
        return HostStatus(self.status_fields, self.status_models)

    def host_side(self) -> HostSide:
        return HostSide(
            self.request_readers,
            self.rings,
            self.doorbell_writers,
            self.status_fields,
            self.status_models,
        )

    def worker_side(self, index: int) -> WorkerSide:
        return WorkerSide(
            index,
            self.request_writers[index],
            self.rings[index],
            self.doorbell_readers[index],
            self.status_fields,
            self.status_models,
        )

    def close(self) -> None:
        for conn in (
            *self.request_readers,
            *self.request_writers,
            *self.doorbell_readers,
            *self.doorbell_writers,
        ):
            conn.close()


@dataclass(frozen=True)
class HostSide:
    request_readers: tuple[Connection, ...]
    rings: tuple[Any, ...]
    doorbell_writers: tuple[Connection, ...]
    status_fields: Any
    status_models: Any

    def status(self) -> HostStatus:
        return HostStatus(self.status_fields, self.status_models)


@dataclass(frozen=True)
class WorkerSide:
    index: int
    request_writer: Connection
    ring: Any
    doorbell_reader: Connection
    status_fields: Any
    status_models: Any

    def status(self) -> HostStatus:
        return HostStatus(self.status_fields, self.status_models)


def create_channels(
    ctx: Any, num_workers: int, ring_capacity_bytes: int = DEFAULT_RING_CAPACITY_BYTES
) -> Channels:
    requests = [ctx.Pipe(duplex=False) for _ in range(num_workers)]
    doorbells = [ctx.Pipe(duplex=False) for _ in range(num_workers)]
    rings = tuple(ctx.RawArray("B", ring_buffer_size(ring_capacity_bytes)) for _ in range(num_workers))
    fields, models = HostStatus.allocate(ctx)
    return Channels(
        request_readers=tuple(r for r, _ in requests),
        request_writers=tuple(w for _, w in requests),
        rings=rings,
        doorbell_readers=tuple(r for r, _ in doorbells),
        doorbell_writers=tuple(w for _, w in doorbells),
        status_fields=fields,
        status_models=models,
    )

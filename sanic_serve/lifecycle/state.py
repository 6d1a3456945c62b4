"""Server state shared by the main process and the HTTP workers, in one anonymous shared array.

The main process writes the drain phase; each worker writes only its own slots (its pid, whether it
listens, how many HTTP requests it has in flight). Every value is a single int64 store, so no lock is
needed, and a killed worker cannot leave one held.
"""

from __future__ import annotations

import enum
import os
from typing import Any

from model_host.ipc.system import pid_alive


class Phase(enum.IntEnum):
    SERVING = 0
    DRAINING = 1  # new requests get 503, requests in flight run on
    ENDING = 2  # the drain ran out of time: what still runs is ended with an error


_HEADER = 2  # phase, drain deadline (CLOCK_MONOTONIC ns)
_PER_WORKER = 3  # pid, listening, requests in flight


class ServerState:
    def __init__(self, array: Any) -> None:
        self._a = array

    @staticmethod
    def allocate(ctx: Any, workers: int) -> Any:
        """The shared array, created in the main process before any worker starts."""
        return ctx.RawArray("q", _HEADER + _PER_WORKER * workers)

    @property
    def workers(self) -> int:
        return (len(self._a) - _HEADER) // _PER_WORKER

    # -- the main process ---------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return Phase(self._a[0])

    def set_phase(self, phase: Phase, deadline_ns: int = 0) -> None:
        if deadline_ns:
            self._a[1] = deadline_ns
        self._a[0] = int(phase)

    @property
    def deadline_ns(self) -> int:
        return int(self._a[1])

    def all_listening(self) -> bool:
        return all(self._a[self._slot(i) + 1] for i in range(self.workers))

    def in_flight_total(self) -> int:
        """Requests in flight in the workers that are alive: a dead worker's count died with it."""
        total = 0
        for i in range(self.workers):
            base = self._slot(i)
            pid, count = int(self._a[base]), int(self._a[base + 2])
            if count and pid_alive(pid):
                total += count
        return total

    # -- one worker ---------------------------------------------------------------------------
    def worker_started(self, index: int) -> None:
        """A worker (first or restarted) takes its slots: not listening yet, nothing in flight."""
        base = self._slot(index)
        self._a[base + 1] = 0
        self._a[base + 2] = 0
        self._a[base] = os.getpid()

    def worker_listening(self, index: int, listening: bool) -> None:
        self._a[self._slot(index) + 1] = int(listening)

    def add_in_flight(self, index: int, delta: int) -> None:
        self._a[self._slot(index) + 2] += delta

    def _slot(self, index: int) -> int:
        return _HEADER + _PER_WORKER * index

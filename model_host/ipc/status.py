"""Host status published in shared memory: liveness, counters and the loaded models.

The host is the only writer. Counters are single int64 stores; the model list is JSON guarded by a
sequence counter (odd while being written), so readers never need a lock that a killed host could
leave held.
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from model_host.ipc.system import pid_alive

_MODELS_CAPACITY_BYTES = 16384


class StatusField(enum.IntEnum):
    PID = 0
    EPOCH = 1  # incremented by every host start; workers fail requests of a previous epoch
    HEARTBEAT_NS = 2  # CLOCK_MONOTONIC, shared by all processes of the machine
    RUNNING = 3
    WAITING = 4
    ABORTED_TOTAL = 5
    FINISHED_TOTAL = 6
    FAILED_TOTAL = 7
    MODELS_SEQ = 8
    MODELS_LEN = 9
    PROMPT_TOKENS_TOTAL = 10  # prompt tokens admitted
    CACHED_TOKENS_TOTAL = 11  # of which reused from the prefix cache, not prefilled
    READY = 12  # 1 once the host has loaded its preloaded models and takes requests
    MODEL_LOADS_TOTAL = 13  # models loaded, by every host incarnation (never reset: a counter)
    MODEL_LOAD_MS_TOTAL = 14  # the time those loads took, in milliseconds


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    pid: int
    epoch: int
    heartbeat_age_s: float
    running: int
    waiting: int
    aborted_total: int
    finished_total: int
    failed_total: int
    prompt_tokens_total: int
    cached_tokens_total: int
    models: tuple[str, ...]
    ready: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "epoch": self.epoch,
            "heartbeat_age_s": round(self.heartbeat_age_s, 3),
            "running": self.running,
            "waiting": self.waiting,
            "aborted_total": self.aborted_total,
            "finished_total": self.finished_total,
            "failed_total": self.failed_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "cached_tokens_total": self.cached_tokens_total,
            "models": list(self.models),
            "ready": self.ready,
        }


class HostStatus:
    """Wraps two shared arrays: int64 fields and a byte buffer for the model list."""

    def __init__(self, fields: Any, models_buf: Any) -> None:
        self._fields = fields
        self._models = models_buf

    @staticmethod
    def allocate(ctx: Any) -> tuple[Any, Any]:
        """Create the shared arrays (in the main process, before any child starts)."""
        return ctx.RawArray("q", len(StatusField)), ctx.RawArray("B", _MODELS_CAPACITY_BYTES)

    def get(self, field: StatusField) -> int:
        return int(self._fields[field])

    def set(self, field: StatusField, value: int) -> None:
        self._fields[field] = value

    def add(self, field: StatusField, delta: int = 1) -> None:
        self._fields[field] += delta

    def beat(self) -> None:
        self._fields[StatusField.HEARTBEAT_NS] = time.monotonic_ns()

    def start_epoch(self) -> int:
        self._fields[StatusField.PID] = os.getpid()
        self._fields[StatusField.EPOCH] += 1
        for f in (StatusField.RUNNING, StatusField.WAITING, StatusField.READY):
            self._fields[f] = 0
        self.publish_models(())
        self.beat()
        return int(self._fields[StatusField.EPOCH])

    def publish_models(self, models: tuple[str, ...]) -> None:
        raw = json.dumps(list(models)).encode()[:_MODELS_CAPACITY_BYTES]
        self._fields[StatusField.MODELS_SEQ] += 1  # odd: writing
        self._models[: len(raw)] = raw
        self._fields[StatusField.MODELS_LEN] = len(raw)
        self._fields[StatusField.MODELS_SEQ] += 1  # even: stable

    def _read_models(self) -> tuple[str, ...]:
        for _ in range(100):
            seq = self._fields[StatusField.MODELS_SEQ]
            if seq % 2:
                continue
            n = self._fields[StatusField.MODELS_LEN]
            raw = bytes(self._models[:n])
            if seq == self._fields[StatusField.MODELS_SEQ]:
                try:
                    return tuple(json.loads(raw)) if raw else ()
                except ValueError:
                    return ()
        return ()

    def heartbeat_age_s(self) -> float:
        beat = self._fields[StatusField.HEARTBEAT_NS]
        return (time.monotonic_ns() - beat) / 1e9 if beat else float("inf")

    def host_alive(self, max_heartbeat_age_s: float) -> bool:
        pid = self.get(StatusField.PID)
        return self.heartbeat_age_s() <= max_heartbeat_age_s and pid_alive(pid)

    def snapshot(self) -> StatusSnapshot:
        return StatusSnapshot(
            pid=self.get(StatusField.PID),
            epoch=self.get(StatusField.EPOCH),
            heartbeat_age_s=self.heartbeat_age_s(),
            running=self.get(StatusField.RUNNING),
            waiting=self.get(StatusField.WAITING),
            aborted_total=self.get(StatusField.ABORTED_TOTAL),
            finished_total=self.get(StatusField.FINISHED_TOTAL),
            failed_total=self.get(StatusField.FAILED_TOTAL),
            prompt_tokens_total=self.get(StatusField.PROMPT_TOKENS_TOTAL),
            cached_tokens_total=self.get(StatusField.CACHED_TOKENS_TOTAL),
            models=self._read_models(),
            ready=bool(self.get(StatusField.READY)),
        )

"""The engine: every loaded model's runner and the queue in front of them, stepped as one.

The host's loop goes round four phases: take new requests off the pipes (``add``, ``abort``),
schedule, run, publish the frames. ``step`` is the middle two: every runner advances what it runs
(a decode step for each causal batch), then the scheduler lets one runner start new requests within
the step's prefill budget and free batch slots (see :mod:`model_host.scheduler`). A causal runner
that may admit keeps its decode for the admission's forward (a mixed step, :mod:`model_host.packed`)
and runs it alone in ``end_step`` if nothing was admitted to share it. Limits,
backpressure, aborts, unloading and the way out of a failed step are written here once for every
kind of model.
"""

from __future__ import annotations

import logging
import time

from model_host.ipc.messages import AddRequest, ErrorKind, request_ref
from model_host.ipc.settings import HostSettings
from model_host.registry import ModelRegistry
from model_host.runners.base import RequestKey, StepOutput, error_output
from model_host.scheduler import Scheduler

log = logging.getLogger(__name__)

__all__ = ["Engine", "RequestKey", "StepOutput"]


class Engine:
    def __init__(self, registry: ModelRegistry, settings: HostSettings, prefill_budget_tokens: int) -> None:
        self.registry = registry
        self.scheduler = Scheduler(settings, prefill_budget_tokens)
        self.aborted_total = 0

    # -- counters --------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return sum(r.num_running for r in self.registry.runners())

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def prompt_tokens_total(self) -> int:
        return self.scheduler.prompt_tokens_total

    @property
    def cached_tokens_total(self) -> int:
        return self.scheduler.cached_tokens_total

    def has_work(self) -> bool:
        return bool(self.scheduler.num_waiting) or any(r.has_work() for r in self.registry.runners())

    # -- requests arriving and leaving -----------------------------------------------------------
    def add(self, request: AddRequest) -> StepOutput | None:
        """Queue a request; returns an immediate error frame when it is refused."""
        return self.scheduler.add(request, self.num_running)

    def abort(self, key: RequestKey) -> bool:
        found = self.scheduler.abort(key) or any(r.abort(key) for r in self.registry.runners())
        self.aborted_total += found
        return found

    def abort_worker(self, worker_index: int) -> int:
        """Drop every request of a worker that went away for good."""
        keys = self.scheduler.keys() + [k for r in self.registry.runners() for k in r.keys()]
        return sum(self.abort(k) for k in keys if k[0] == worker_index)

    def unload_idle_models(self, keep: tuple[str, ...]) -> list[str]:
        """Unload every loaded model but those in ``keep`` and those with requests waiting or
        running. Returns the paths unloaded."""
        busy = self.scheduler.models_waiting() | {r.path for r in self.registry.runners() if r.has_work()}
        idle = [path for path in self.registry.loaded() if path not in keep and path not in busy]
        return [path for path in idle if self.registry.unload(path)]

    def unload_idle_for(self, idle_s: float, keep: tuple[str, ...]) -> list[str]:
        """Unload every model but those in ``keep`` that has had no request waiting or running for
        ``idle_s`` seconds (``--idle-unload-s``). Returns the paths unloaded."""
        now = time.monotonic()
        busy = self.scheduler.models_waiting() | {r.path for r in self.registry.runners() if r.has_work()}
        for path in busy:
            self.registry.touch(path, now)
        idle = [
            path
            for path in self.registry.loaded()
            if path not in keep and path not in busy and self.registry.idle_for_s(path, now) >= idle_s
        ]
        return [path for path in idle if self.registry.unload(path)]

    def fail_all(self, message: str) -> list[StepOutput]:
        """End every request with an error frame and start clean: the way out when a step failed
        in a way that may have left the batches inconsistent."""
        keys = self.scheduler.clear() + [k for r in self.registry.runners() for k in r.drop_all()]
        if keys:
            log.error("failed: %s", ", ".join(request_ref(*k) for k in keys))
        return [error_output(k, ErrorKind.GENERATION_FAILED, message) for k in keys]

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        running = self.num_running
        for runner in self.registry.runners():  # running requests advance: one token each
            outputs += runner.step(admitting=self.scheduler.may_admit(runner, running))
        for runner in self.registry.runners():  # work that waiting requests can start on
            runner.look_ahead(self.scheduler.waiting())
        # New requests start: the runner of the queue's head (or one mid-way through a long
        # prompt) takes what fits the step's budget and free slots.
        outputs += self.scheduler.admit(self.registry.runners(), self.registry.get, self.num_running)
        for runner in self.registry.runners():  # a decode left to share a forward with admission
            outputs += runner.end_step()
        return outputs

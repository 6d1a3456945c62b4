"""The model-host process: receive requests, step the engine, publish token frames.

One loop, one thread for the model: read every pending message from the worker pipes, run one engine
step, write the frames into the workers' rings. A full ring never blocks the loop: its frames are
parked and retried on the next pass.

The heartbeat that workers, ``/health`` and systemd's watchdog read is written by a thread of its
own (so a long forward pass or model load does not look like death), but only while the loop shows
progress: a loop stuck in a deadlock or a hung CUDA call stops the beat although the process lives.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import torch

from model_host.causal_lm import Placement
from model_host.engine import Engine, StepOutput
from model_host.errors import DeviceError, ModelLoadError
from model_host.ipc.channels import HostSide
from model_host.ipc.host_end import HostEnd
from model_host.ipc.messages import (
    AbortRequest,
    AddRequest,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    HostMessage,
    TokenFrame,
    UnloadModels,
    WorkerReset,
)
from model_host.ipc.settings import HOST_CONFIG_ERROR_EXIT, HostSettings
from model_host.ipc.status import HostStatus, StatusField
from model_host.prefix_cache import PrefixCache
from model_host.registry import ModelRegistry

if TYPE_CHECKING:
    from model_host.tensor_parallel import Replicas

log = logging.getLogger("hfserve.host")

_HEARTBEAT_INTERVAL_S = 0.2
_IDLE_WAIT_S = 0.5
_PARKED_RETRY_S = 0.002
_IDLE_CHECK_S = 0.5
# How long the loop may go without a pass before the host counts as hung: far above any sane step
# (a long prefill chunk, a first CUDA call's set-up), since a stopped beat fails every request in
# flight. A model load (weights read, maybe downloaded) gets much longer.
STALL_S = 60.0
LOAD_STALL_S = 3600.0


def _seconds_from_env(name: str, default_s: float) -> float:
    """``HFSERVE_HOST_STALL_S`` / ``HFSERVE_HOST_LOAD_STALL_S``: the operator's override."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default_s
    return value if value > 0 else default_s


class LoopProgress:
    """When the host's loop last moved. The loop calls ``moved`` every pass (idle waits included:
    an idle host is healthy); a model load, which runs inside the loop, calls ``loading`` first and
    ``moved`` when it is done. The heartbeat thread beats only while ``fresh``."""

    def __init__(
        self, stall_s: float, load_stall_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stall_s = stall_s
        self.load_stall_s = load_stall_s
        self._clock = clock
        self._moved_s = clock()
        self._loading_since_s: float | None = None

    def moved(self) -> None:
        # Two single stores, each atomic under the GIL; a reader between them errs towards fresh.
        self._moved_s = self._clock()
        self._loading_since_s = None

    def loading(self, _path: str = "") -> None:
        self._loading_since_s = self._clock()

    def fresh(self) -> bool:
        now = self._clock()
        loading_since = self._loading_since_s
        if loading_since is not None:
            return now - loading_since <= self.load_stall_s
        return now - self._moved_s <= self.stall_s


def placement(settings: HostSettings) -> Placement | None:
    """How causal LMs are spread over devices (``--device-map``, ``--tp``); None: on ``--device``."""
    if settings.device_map or settings.tp_size > 1:
        return Placement(settings.device_map, settings.tp_size)
    return None


class ModelHost:
    def __init__(self, side: HostSide, settings: HostSettings, replicas: Replicas | None = None) -> None:
        self.status: HostStatus = side.status()
        # Under tensor parallelism, the other ranks' engines, fed what this one receives.
        self.replicas = replicas
        self.ipc = HostEnd(side)
        prefix_cache = (
            PrefixCache(settings.prefix_cache_mb * 1024 * 1024) if settings.prefix_cache_mb else None
        )
        self.registry = ModelRegistry(
            settings.device,
            settings.dtype,
            settings.trust_remote_code,
            prefix_cache,
            placement(settings),
            settings.torch_threads,
            settings.pack_weights,
            settings.lean_decode,
        )
        self.registry.on_load = self._count_load
        self.progress = LoopProgress(
            _seconds_from_env("HFSERVE_HOST_STALL_S", STALL_S),
            _seconds_from_env("HFSERVE_HOST_LOAD_STALL_S", LOAD_STALL_S),
        )
        self.registry.on_load_start = self.progress.loading
        self.engine = Engine(self.registry, settings, settings.prefill_budget(self.registry.device.type))
        self.settings = settings
        self.epoch = 0
        self._published_models: tuple[str, ...] = ()
        self._published_totals: dict[StatusField, int] = {}
        self.stopping = threading.Event()
        self._next_idle_check = 0.0
        self._step_s = 0.0  # how long the last step took: the next is expected to take as long

    def start(self) -> None:
        """Take a new epoch and load the preloaded models; raises ``ModelLoadError`` when one
        cannot be loaded."""
        self.epoch = self.status.start_epoch()
        if self.replicas is not None:
            self.replicas.share_epoch(self.epoch)
        threading.Thread(target=self._heartbeat, name="hfserve-heartbeat", daemon=True).start()
        for path in self.settings.preload:
            self.registry.get(path)
        self._publish_status()
        self.status.set(StatusField.READY, 1)
        log.info("model host ready (epoch %d, device %s)", self.epoch, self.registry.device)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.progress.moved()
            self._receive()
            if self.engine.has_work():
                started_s = time.monotonic()
                self._deliver(self._step())
                self._step_s = time.monotonic() - started_s
            self.ipc.flush(self._hold_after_s())
            if self.settings.idle_unload_s:
                self._unload_idle()
            self._publish_status()
        if self.replicas is not None:
            self.replicas.stop()
        log.info("model host stopped")

    def _hold_after_s(self) -> float:
        """Mid-stream tokens written at or after this time (``time.monotonic``) may wait for the
        next step's, since that step should end before they are ``--stream-interval-ms`` old.
        Nothing waits when no step follows."""
        interval_s = self.settings.stream_interval_ms / 1000
        if not interval_s or not self.engine.has_work():
            return math.inf
        return time.monotonic() + self._step_s - interval_s

    def _unload_idle(self) -> None:
        if self.replicas is not None:  # a clock must not change one rank's engine (refused at start)
            return
        now = time.monotonic()
        if now < self._next_idle_check:
            return
        # Often enough that a model goes within a fraction of its idle time, rarely enough to cost
        # nothing in a busy loop.
        self._next_idle_check = now + min(_IDLE_CHECK_S, self.settings.idle_unload_s / 4)
        unloaded = self.engine.unload_idle_for(self.settings.idle_unload_s, keep=self.settings.preload)
        if unloaded:
            log.info(
                "unloaded after %.0f s without requests: %s", self.settings.idle_unload_s, ", ".join(unloaded)
            )

    def _step(self) -> list[StepOutput]:
        try:
            return self.engine.step()
        except Exception:  # a bug must cost the requests in flight, not the host
            log.exception("engine step failed; failing every request in flight")
            return self.engine.fail_all("internal error in the generation step")

    def _heartbeat(self) -> None:
        hung = False
        while not self.stopping.wait(_HEARTBEAT_INTERVAL_S):
            if self.progress.fresh():
                self.status.beat()
                hung = False
            elif not hung:
                hung = True
                log.error(
                    "the model host's loop has not moved for %.0f s (%.0f s while loading): no more "
                    "heartbeats, so requests fail and the service manager's watchdog restarts the service",
                    self.progress.stall_s,
                    self.progress.load_stall_s,
                )

    def _receive(self) -> None:
        if self.engine.has_work():
            timeout_s = 0.0
        elif self.ipc.has_parked:
            timeout_s = _PARKED_RETRY_S
        else:
            timeout_s = _IDLE_WAIT_S
        messages = list(self.ipc.receive(timeout_s))
        if self.replicas is not None:  # every pass, even an empty one: the followers wait on it
            self.replicas.share(messages)
        for msg in messages:
            self._handle(msg)

    def _handle(self, msg: HostMessage) -> None:
        if isinstance(msg, AddRequest):
            if msg.epoch != self.epoch:
                err = ErrorInfo(ErrorKind.ENGINE_DEAD, "the model host restarted; retry")
                self.ipc.send(msg.worker_index, TokenFrame(msg.request_id, (), FinishReason.ERROR, err))
            else:
                refused = self.engine.add(msg)
                if refused is not None:
                    self._deliver([refused])
        elif isinstance(msg, AbortRequest):
            self._abort(lambda: self.engine.abort((msg.worker_index, msg.request_id)))
        elif isinstance(msg, WorkerReset):
            dropped = self._abort(lambda: self.engine.abort_worker(msg.worker_index))
            if dropped:
                log.warning("worker %d went away: aborted %d orphaned requests", msg.worker_index, dropped)
        elif isinstance(msg, UnloadModels):
            unloaded = self.engine.unload_idle_models(keep=self.settings.preload)
            log.info("unloaded %d model(s) on request: %s", len(unloaded), ", ".join(unloaded) or "none")
            # Published before the answer goes out, so the worker that asked (and /health, /v1/models
            # everywhere) no longer lists them once it has the answer.
            self._publish_status()
            self.ipc.send(msg.worker_index, TokenFrame(msg.request_id, (), FinishReason.STOP))

    def _abort(self, abort: Callable[[], int | bool]) -> int | bool:
        """Run an abort; one that fails (a bug: it changes batches mid-way) may have left them
        inconsistent, so it costs the requests in flight, as a failed step does, not the host."""
        try:
            return abort()
        except Exception:
            log.exception("abort failed; failing every request in flight")
            self._deliver(self.engine.fail_all("internal error while cancelling a request"))
            return 0

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            self.ipc.send(out.worker_index, out.frame)
            if out.frame.finish_reason is FinishReason.ERROR:
                self.status.add(StatusField.FAILED_TOTAL)
            elif out.frame.finish_reason is not FinishReason.NONE:
                self.status.add(StatusField.FINISHED_TOTAL)

    def _count_load(self, path: str, load_s: float) -> None:
        self.progress.moved()  # the rest of this pass gets a step's allowance from now
        self.status.add(StatusField.MODEL_LOAD_MS_TOTAL, round(load_s * 1000))
        self.status.add(StatusField.MODEL_LOADS_TOTAL)

    def _publish_status(self) -> None:
        s = self.status
        # Totals before gauges: a reader that sees ``running`` drop to 0 then also sees the
        # aborts that made it drop (the fields are written one by one, never as a unit).
        # Totals are added as what changed since the last publish: the status block outlives a
        # host, and a restarted host counting from 0 must not take the server's totals back.
        for field, value in (
            (StatusField.ABORTED_TOTAL, self.engine.aborted_total),
            (StatusField.PROMPT_TOKENS_TOTAL, self.engine.prompt_tokens_total),
            (StatusField.CACHED_TOKENS_TOTAL, self.engine.cached_tokens_total),
        ):
            if value != self._published_totals.get(field, 0):
                s.add(field, value - self._published_totals.get(field, 0))
                self._published_totals[field] = value
        s.set(StatusField.RUNNING, self.engine.num_running)
        s.set(StatusField.WAITING, self.engine.num_waiting)
        loaded = self.registry.loaded()
        if loaded != self._published_models:
            s.publish_models(loaded)
            self._published_models = loaded


def _quiet_progress_bars() -> None:
    """No progress bars while loading weights: they are noise in a server's log, and tqdm's
    bar lock is a named semaphore of the spawned host, which a SIGKILL of the host would leave
    behind in /dev/shm."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def host_main(side: HostSide, settings: HostSettings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s [model-host] %(levelname)s %(name)s: %(message)s",
    )
    try:
        from setproctitle import setproctitle

        setproctitle("hfserve: model-host")
    except ImportError:
        pass
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    _quiet_progress_bars()
    replicas = None
    if settings.tp_size > 1:
        from model_host.tensor_parallel import Replicas

        replicas = Replicas(settings)
    try:
        host = ModelHost(side, settings, replicas)
        host.start()
    except (DeviceError, ModelLoadError) as exc:
        # A setting the host cannot start with: restarting would fail the same way. One line,
        # and the exit status that tells the server to stop instead of restarting the host.
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        sys.exit(HOST_CONFIG_ERROR_EXIT)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping after this step", signal.Signals(signum).name)
        host.stopping.set()

    signal.signal(signal.SIGTERM, _stop)  # SIGINT stays ignored (model_host.main)
    host.run()

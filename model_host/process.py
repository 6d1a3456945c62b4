"""The model-host process: receive requests, step the engine, publish token frames.

One loop, one thread for the model: read every pending message from the worker pipes, run one engine
step, write the frames into the workers' rings. A full ring never blocks the loop: its frames are
parked and retried on the next pass. A heartbeat thread keeps the host visibly alive even while a
long model load or forward pass holds the loop.
"""

from __future__ import annotations

import logging
import pickle
import selectors
import signal
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from types import FrameType

import torch

from model_host.engine import Engine, SchedulerLimits, StepOutput
from model_host.ipc.channels import HostSide
from model_host.ipc.doorbell import Doorbell
from model_host.ipc.launch import HOST_CONFIG_ERROR_EXIT, HostSettings
from model_host.ipc.messages import (
    AbortRequest,
    AddRequest,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    TokenFrame,
    UnloadModels,
    WorkerReset,
)
from model_host.ipc.ring import RingBuffer
from model_host.ipc.status import HostStatus, StatusField
from model_host.registry import DeviceError, ModelLoadError, ModelRegistry

log = logging.getLogger("hfserve.host")

_HEARTBEAT_INTERVAL_S = 0.2
_IDLE_WAIT_S = 0.5
_PARKED_RETRY_S = 0.002


def _default_prefill_budget(device: torch.device) -> int:
    # Measured on a 2-core CPU (benchmarks/): prefilling 256 tokens per step keeps TTFT and
    # inter-token latency low at no cost in throughput, where 2048 stalled every decode for ~1 s.
    # A GPU prefills thousands of tokens in the time of one decode step.
    return 4096 if device.type == "cuda" else 256


class _Outbox:
    """Frames on their way to one worker: straight into the ring, or parked while it is full."""

    def __init__(self, ring: RingBuffer, bell: Doorbell) -> None:
        self.ring = ring
        self.bell = bell
        self.parked: deque[bytes] = deque()
        self.dirty = False

    def put(self, frame: TokenFrame) -> None:
        raw = frame.encode()
        if self.parked or not self.ring.try_write(raw):
            self.parked.append(raw)  # keep order: nothing overtakes a parked frame
        else:
            self.dirty = True

    def flush(self) -> None:
        while self.parked and self.ring.try_write(self.parked[0]):
            self.parked.popleft()
            self.dirty = True
        if self.dirty:
            self.bell.ring()
            self.dirty = False


class ModelHost:
    def __init__(self, side: HostSide, settings: HostSettings) -> None:
        self.status: HostStatus = side.status()
        self.readers: dict[Connection, int] = {c: i for i, c in enumerate(side.request_readers)}
        self._selector = selectors.DefaultSelector()
        for conn in self.readers:
            self._selector.register(conn, selectors.EVENT_READ, conn)
        self.outboxes = [
            _Outbox(RingBuffer(ring), Doorbell(bell))
            for ring, bell in zip(side.rings, side.doorbell_writers, strict=True)
        ]
        self.registry = ModelRegistry(settings.device, settings.dtype, settings.trust_remote_code)
        self.engine = Engine(
            self.registry,
            SchedulerLimits(
                settings.max_batch_size,
                settings.max_batch_tokens or _default_prefill_budget(self.registry.device),
                settings.max_queue,
                settings.prefix_cache_mb * 1024 * 1024,
            ),
        )
        self.settings = settings
        self.epoch = 0
        self._published_models: tuple[str, ...] = ()
        self.stopping = threading.Event()

    def start(self) -> None:
        """Take a new epoch and load the preloaded models; raises ``ModelLoadError`` when one
        cannot be loaded."""
        self.epoch = self.status.start_epoch()
        threading.Thread(target=self._heartbeat, name="hfserve-heartbeat", daemon=True).start()
        for path in self.settings.preload:
            self.registry.get(path)
        self._publish_status()
        self.status.set(StatusField.READY, 1)
        log.info("model host ready (epoch %d, device %s)", self.epoch, self.registry.device)

    def run(self) -> None:
        while not self.stopping.is_set():
            self._receive()
            if self.engine.has_work():
                self._deliver(self._step())
            for box in self.outboxes:
                box.flush()
            self._publish_status()
        log.info("model host stopped")

    def _step(self) -> list[StepOutput]:
        try:
            return self.engine.step()
        except Exception:  # a bug must cost the requests in flight, not the host
            log.exception("engine step failed; failing every request in flight")
            return self.engine.fail_all("internal error in the generation step")

    def _heartbeat(self) -> None:
        while not self.stopping.wait(_HEARTBEAT_INTERVAL_S):
            self.status.beat()

    def _receive(self) -> None:
        if self.engine.has_work():
            timeout = 0.0
        elif any(box.parked for box in self.outboxes):
            timeout = _PARKED_RETRY_S
        else:
            timeout = _IDLE_WAIT_S
        # One selector for the life of the host: multiprocessing's wait() builds a new one per
        # call, which showed up as ~15 % of a busy host's time with a tiny model.
        for key, _ in self._selector.select(timeout):
            conn: Connection = key.data
            while conn.poll():
                try:
                    msg = pickle.loads(conn.recv_bytes())
                except EOFError:  # every writer closed: that worker is gone for good
                    self._selector.unregister(conn)
                    self.engine.abort_worker(self.readers.pop(conn))
                    break
                self._handle(msg)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, AddRequest):
            if msg.epoch != self.epoch:
                err = ErrorInfo(ErrorKind.ENGINE_DEAD, "the model host restarted; retry")
                self.outboxes[msg.worker_index].put(TokenFrame(msg.request_id, (), FinishReason.ERROR, err))
            else:
                refused = self.engine.add(msg)
                if refused is not None:
                    self._deliver([refused])
        elif isinstance(msg, AbortRequest):
            self.engine.abort((msg.worker_index, msg.request_id))
        elif isinstance(msg, WorkerReset):
            dropped = self.engine.abort_worker(msg.worker_index)
            if dropped:
                log.warning("worker %d restarted: aborted %d orphaned requests", msg.worker_index, dropped)
        elif isinstance(msg, UnloadModels):
            unloaded = self.engine.unload_idle_models(keep=self.settings.preload)
            log.info("unloaded %d model(s) on request: %s", len(unloaded), ", ".join(unloaded) or "none")
            # Published before the answer goes out, so the worker that asked (and /health, /v1/models
            # everywhere) no longer lists them once it has the answer.
            self._publish_status()
            self.outboxes[msg.worker_index].put(TokenFrame(msg.request_id, (), FinishReason.STOP))
        else:
            log.error("ignoring unknown message %r", type(msg).__name__)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            self.outboxes[out.worker_index].put(out.frame)
            if out.frame.finish_reason is FinishReason.ERROR:
                self.status.add(StatusField.FAILED_TOTAL)
            elif out.frame.finish_reason is not FinishReason.NONE:
                self.status.add(StatusField.FINISHED_TOTAL)

    def _publish_status(self) -> None:
        s = self.status
        s.set(StatusField.RUNNING, self.engine.num_running)
        s.set(StatusField.WAITING, self.engine.num_waiting)
        s.set(StatusField.ABORTED_TOTAL, self.engine.aborted_total)
        s.set(StatusField.PROMPT_TOKENS_TOTAL, self.engine.prompt_tokens_total)
        s.set(StatusField.CACHED_TOKENS_TOTAL, self.engine.cached_tokens_total)
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
    try:
        host = ModelHost(side, settings)
        host.start()
    except (DeviceError, ModelLoadError) as exc:
        # A setting the host cannot start with: restarting would fail the same way. One line,
        # and the exit status that tells the server to stop instead of restarting the host.
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        sys.exit(HOST_CONFIG_ERROR_EXIT)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping after this step", signal.Signals(signum).name)
        host.stopping.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    host.run()

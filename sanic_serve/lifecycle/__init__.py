"""Running as a service: the drain on SIGTERM/SIGINT, systemd notifications, supervision and restart
of crashed processes, and the sweep of shared memory a killed server left behind.

``install_lifecycle`` registers the worker side and the shared state on the app; the main process calls
``start_main`` once the model host is managed, and ``stop_main`` when it stops.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from multiprocessing import get_context
from types import FrameType
from typing import Any

from sanic import Sanic

from model_host.ipc.client import HOST_DEAD_AFTER_S
from model_host.ipc.status import StatusField
from sanic_serve.config import ServerConfig
from sanic_serve.lifecycle import drain, shm
from sanic_serve.lifecycle.notify import Notifier, ServiceNotifier
from sanic_serve.lifecycle.state import ServerState
from sanic_serve.lifecycle.supervisor import HOST_PROCESS_NAME, Supervisor

__all__ = ["HOST_PROCESS_NAME", "install_lifecycle", "start_main", "stop_main", "worker_index"]

log = logging.getLogger("hfserve")


def worker_index() -> int:
    from sanic_serve.app import worker_index as index

    return index()


def install_lifecycle(app: Sanic, config: ServerConfig) -> None:
    @app.main_process_start
    async def _shared_state(app: Sanic) -> None:
        try:
            shm.sweep()  # what a killed predecessor left in /dev/shm
        except Exception:  # never a reason not to start
            log.exception("sweeping leftover shared memory failed")
        app.shared_ctx.server_state = ServerState.allocate(get_context("spawn"), config.workers)

    drain.install_worker(app, lambda app: ServerState(app.shared_ctx.server_state), worker_index)


def _host_ready(app: Sanic) -> bool:
    status = app.ctx.channels.status()
    return bool(status.get(StatusField.READY)) and status.host_alive(HOST_DEAD_AFTER_S)


def start_main(app: Sanic, config: ServerConfig) -> None:
    """In the main process, once every process is managed: the supervisor, the notifier thread,
    and the stop signals, which start a drain."""
    state = ServerState(app.shared_ctx.server_state)
    stop_event = threading.Event()
    recorder = shm.Recorder()
    supervisor = Supervisor(app, stop_event, on_tick=recorder.maybe_record)

    def ready() -> bool:
        return state.all_listening() and _host_ready(app)

    def status_line() -> str:
        if supervisor.host_failing():
            return f"model host keeps failing ({supervisor.host_restarts} restart(s)); watchdog pings stopped"
        if supervisor.restarting:
            return f"model host down; restarting it ({supervisor.host_restarts} restart(s) so far)"
        if not _host_ready(app):
            return f"loading {config.default_model_id or 'the model host'}"
        n = len(app.ctx.channels.status().snapshot().models)
        return f"serving {n} model{'s' if n != 1 else ''}"

    def healthy() -> bool:
        # A restart is healthy only within bounds: a host that keeps dying, or whose restart hangs,
        # stops the pings, and systemd restarts the whole service.
        if supervisor.host_failing():
            return False
        return supervisor.recovering() or app.ctx.channels.status().host_alive(HOST_DEAD_AFTER_S)

    notifier = Notifier()
    service = ServiceNotifier(notifier, ready, healthy, status_line, on_ready=lambda: _announce(config))
    manager = app.manager
    signals: list[int] = []

    def stop() -> None:
        _stop_manager(manager, signals[0] if signals else signal.SIGTERM)

    draining = drain.Drain(
        state,
        config.drain_timeout_s,
        stop,
        on_start=service.stopping,
        status=service.say,
    )

    def handler(signum: int, frame: FrameType | None) -> None:
        # Nothing but bookkeeping in the handler: the drain runs in a thread of its own.
        signals.append(signum)
        draining.begin()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    app.ctx.lifecycle = (stop_event, service, notifier, recorder)
    threading.Thread(target=supervisor.run, name="hfserve-supervisor", daemon=True).start()
    service.start()


def stop_main(app: Sanic) -> None:
    found = getattr(app.ctx, "lifecycle", None)
    if found is not None:
        stop_event, service, notifier, recorder = found
        stop_event.set()
        service.close()
        notifier.close()
        recorder.remove()


def _stop_manager(manager: Any, signum: int) -> None:
    """Sanic's worker manager stops on SIGINT/SIGTERM from inside the signal handler. The signal
    can land while the main thread waits for a reply from the shared-state manager; the stop's own
    state writes then go out on that same connection mid-call, and the shutdown crashes (exit 1).
    This runs in a thread, which has a connection of its own.

    A stop before every worker has started meets a second problem: the manager's wait for the
    workers' acknowledgements puts the stop message back and waits on, forever (a busy loop). The
    stop ends that wait, and the manager goes on to its normal shutdown."""
    if not manager._all_workers_ack():
        manager._all_workers_ack = lambda: True
    # Sanic stops its processes with SIGINT, which ours ignore once they run (a terminal's Ctrl-C
    # reaches the whole group, and only the main process may act on it): they get SIGTERM first.
    for process in list(manager.processes):
        if process.is_alive():
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    manager.shutdown_signal(signum, None)


def _announce(config: ServerConfig) -> None:
    """Say once, on stdout, where the server listens and what it serves, when it really can."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    model = config.default_model_id or "models on demand"
    print(
        f"hfserve ready: http://{host}:{config.port}/v1 serving {model} "
        f"({config.workers} worker{'s' if config.workers > 1 else ''}; Ctrl-C stops)",
        flush=True,
    )

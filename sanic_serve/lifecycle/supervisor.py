"""The main process's supervisor: brings back a model host or an HTTP worker that died.

Sanic's worker manager does not restart a dead process by itself; it does act on a restart message
from its monitor pipe. Restarts of one process back off exponentially (0.5 s, 1 s, 2 s, ... up to
30 s) while it keeps dying, and the count starts again once it has stayed up a minute, so a host
that crashes at every load does not spin the machine, and a rare crash costs half a second.

A host being restarted counts as healthy for systemd's watchdog, but only so far: past
``HEALTHY_RESTARTS`` restarts in a row, or ``HEALTHY_RESTART_S`` without a heartbeat from the new
one, the watchdog pings stop and systemd restarts the whole service (and the journal shows it).
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model_host.ipc.client import HOST_DEAD_AFTER_S
from model_host.ipc.codec import encode
from model_host.ipc.messages import WorkerReset
from model_host.ipc.settings import HOST_CONFIG_ERROR_EXIT, config_error_exit

log = logging.getLogger("hfserve")

HOST_PROCESS_NAME = "ModelHost"
SUPERVISE_INTERVAL_S = 0.5
HEALTHY_RESTARTS = 5  # host restarts in a row (none a minute apart) still counted as recovering
HEALTHY_RESTART_S = 120.0  # from the host's death to the new one's first heartbeat


@dataclass
class Backoff:
    """Delays before restarting one process, doubling while it keeps dying."""

    first_s: float = 0.5
    cap_s: float = 30.0
    stable_after_s: float = 60.0
    _failures: dict[str, int] = field(default_factory=dict)
    _last_restart: dict[str, float] = field(default_factory=dict)

    def delay_s(self, name: str, now: float) -> float:
        """The wait before the restart of ``name``, which just died; counts the failure."""
        if now - self._last_restart.get(name, -1e9) > self.stable_after_s:
            self._failures[name] = 0
        failures = self._failures.get(name, 0)
        self._failures[name] = failures + 1
        return float(min(self.first_s * 2**failures, self.cap_s))

    def restarted(self, name: str, now: float) -> None:
        self._last_restart[name] = now

    def attempt(self, name: str) -> int:
        return self._failures.get(name, 0)

    def recent_failures(self, name: str, now: float) -> int:
        """Deaths in a row, none after a minute up: 0 once the last restart has stayed up that long."""
        if now - self._last_restart.get(name, -1e9) > self.stable_after_s:
            return 0
        return self._failures.get(name, 0)


def server_index(process_name: str) -> int | None:
    """The worker index ``n`` in Sanic's ``Sanic-Server-<n>-<i>`` process name (``n`` is stable across
    restarts); None for any other process."""
    match = re.search(r"Server-(\d+)-", process_name)
    return int(match.group(1)) if match else None


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's OOM killer sends this)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit status {exitcode}"


class Supervisor:
    """Runs in a thread of the main process. ``restarting`` says whether a host restart is pending or
    under way (the host died and no new one has beaten yet), for the watchdog and the status line."""

    def __init__(
        self,
        app: Any,
        stop: threading.Event,
        backoff: Backoff | None = None,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self._on_tick = on_tick
        self.stop = stop
        self.backoff = backoff or Backoff()
        self._due: dict[tuple[str, int | None], float] = {}  # (name, dead pid) -> when to restart it
        self.host_down_since: float | None = None
        self.host_restarts = 0
        self._host_name = HOST_PROCESS_NAME

    @property
    def restarting(self) -> bool:
        return self.host_down_since is not None

    def recovering(self, now: float | None = None) -> bool:
        """A host restart is under way and still within bounds: the watchdog may count it as
        healthy."""
        now = time.monotonic() if now is None else now
        return self.restarting and not self.host_failing(now)

    def host_failing(self, now: float | None = None) -> bool:
        """The host keeps dying, or its restart has taken too long: restarting it is not working."""
        now = time.monotonic() if now is None else now
        if self.backoff.recent_failures(self._host_name, now) > HEALTHY_RESTARTS:
            return True
        down_since = self.host_down_since
        return down_since is not None and now - down_since > HEALTHY_RESTART_S

    def run(self) -> None:
        manager = self.app.manager
        while not self.stop.wait(SUPERVISE_INTERVAL_S):
            if getattr(manager, "_shutting_down", False):
                return
            self._on_tick()
            processes = list(manager.processes)  # a generator: read it once per tick
            if any(HOST_PROCESS_NAME in p.name and p.exitcode == HOST_CONFIG_ERROR_EXIT for p in processes):
                self._stop_for_config_error()
                return
            # A process that exited 0 was stopped on purpose (shutdown); only crashes are restarted.
            # Keyed by pid too: a process restarted under the same name that dies again is a new death.
            dead = {
                (p.name, p.pid): p.exitcode
                for p in processes
                if not p.is_alive() and p.exitcode not in (None, 0)
            }
            # A shutdown starts by stopping processes and only then sets its flag: look again after a
            # moment, so that no process is brought back while the server is going down.
            new = [key for key in dead if key not in self._due]
            if new and (self.stop.wait(SUPERVISE_INTERVAL_S) or getattr(manager, "_shutting_down", False)):
                return
            now = time.monotonic()
            for key in new:
                name = key[0]
                index = server_index(name)
                if index is not None:
                    self._orphan_requests(index)
                delay_s = self.backoff.delay_s(name, now)
                self._due[key] = now + delay_s
                if HOST_PROCESS_NAME in name:
                    self._host_name = name
                    self.host_down_since = self.host_down_since or now
                log.error(
                    "process %s died (%s); restarting it in %.1f s (attempt %d)",
                    name,
                    describe_exit(dead[key]),
                    delay_s,
                    self.backoff.attempt(name),
                )
            for key, due in list(self._due.items()):
                if key not in dead:
                    del self._due[key]  # restarted: it runs under a new pid
                elif now >= due:
                    manager.monitor_publisher.send(key[0])
                    self.backoff.restarted(key[0], now)
                    self._due[key] = float("inf")  # asked once; the manager does the rest
                    if HOST_PROCESS_NAME in key[0]:
                        self.host_restarts += 1
            if self.host_down_since is not None and self._host_beating():
                self.host_down_since = None

    def _orphan_requests(self, index: int) -> None:
        """Tell the host that nobody reads worker ``index``'s requests any more, so that it stops
        computing them now: its replacement says so too, but only once it has started (seconds on
        a busy machine, after the restart's backoff)."""
        writer = self.app.ctx.channels.request_writers[index]
        # Written from this thread only when the pipe has room: a host that is stuck or gone must
        # not stop the supervisor. A message this small is written atomically, so it cannot
        # interleave with the replacement worker's.
        try:
            _, writable, _ = select.select([], [writer], [], 0)
            if writable:
                writer.send_bytes(encode(WorkerReset(index)))
                return
        except OSError:  # the pipe is closed: the server is stopping
            pass
        log.warning("worker %d died; its requests are dropped once its replacement starts", index)

    def _host_beating(self) -> bool:
        status = self.app.ctx.channels.status()
        alive: bool = status.host_alive(HOST_DEAD_AFTER_S)
        return alive

    def _stop_for_config_error(self) -> None:
        """The host said it cannot start with these settings (and said why in its log): stop the
        whole server with the settings-error status (1, or 78 under the systemd unit, which tells
        systemd not to restart on it) rather than restart it in a loop."""
        log.debug("the model host cannot start with these settings; stopping")
        self.app.ctx.exit_code = config_error_exit()
        os.kill(os.getpid(), signal.SIGTERM)

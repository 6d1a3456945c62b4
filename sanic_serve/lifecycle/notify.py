"""systemd's notify protocol, spoken by the main process: one datagram per message to the socket in
``$NOTIFY_SOCKET`` (no library needed). Outside systemd (no socket) every call is a no-op.

What is sent and when (see ``ServiceNotifier``): ``STATUS=`` while the server starts, serves, drains or
recovers; ``READY=1`` once, when every worker listens and the model host has loaded its pinned model;
``WATCHDOG=1`` every half ``$WATCHDOG_USEC``, but only while the model host's heartbeat is fresh (or a
crashed host is being restarted), so that a hung host gets the service restarted; ``STOPPING=1`` when
a drain starts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("hfserve")


class Notifier:
    """The socket, if systemd gave one. Sends never raise: a service manager that went away must not
    take the server with it."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # '@' names a socket in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._warned = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        message = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message, self.address)
                return True
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot notify the service manager: %s", exc)
                    self._warned = True
                return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half the watchdog timeout systemd asks for (as sd_watchdog_enabled advises), or None when it
    asks for none or asks another process (``$WATCHDOG_PID``)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1e6


class ServiceNotifier:
    """A thread of the main process that keeps systemd told. ``ready()``: the server can serve;
    ``healthy()``: the model host is alive (fresh heartbeat) or being restarted; ``status()``: one
    line for ``systemctl status``."""

    def __init__(
        self,
        notifier: Notifier,
        ready: Callable[[], bool],
        healthy: Callable[[], bool],
        status: Callable[[], str],
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self.notifier = notifier
        self._ready = ready
        self._healthy = healthy
        self._status = status
        self._on_ready = on_ready
        self.interval_s = watchdog_interval_s()
        self.stop_event = threading.Event()
        self._stopping = False
        self._last_status = ""
        self._thread = threading.Thread(target=self._run, name="hfserve-notify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stopping(self, status: str) -> None:
        """A drain starts: say so before anything else happens."""
        self._stopping = True
        self._send_status(status, "STOPPING=1")

    def say(self, status: str) -> None:
        """A status line from elsewhere (the drain)."""
        self._send_status(status)

    def close(self) -> None:
        self.stop_event.set()

    def _send_status(self, status: str, *more: str) -> None:
        if status != self._last_status or more:
            self._last_status = status
            self.notifier.send(*more, f"STATUS={status}")

    def _run(self) -> None:
        announced = False
        tick_s = 0.2 if self.interval_s is None else min(0.2, self.interval_s / 4)
        next_ping = time.monotonic()
        while not self.stop_event.wait(tick_s):
            try:
                if not announced and not self._stopping and self._ready():
                    announced = True
                    self._send_status(self._status(), "READY=1")
                    self._on_ready()
                elif not self._stopping:
                    self._send_status(self._status())
                now = time.monotonic()
                # systemd's watchdog runs from READY=1 on; no pings before it.
                if announced and self.interval_s is not None and now >= next_ping:
                    # No ping for a host that stopped beating: systemd's watchdog then restarts the
                    # service, the one cure for a host that hangs without dying.
                    if self._healthy():
                        self.notifier.send("WATCHDOG=1")
                    next_ping = now + self.interval_s
            except Exception:  # the thread must outlive any surprise; the log says what it was
                log.exception("service notification failed")

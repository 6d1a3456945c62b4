"""Graceful drain on SIGTERM and SIGINT.

The main process, on the first signal: tells systemd ``STOPPING=1``, sets the shared phase to
``DRAINING`` and waits while any worker has requests in flight, at most ``--drain-timeout-s``. The
workers meanwhile answer every new request but the public probes with 503 and ``Retry-After``
(``/health`` says ``draining``) and let running requests and streams finish. When the time is up
the phase becomes ``ENDING``: each worker ends what still runs with an error (an error event for a
stream, a 503 otherwise). Then the usual shutdown stops workers and host. A second signal during
the drain skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Callable

from sanic import Request, Sanic

from model_host.ipc import HostClient
from sanic_serve.errors import Unavailable
from sanic_serve.lifecycle.protocol import RequestCounter
from sanic_serve.lifecycle.state import Phase, ServerState

log = logging.getLogger("hfserve")

# Probes keep answering during a drain: a load balancer must see /health say "draining", and a
# Prometheus scrape must see the drain happen.
DRAIN_EXEMPT_PATHS = frozenset({"/health", "/metrics"})
_ENDING_GRACE_S = 5.0  # for the ended requests' last bytes to go out
_POLL_S = 0.05


class ShuttingDown(Unavailable):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            "The server is shutting down and takes no new requests; retry shortly.",
            code="server_shutting_down",
            headers={"Retry-After": str(retry_after_s)},
        )


# -- worker side ---------------------------------------------------------------------------------
def install_worker(app: Sanic, state_of: Callable[[Sanic], ServerState], index_of: Callable[[], int]) -> None:
    """Count this worker's requests in flight, refuse new ones while draining, end the rest when
    the drain runs out of time."""

    @app.before_server_start
    async def _count_requests(app: Sanic) -> None:
        state = state_of(app)
        index = index_of()
        state.worker_started(index)
        app.ctx.server_state = state
        # Counted by the workers' HTTP protocol (ServerProtocol), which every request passes.
        app.ctx.request_counter = RequestCounter(lambda delta: state.add_in_flight(index, delta))

    @app.after_server_start
    async def _listening(app: Sanic) -> None:
        state: ServerState = app.ctx.server_state
        state.worker_listening(index_of(), True)
        # A terminal's Ctrl-C reaches every process of the group: the main process drains, and the
        # workers serve on until it stops them (with SIGTERM).
        app.loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        app.ctx.drain_watch = app.loop.create_task(_end_on_timeout(app, state))

    @app.before_server_stop
    async def _not_listening(app: Sanic) -> None:
        app.ctx.server_state.worker_listening(index_of(), False)
        task = getattr(app.ctx, "drain_watch", None)
        if task is not None:
            task.cancel()

    async def _refuse_while_draining(request: Request) -> None:
        state: ServerState = request.app.ctx.server_state
        if state.phase is not Phase.SERVING and request.path not in DRAIN_EXEMPT_PATHS:
            left_s = (state.deadline_ns - time.monotonic_ns()) / 1e9
            raise ShuttingDown(max(1, math.ceil(left_s)))

    # Early: a request refused anyway should cost nothing else (CORS preflights answer first).
    app.register_middleware(_refuse_while_draining, "request", priority=950)


async def _end_on_timeout(app: Sanic, state: ServerState) -> None:
    while state.phase is not Phase.ENDING:
        await asyncio.sleep(_POLL_S)
    client: HostClient = app.ctx.client
    ended = client.end_all("The server shut down before the request finished; retry.")
    if ended:
        log.warning("drain timed out: ended %d request(s) still running", ended)


def draining(app: Sanic) -> bool:
    state: ServerState | None = getattr(app.ctx, "server_state", None)
    return state is not None and state.phase is not Phase.SERVING


# -- main process --------------------------------------------------------------------------------
class Drain:
    """Runs the drain once, in a thread of its own (never in the signal handler), then calls
    ``stop``."""

    def __init__(
        self,
        state: ServerState,
        timeout_s: float,
        stop: Callable[[], None],
        on_start: Callable[[str], None] = lambda status: None,
        status: Callable[[str], None] = lambda status: None,
    ) -> None:
        self.state = state
        self.timeout_s = timeout_s
        self._stop = stop
        self._on_start = on_start
        self._status = status
        self._lock = threading.Lock()
        self._started = False
        self._stopping = False
        self.hurry = threading.Event()

    def begin(self) -> None:
        """Start the drain; a second call (a second signal) cuts it short, and one after the drain
        kills what has not stopped yet."""
        with self._lock:
            if self._stopping:
                # Stopping already and signalled again: Sanic's manager kills what is left.
                threading.Thread(target=self._stop, name="hfserve-kill", daemon=True).start()
                return
            if self._started:
                log.warning("second stop signal: ending the requests still running now")
                self.hurry.set()
                return
            self._started = True
        threading.Thread(target=self._run, name="hfserve-drain", daemon=True).start()

    def _run(self) -> None:
        try:
            self._drain()
        except Exception:
            log.exception("the drain failed; stopping anyway")
        with self._lock:
            self._stopping = True
        self._stop()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        # The phase first, the count after: a request that arrives between the two is either
        # refused (it saw DRAINING) or counted; counted first, it could slip past both.
        self.state.set_phase(Phase.DRAINING, time.monotonic_ns() + int(self.timeout_s * 1e9))
        in_flight = self.state.in_flight_total()
        self._on_start(f"draining: {in_flight} request(s) in flight")
        if in_flight:
            log.info("stopping: draining %d request(s), at most %.0f s", in_flight, self.timeout_s)
        last = -1
        while in_flight and time.monotonic() < deadline and not self.hurry.is_set():
            if in_flight != last:
                self._status(f"draining: {in_flight} request(s) in flight")
                last = in_flight
            self.hurry.wait(_POLL_S)
            in_flight = self.state.in_flight_total()
        if not in_flight:
            log.info("drained; stopping")
            return
        self.state.set_phase(Phase.ENDING)
        self._status(f"drain over: ending {in_flight} request(s)")
        deadline = time.monotonic() + _ENDING_GRACE_S
        while self.state.in_flight_total() and time.monotonic() < deadline:
            time.sleep(_POLL_S)

"""Unit tests of the service parts that need no server: the shared state, the drain's phases, the
notify socket, the unit's quoting."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from cli.service_unit import drain_timeout_of, quote_exec_arg
from sanic_serve.lifecycle.drain import Drain
from sanic_serve.lifecycle.notify import Notifier, watchdog_interval_s
from sanic_serve.lifecycle.state import Phase, ServerState
from sanic_serve.lifecycle.supervisor import describe_exit


def state(workers: int = 2) -> ServerState:
    s = ServerState(ServerState.allocate(get_context("spawn"), workers))
    for i in range(workers):
        s.worker_started(i)  # as if this process were every worker
    return s


def test_state_counts_in_flight_and_listening() -> None:
    s = state(2)
    assert not s.all_listening() and s.in_flight_total() == 0
    s.worker_listening(0, True)
    s.worker_listening(1, True)
    s.add_in_flight(0, 2)
    s.add_in_flight(1, 1)
    assert s.all_listening() and s.in_flight_total() == 3
    s.worker_started(1)  # a restarted worker starts from nothing
    assert s.in_flight_total() == 2 and not s.all_listening()


def run_drain(s: ServerState, timeout_s: float) -> tuple[Drain, threading.Event, list[str]]:
    stopped = threading.Event()
    statuses: list[str] = []
    drain = Drain(s, timeout_s, stopped.set, on_start=statuses.append, status=statuses.append)
    drain.begin()
    return drain, stopped, statuses


def test_drain_waits_for_requests_in_flight_then_stops() -> None:
    s = state(1)
    s.add_in_flight(0, 2)
    _, stopped, statuses = run_drain(s, 30.0)
    time.sleep(0.3)
    assert s.phase is Phase.DRAINING and not stopped.is_set()
    assert statuses[0] == "draining: 2 request(s) in flight"
    s.add_in_flight(0, -2)
    assert stopped.wait(5) and s.phase is Phase.DRAINING  # nothing had to be ended


def test_drain_refuses_new_requests_before_it_counts_those_in_flight() -> None:
    """A request that passes the phase check while the drain counts must be counted: the phase is
    set before the first count."""
    s = state(1)
    phases_at_count: list[Phase] = []
    count = s.in_flight_total

    def counting() -> int:
        phases_at_count.append(s.phase)
        return count()

    s.in_flight_total = counting  # type: ignore[method-assign]
    _, stopped, _ = run_drain(s, 30.0)
    assert stopped.wait(5)
    assert phases_at_count and phases_at_count[0] is Phase.DRAINING


def test_drain_timeout_ends_the_rest_and_a_second_signal_hurries() -> None:
    s = state(1)
    s.add_in_flight(0, 1)
    _, stopped, _ = run_drain(s, 0.3)
    time.sleep(0.6)
    assert s.phase is Phase.ENDING and not stopped.is_set()  # the worker now ends what runs
    s.add_in_flight(0, -1)
    assert stopped.wait(5)

    s = state(1)
    s.add_in_flight(0, 1)
    drain, stopped, _ = run_drain(s, 30.0)
    time.sleep(0.2)
    drain.begin()  # a second SIGTERM
    time.sleep(0.3)
    assert s.phase is Phase.ENDING
    s.add_in_flight(0, -1)
    assert stopped.wait(5)


def _worker_that_dies(array: object) -> None:
    worker = ServerState(array)
    worker.worker_started(0)
    worker.add_in_flight(0, 3)


def test_a_dead_workers_count_does_not_hold_the_drain() -> None:
    ctx = get_context("spawn")
    array = ServerState.allocate(ctx, 1)
    child = ctx.Process(target=_worker_that_dies, args=(array,))
    child.start()
    child.join(60)
    s = ServerState(array)
    assert s._a[2 + 2] == 3  # its count is still there (header, then pid, listening, in flight)
    assert s.in_flight_total() == 0  # but its pid is gone


def test_notifier_sends_datagrams_and_reads_the_watchdog(tmp_path: Path) -> None:
    path = str(tmp_path / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        assert notifier.send("READY=1", "STATUS=serving 1 model")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving 1 model"
        notifier.close()
    assert not Notifier({}).enabled and not Notifier({}).send("READY=1")
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).send("READY=1")  # never raises
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None


def test_unit_words_and_drain_timeout() -> None:
    assert quote_exec_arg("/opt/my models/q") == '"/opt/my models/q"'
    assert quote_exec_arg("100%") == "100%%" and quote_exec_arg("$HOME") == "$$HOME"
    assert quote_exec_arg("$HOME", dollars=False) == "$HOME"
    assert drain_timeout_of(["--workers", "2", "--drain-timeout-s", "12.5"]) == 12.5
    assert drain_timeout_of(["--drain-timeout-s=7"]) == 7.0
    assert drain_timeout_of([]) == 30.0
    with pytest.raises(ValueError):
        drain_timeout_of(["--drain-timeout-s", "soon"])


def test_exit_descriptions() -> None:
    assert describe_exit(-signal.SIGKILL).startswith("killed by SIGKILL (the kernel's OOM killer")
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(1) == "exit status 1"


def test_loop_progress_needs_the_loop_to_move_and_allows_a_load_longer() -> None:
    from model_host.process import LoopProgress

    now = [100.0]
    progress = LoopProgress(stall_s=5.0, load_stall_s=60.0, clock=lambda: now[0])
    now[0] += 4.9
    assert progress.fresh()
    now[0] += 0.2  # 5.1 s without a pass: hung
    assert not progress.fresh()
    progress.moved()
    assert progress.fresh()
    progress.loading("/m")
    now[0] += 59.0  # a load may hold the loop far longer than a step
    assert progress.fresh()
    now[0] += 2.0
    assert not progress.fresh()  # but not forever
    progress.moved()  # the load ended: a step's allowance again, from now
    now[0] += 5.5
    assert not progress.fresh()


def test_one_cache_folder_rule_and_one_pid_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_host.demo.build import default_cache_dir
    from model_host.ipc.system import cache_dir, pid_alive
    from sanic_serve.lifecycle.shm import run_dir

    home = Path("/home/someone")
    assert cache_dir({}, home) == home / ".cache" / "hfserve"
    assert cache_dir({"XDG_CACHE_HOME": "/x"}, home) == Path("/x/hfserve")
    assert cache_dir({"XDG_CACHE_HOME": "/x", "HFSERVE_CACHE": "/c"}, home) == Path("/c")
    # Every user of the rule follows the environment the same way.
    monkeypatch.delenv("HFSERVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "hfserve"
    assert run_dir() == tmp_path / "hfserve" / "run"

    assert pid_alive(os.getpid()) and not pid_alive(0) and not pid_alive(-1)
    child = get_context("spawn").Process(target=time.sleep, args=(0,))
    child.start()
    child.join(60)
    assert not pid_alive(child.pid or 0)  # reaped: gone


def test_a_host_restart_counts_as_healthy_only_within_bounds() -> None:
    from sanic_serve.lifecycle.supervisor import (
        HEALTHY_RESTART_S,
        HEALTHY_RESTARTS,
        HOST_PROCESS_NAME,
        Supervisor,
    )

    sup = Supervisor(None, threading.Event())
    t = 1000.0
    assert not sup.host_failing(t) and not sup.recovering(t)  # up: healthy by its heartbeat alone

    def host_dies(now: float) -> None:
        sup.backoff.delay_s(HOST_PROCESS_NAME, now)
        sup.backoff.restarted(HOST_PROCESS_NAME, now)
        sup.host_down_since = sup.host_down_since or now

    for i in range(HEALTHY_RESTARTS):
        host_dies(t + i)
        assert sup.recovering(t + i + 0.5), i
    host_dies(t + HEALTHY_RESTARTS)  # one restart too many in a row
    assert sup.host_failing(t + HEALTHY_RESTARTS + 0.5)
    assert not sup.recovering(t + HEALTHY_RESTARTS + 0.5)
    sup.host_down_since = None  # the last one came up and stayed up a minute: forgiven
    assert not sup.host_failing(t + HEALTHY_RESTARTS + 61)

    slow = Supervisor(None, threading.Event())
    slow.host_down_since = t  # died once; the new host never beats
    assert slow.recovering(t + HEALTHY_RESTART_S - 1)
    assert slow.host_failing(t + HEALTHY_RESTART_S + 1) and not slow.recovering(t + HEALTHY_RESTART_S + 1)


def test_config_error_exit_is_1_unless_the_service_unit_asks_for_another() -> None:
    from model_host.ipc.settings import config_error_exit

    assert config_error_exit({}) == 1
    assert config_error_exit({"HFSERVE_CONFIG_ERROR_EXIT": "78"}) == 78
    for junk in ("", "0", "256", "-3", "x78"):
        assert config_error_exit({"HFSERVE_CONFIG_ERROR_EXIT": junk}) == 1, junk


def test_a_worker_index_is_read_from_sanics_process_name() -> None:
    from sanic_serve.lifecycle.supervisor import HOST_PROCESS_NAME, server_index

    assert server_index("Sanic-Server-0-0") == 0
    assert server_index("Sanic-Server-3-1") == 3  # restarted: the second number changes, not the index
    assert server_index(f"Sanic-{HOST_PROCESS_NAME}-0") is None
    assert server_index("") is None

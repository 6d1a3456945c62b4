"""The folder where every worker's metric values live (prometheus-client's multiprocess mode).

The main process makes one folder per server, named after its own pid, and hands it to the
workers it spawns in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client reads the variable when it is
imported, so it must be set before any worker starts). Each worker writes its counters and
histograms into memory-mapped files there; a scrape, in whichever worker it lands, sums them all.
The folder is removed when the server stops; one left by a server that was killed (its pid gone)
is removed by the next start.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

from model_host.ipc.system import pid_alive

ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "hfserve-metrics-"
_FOLDER = re.compile(rf"{_PREFIX}(\d+)-")
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def remove_stale_dirs(base: Path | None = None) -> list[Path]:
    """Remove metrics folders of servers that no longer run; returns what was removed."""
    root = Path(base or tempfile.gettempdir())
    removed = []
    for folder in root.glob(f"{_PREFIX}*"):
        found = _FOLDER.match(folder.name)
        if found and not pid_alive(int(found.group(1))) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def create_dir() -> Path:
    """A fresh folder for this server, exported to the processes it will start."""
    remove_stale_dirs()
    folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
    os.environ[ENV] = str(folder)
    return folder


def remove_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if os.environ.get(ENV) == str(folder):
        del os.environ[ENV]


def forget_dead_processes(folder: str) -> None:
    """Drop the live gauges (requests in flight) of workers that died: their last values would
    otherwise count for ever. Counters and histograms of dead workers stay, as totals must.

    Every scrape does this, in whichever worker it lands, so two scrapes may both find a dead
    worker's file and both remove it: the second finds it gone, which is the outcome it wanted
    (prometheus-client's ``mark_process_dead`` raises then, and the scrape would be a 500). Its
    collector already skips a live gauge file removed between its listing and its read."""
    for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        found = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(path))
        if found and not pid_alive(int(found.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

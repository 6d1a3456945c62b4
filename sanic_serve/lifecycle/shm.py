"""Shared-memory segments a killed server left behind, found and removed by the next start.

hfserve's own rings and status block live in anonymous shared memory that the kernel frees with
the last process, but libraries may create named segments in ``/dev/shm`` (POSIX semaphores of
multiprocessing locks, ``shared_memory`` blocks); a tree killed with SIGKILL (its resource tracker
with it) leaves those behind until reboot. So the main process keeps a record, in
``<cache>/run/``, of the named segments its processes map (read from ``/proc/<pid>/maps``), and
each start removes the segments of records whose server is gone. Only what a dead server's own
processes mapped is ever removed. Linux only; elsewhere every call does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from model_host.ipc.system import cache_dir

log = logging.getLogger("hfserve")

SHM_DIR = "/dev/shm/"
RECORD_INTERVAL_S = 5.0


def run_dir() -> Path:
    """Where records go: ``run`` in the cache folder (``~/.cache/hfserve/run`` by default)."""
    return cache_dir() / "run"


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def tree_pids(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [root], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def mapped_segments(pids: list[int]) -> set[str]:
    """Named files under /dev/shm that these processes map (an unlinked one is no leftover)."""
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith(SHM_DIR):
                        path = fields[5].rstrip("\n")
                        if not path.endswith(" (deleted)"):
                            found.add(path)
        except OSError:
            continue
    return found


class Recorder:
    """Keeps this server's record up to date; called from the supervisor's loop."""

    def __init__(self, directory: Path | None = None, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.enabled = os.path.isdir(SHM_DIR) and os.path.isdir("/proc")
        self.path = (directory or run_dir()) / f"{self.pid}.json"
        self._known: set[str] = set()
        self._next_s = 0.0

    def maybe_record(self) -> None:
        now = time.monotonic()
        if not self.enabled or now < self._next_s:
            return
        self._next_s = now + RECORD_INTERVAL_S
        try:
            self.record()
        except Exception:  # runs in the supervisor's thread, which must go on
            log.exception("recording shared memory segments failed; no longer recording")
            self.enabled = False

    def record(self) -> None:
        # Segments seen once stay listed: a process may unmap one that still exists.
        segments = self._known | mapped_segments(tree_pids(self.pid))
        if segments == self._known:
            return
        self._known = segments
        record = {"pid": self.pid, "start_ticks": start_ticks(self.pid), "segments": sorted(segments)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot record shared memory segments in %s: %s", self.path.parent, exc)
            self.enabled = False

    def remove(self) -> None:
        """A clean stop: every segment went with its owner."""
        self.path.unlink(missing_ok=True)


def sweep(directory: Path | None = None) -> list[str]:
    """Remove the segments recorded by servers that are no longer running, and their records.
    Returns the segments removed."""
    folder = directory or run_dir()
    if not folder.is_dir():
        return []
    removed: list[str] = []
    for path in folder.glob("*.json"):
        try:
            record = json.loads(path.read_text())
            pid, ticks, segments = int(record["pid"]), record["start_ticks"], list(record["segments"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ticks is not None and start_ticks(pid) == ticks:
            continue  # that server still runs
        gone: list[str] = []
        for segment in segments:
            if not segment.startswith(SHM_DIR) or "/" in segment[len(SHM_DIR) :]:
                continue  # a record is data, never a path to delete just anything
            try:
                if os.stat(segment).st_uid == os.getuid():
                    os.unlink(segment)
                    gone.append(segment)
            except OSError:
                continue
        path.unlink(missing_ok=True)
        if gone:
            log.warning(
                "removed %d shared-memory segment(s) left by a server that was killed (pid %d): %s",
                len(gone),
                pid,
                ", ".join(gone),
            )
        removed += gone
    return removed

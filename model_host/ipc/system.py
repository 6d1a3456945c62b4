"""Two facts about this machine that the main process, the workers and the model host all need,
written once: whether a process lives, and where hfserve's cache folder is. No torch, nothing from
the rest of ``model_host``: the workers import this."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts: its parent has not reaped it yet)."""
    if pid <= 0:  # 0 and negatives address process groups, never one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def cache_dir(env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """hfserve's cache folder: ``$HFSERVE_CACHE``, else ``$XDG_CACHE_HOME/hfserve``, else
    ``~/.cache/hfserve`` (``home`` stands for ``~``: the account a service will run as)."""
    env = os.environ if env is None else env
    if env.get("HFSERVE_CACHE"):
        return Path(env["HFSERVE_CACHE"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "hfserve"
    return (home or Path(os.path.expanduser("~"))) / ".cache" / "hfserve"

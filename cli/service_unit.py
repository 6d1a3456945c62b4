"""The systemd unit that ``hfserve service install`` writes: pure text from a few settings, so it can
be printed (``--dry-run``), checked by ``systemd-analyze verify`` and tested without systemd.

Choices, and why:

* ``Type=notify``: the server says ``READY=1`` only once its workers listen and the model host has
  loaded its model, so units ordered after this one start when it can really serve.
* ``KillMode=mixed``: the stop signal goes to the main process alone, which drains (requests in
  flight finish, new ones get 503) and then stops its children; a SIGTERM to every process at once
  would stop the model host under the requests it is serving. Whatever is left when
  ``TimeoutStopSec`` (the drain timeout plus a margin) runs out gets SIGKILL.
* ``WatchdogSec``: the server pings only while the model host's heartbeat is fresh, so a hung host
  gets the service restarted (``Restart=on-failure``).
* Secrets (``HFSERVE_API_KEY``, ``HF_TOKEN``) live in the ``EnvironmentFile``, never in the unit,
  which is world-readable.
* ``RestartPreventExitStatus=78`` with ``HFSERVE_CONFIG_ERROR_EXIT=78``: under the unit, ``hfserve
  start`` exits 78 (EX_CONFIG) for settings it cannot start with (a bad option value, a missing
  model, a port in use, a model the host cannot load; 1 when a person runs it): restarting would
  fail the same way every ``RestartSec``.
* Hardening that leaves a GPU usable: no ``PrivateDevices`` (it hides ``/dev/nvidia*``), no
  ``MemoryDenyWriteExecute`` (CUDA and Triton compile code at run time), and ``ReadWritePaths`` for
  the kernel caches CUDA and Triton write (``~/.nv``, ``~/.triton``) besides the model caches and
  the stored responses' folder. No ``ProtectKernelModules``: of no use to a service that is not
  root, and in the way of a driver set-up that loads the NVIDIA modules on first use (under
  ``NoNewPrivileges`` the setuid ``nvidia-modprobe`` cannot do that either: load them at boot).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model_host.ipc.settings import CONFIG_ERROR_EXIT_ENV
from model_host.ipc.system import cache_dir

# Variables worth carrying from the shell that installs the unit into the service (systemd starts
# services with an almost empty environment). None of them is a secret.
PASSED_ENV = (
    "HFSERVE_CACHE",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
)
# Variables that must never be written into a unit.
SECRET_ENV = ("HFSERVE_API_KEY", "HF_TOKEN", "OPENAI_API_KEY")
DEFAULT_DRAIN_TIMEOUT_S = 30.0
EX_CONFIG = 78  # sysexits.h: what the unit asks ``hfserve start`` to exit with for a settings error
STOP_MARGIN_S = 30  # past the drain: the host and workers stopping, the last bytes going out


@dataclass(frozen=True)
class UnitSettings:
    exec_start: Sequence[str]  # the command, interpreter first
    system: bool = False  # a system unit (else a user unit)
    run_as: str | None = None  # User= of a system unit
    environment_file: str = "-%h/.config/hfserve/hfserve.env"
    writable_paths: Sequence[str] = ()  # ProtectSystem=strict makes everything else read-only
    environment: Mapping[str, str] = field(default_factory=dict)
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    watchdog_s: int = 30
    start_timeout_s: int = 900  # a large model's first download and load take minutes
    description: str = "hfserve: OpenAI-compatible server for Hugging Face transformers models"


def option_value(args: Sequence[str], name: str) -> str | None:
    """The value of option ``name`` among ``hfserve start`` arguments (``--x V`` or ``--x=V``; the
    last one wins, as for the command itself), or None."""
    found: str | None = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def drain_timeout_of(args: Sequence[str]) -> float:
    """``--drain-timeout-s`` among the ``hfserve start`` arguments, or its default."""
    value = option_value(args, "--drain-timeout-s")
    if value is None:
        return DEFAULT_DRAIN_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--drain-timeout-s {value!r} is not a number") from None


def quote_exec_arg(arg: str, dollars: bool = True) -> str:
    """One word of a unit setting, taken literally: specifiers (``%``) and, in ExecStart=, variables
    (``$``) escaped; quoted when it holds spaces, quotes or backslashes."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if dollars:
        escaped = escaped.replace("$", "$$")
    if not escaped or any(c.isspace() or c in "'\";\\" for c in arg):
        return f'"{escaped}"'
    return escaped


def render_unit(s: UnitSettings) -> str:
    stop_timeout_s = int(s.drain_timeout_s) + STOP_MARGIN_S
    lines = [
        "# Written by `hfserve service install`; `hfserve service uninstall` removes it.",
        "[Unit]",
        f"Description={s.description}",
    ]
    if s.system:  # a user manager has no network-online.target
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(quote_exec_arg(a) for a in s.exec_start),
    ]
    if s.system and s.run_as:
        lines.append(f"User={s.run_as}")
    lines.append("Environment=PYTHONUNBUFFERED=1")
    lines.append(f"Environment={CONFIG_ERROR_EXIT_ENV}={EX_CONFIG}")
    for key, value in sorted(s.environment.items()):
        lines.append(f"Environment={quote_exec_arg(f'{key}={value}', dollars=False)}")
    lines += [
        f"EnvironmentFile={s.environment_file}",
        "Restart=on-failure",
        "RestartSec=5",
        f"RestartPreventExitStatus={EX_CONFIG}",
        f"WatchdogSec={s.watchdog_s}",
        f"TimeoutStartSec={s.start_timeout_s}",
        f"TimeoutStopSec={stop_timeout_s}",
        "KillMode=mixed",
        "SyslogIdentifier=hfserve",
        "# Hardening that leaves a GPU usable (no PrivateDevices, no MemoryDenyWriteExecute).",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ]
    if s.writable_paths:
        # '-': a folder that does not exist yet is no reason to fail the start.
        paths = (quote_exec_arg(f"-{p}", dollars=False) for p in s.writable_paths)
        lines.append("ReadWritePaths=" + " ".join(paths))
    lines += [
        "PrivateTmp=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if s.system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def writable_dirs(env: Mapping[str, str], home: Path, responses_db: str | None = None) -> list[str]:
    """The folders the server writes: hfserve's cache, the Hugging Face cache, the kernel caches of
    CUDA (``~/.nv/ComputeCache``) and Triton (``~/.triton``), and the stored responses' folder when
    ``--responses-db`` puts it elsewhere. ``home``: that of the account the service runs as, written
    out rather than ``%h``, which in a system unit is root's home whatever ``User=`` says."""
    xdg_cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache"
    dirs = [str(cache_dir(env, home)), env.get("HF_HOME") or str(xdg_cache / "huggingface")]
    if env.get("HF_HUB_CACHE"):
        dirs.append(env["HF_HUB_CACHE"])
    dirs += [str(home / ".nv"), str(home / ".triton")]
    if responses_db:
        dirs.append(os.path.dirname(os.path.abspath(responses_db)))
    out: list[str] = []
    for d in map(os.path.abspath, dirs):
        if d not in out:
            out.append(d)
    return out

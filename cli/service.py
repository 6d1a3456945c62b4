"""``hfserve service install | uninstall | status``: hfserve as a systemd service.

``install`` writes the unit (``cli.service_unit``) for the current interpreter's ``hfserve start``
with the options given after ``--``, creates the environment file for secrets if there is none, and
reloads systemd; ``--dry-run`` prints the unit and touches nothing.
"""

from __future__ import annotations

import getpass
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import typer

from cli.errors import fail
from cli.service_unit import (
    PASSED_ENV,
    UnitSettings,
    drain_timeout_of,
    option_value,
    render_unit,
    writable_dirs,
)

service_app = typer.Typer(
    help="Run hfserve as a systemd service (a user service by default).", no_args_is_help=True
)

_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
# `hfserve start` options that take a file or folder.
PATH_OPTIONS = frozenset({"--model", "--api-key-file", "--responses-db", "--mcp-config", "--media-root"})
ENV_FILE_TEMPLATE = """\
# Environment of the {name} service, read by systemd when it starts the service (mode 0600:
# it holds secrets). One VAR=value per line. For example:
# HFSERVE_API_KEY=a-long-random-key
# HF_TOKEN=hf_...
"""


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        fail(f"--name {name!r}: use letters, digits and . _ @ - only")


def _config_home(system: bool) -> Path:
    if system:
        return Path("/etc")
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def unit_path(name: str, system: bool) -> Path:
    base = Path("/etc/systemd/system") if system else _config_home(False) / "systemd" / "user"
    return base / f"{name}.service"


def env_file_path(name: str, system: bool) -> Path:
    return _config_home(system) / "hfserve" / f"{name}.env"


def _systemctl(system: bool, *args: str) -> list[str]:
    return ["systemctl", *([] if system else ["--user"]), *args]


def _run_as(system: bool, user: str | None) -> tuple[str | None, Path]:
    """The account the service runs as and its home (for the cache folders)."""
    if not system:
        return None, Path.home()
    name = user or os.environ.get("SUDO_USER") or getpass.getuser()
    try:
        return name, Path(pwd.getpwnam(name).pw_dir)
    except KeyError:
        fail(f"--run-as {name!r}: no such user")


def build_unit(name: str, system: bool, run_as: str | None, start_args: list[str]) -> str:
    for arg in start_args:
        if arg == "--api-key" or arg.startswith("--api-key="):
            fail(
                "--api-key would write the key into the unit, which every local user can read: put "
                f"HFSERVE_API_KEY=... in {env_file_path(name, system)} instead (or use --api-key-file)"
            )
    try:
        drain_timeout_s = drain_timeout_of(start_args)
    except ValueError as exc:
        fail(str(exc))
    user, home = _run_as(system, run_as)
    env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    start_args = absolute_paths(start_args)
    settings = UnitSettings(
        # -P: the service's working directory never shadows the installed package.
        exec_start=[sys.executable, "-P", "-m", "cli.main", "start", *start_args],
        system=system,
        run_as=user,
        # %E: $XDG_CONFIG_HOME in a user manager, /etc in the system one; '-': the file is optional.
        environment_file=f"-%E/hfserve/{name}.env",
        writable_paths=writable_dirs(os.environ, home, option_value(start_args, "--responses-db")),
        environment=env,
        drain_timeout_s=drain_timeout_s,
    )
    return render_unit(settings)


def absolute_paths(args: list[str]) -> list[str]:
    """The start options with relative paths made absolute: the service does not run in the
    directory it was installed from."""
    out = list(args)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name not in PATH_OPTIONS:
            continue
        # A --model that is no folder here is a Hub id; every other path may not exist yet (a new
        # --responses-db) and is a path all the same.
        if eq and (name != "--model" or os.path.exists(value)):
            out[i] = f"{name}={os.path.abspath(value)}"
        elif not eq and i + 1 < len(out) and (name != "--model" or os.path.exists(out[i + 1])):
            out[i + 1] = os.path.abspath(out[i + 1])
    return out


_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


@service_app.command(context_settings=_EXTRA)
def install(
    ctx: typer.Context,
    name: str = typer.Option("hfserve", help="The unit's name."),
    system: bool = typer.Option(False, "--system", help="A system-wide unit (needs root), not a user unit."),
    run_as: str | None = typer.Option(
        None, help="With --system: the account to run as (default: the one that ran sudo)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the unit; write nothing."),
    now: bool = typer.Option(False, "--now", help="Enable and start the service too."),
) -> None:
    """Write a systemd unit that runs `hfserve start` with the options after `--`, e.g.
    `hfserve service install -- --model Qwen/Qwen3-0.6B --workers 4`."""
    _check_name(name)
    unit = build_unit(name, system, run_as, list(ctx.args))
    if dry_run:
        typer.echo(unit, nl=False)
        return
    path = unit_path(name, system)
    env_file = env_file_path(name, system)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(unit)
        if not env_file.exists():
            env_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(ENV_FILE_TEMPLATE.format(name=name))
    except PermissionError as exc:
        why = "run it with sudo" if system else exc.strerror
        fail(f"cannot write {exc.filename}: {why}")
    typer.echo(f"wrote {path}")
    typer.echo(f"secrets (HFSERVE_API_KEY, HF_TOKEN) go in {env_file}")
    ok = _call(system, "daemon-reload")
    if ok and now:
        ok = _call(system, "enable", "--now", name)
    user = "" if system else "--user "
    if not now or not ok:
        typer.echo(f"start it:  systemctl {user}enable --now {name}")
    typer.echo(f"its log:   journalctl {user}-u {name} -f")
    if not system:
        typer.echo(f"to keep it running after you log out: loginctl enable-linger {getpass.getuser()}")


@service_app.command()
def uninstall(
    name: str = typer.Option("hfserve", help="The unit's name."),
    system: bool = typer.Option(False, "--system", help="The system-wide unit, not the user unit."),
) -> None:
    """Stop and disable the service and remove its unit (the environment file is kept)."""
    _check_name(name)
    path = unit_path(name, system)
    if not path.exists():
        fail(f"no unit at {path}")
    _call(system, "disable", "--now", name)
    try:
        path.unlink()
    except PermissionError as exc:
        fail(f"cannot remove {path}: {'run it with sudo' if system else exc.strerror}")
    _call(system, "daemon-reload")
    typer.echo(f"removed {path}")
    env_file = env_file_path(name, system)
    if env_file.exists():
        typer.echo(f"kept {env_file} (it may hold secrets: remove it yourself when done)")


@service_app.command()
def status(
    name: str = typer.Option("hfserve", help="The unit's name."),
    system: bool = typer.Option(False, "--system", help="The system-wide unit, not the user unit."),
) -> None:
    """What systemd says about the service (systemctl status)."""
    _check_name(name)
    path = unit_path(name, system)
    typer.echo(f"unit: {path}{'' if path.exists() else ' (not installed)'}")
    if shutil.which("systemctl") is None:
        fail("systemctl not found: is this a systemd machine?")
    code = subprocess.run(_systemctl(system, "status", "--no-pager", name)).returncode
    raise typer.Exit(code)


def _call(system: bool, *args: str) -> bool:
    """Run a systemctl command; a machine without a usable systemd gets a warning, not a failure
    (the unit is written; what to run is printed)."""
    cmd = _systemctl(system, *args)
    if shutil.which("systemctl") is None:
        typer.echo(f"warning: systemctl not found; run `{' '.join(cmd)}` on the machine that runs systemd")
        return False
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        typer.echo(f"warning: `{' '.join(cmd)}` failed: {proc.stdout.strip()}", err=True)
        return False
    return True

"""How the command line fails: one ``error: ...`` line on stderr, no traceback, and an exit status.

``hfserve start`` exits ``EX_CONFIG`` (78, sysexits.h) for anything a restart would only repeat: an
option it cannot use, a model it cannot find or load, a port in use. The service unit tells systemd
not to restart on that status (``RestartPreventExitStatus``). Every other failure is 1."""

from __future__ import annotations

from typing import NoReturn

import typer

from model_host.ipc.settings import HOST_CONFIG_ERROR_EXIT

EX_CONFIG = HOST_CONFIG_ERROR_EXIT  # the host's own "cannot start with these settings", the same 78


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and exit ``code``: what the user must change, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)

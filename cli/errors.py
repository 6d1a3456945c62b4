"""How the command line fails: one ``error: ...`` line on stderr, no traceback, and an exit status.

Every failure exits 1, settings errors of ``hfserve start`` included (an option it cannot use, a model
it cannot find or load, a port in use). Under a service manager those must differ from a crash: the
systemd unit sets ``HFSERVE_CONFIG_ERROR_EXIT=78`` (``EX_CONFIG``, sysexits.h) and tells systemd not to
restart on that status (``RestartPreventExitStatus``); see ``config_error_exit``."""

from __future__ import annotations

from typing import NoReturn

import typer

from model_host.ipc.settings import config_error_exit

__all__ = ["config_error_exit", "fail"]


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and exit ``code``: what the user must change, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)

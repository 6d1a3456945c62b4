"""``hfserve start``: run the main process, one model host and N HTTP workers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

from sanic import Sanic
from sanic.worker.loader import AppLoader

from cli.preflight import ConfigError, check_model_folder
from model_host.main import run_host
from sanic_serve.app import create_app
from sanic_serve.config import ServerConfig
from sanic_serve.lifecycle.protocol import ServerProtocol

log = logging.getLogger("hfserve")

DEMO_MODEL_ID = "hfserve-demo"


class DemoModelError(ConfigError):
    pass


def build_demo_model(cache_dir: Path | None = None) -> Path:
    """The demo model: the copy shipped in the package, or (when that copy is stale) one trained
    in a child process, keeping torch out of the main process."""
    from model_host.demo.build import packaged_demo_model

    shipped = packaged_demo_model()
    if shipped is not None:
        return shipped
    log.warning("training the demo model (once; it is cached afterwards)...")
    cmd = [sys.executable, "-m", "model_host.demo"] + ([str(cache_dir)] if cache_dir else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise DemoModelError("building the demo model failed (see the log above)")
    return Path(proc.stdout.strip().splitlines()[-1])


def serve(config: ServerConfig) -> int:
    """Run until stopped; returns the exit code (1 when the model host could not start)."""
    loader = AppLoader(factory=partial(create_app, config, run_host))
    app = loader.load()
    app.prepare(
        host=config.host,
        port=config.port,
        workers=config.workers,
        access_log=config.log_level.upper() == "DEBUG",
        motd=False,
        single_process=False,
        # The head deadline (Sanic's own request timeout restarts with every byte) and the count of
        # requests in flight that a drain waits for.
        protocol=ServerProtocol,
    )
    # Sanic's shared-state manager process is started first thing in serve() and inherits ignored
    # signals: a SIGTERM sent to the whole process group (systemd's default, `timeout`, `kill -- -PGID`)
    # must not kill it under the main process, which needs it to shut down cleanly. (It ignores
    # SIGINT by itself.) The main process gets its own handlers back once every process is set up.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Sanic.serve(primary=app, app_loader=loader)
    return int(getattr(app.ctx, "exit_code", 0))


def check_responses_db(path: Path | None, max_mb: float) -> Path:
    """The stored responses' SQLite file (``--responses-db``, else ``responses.sqlite3`` in the cache
    folder), opened once here: a path that cannot hold it is one error line, and the file is made
    (and brought under a lowered bound) before the workers open it together."""
    from model_host.demo.build import default_cache_dir
    from sanic_serve.responses.store import ResponseStore, StoreError

    path = path or default_cache_dir() / "responses.sqlite3"
    try:
        ResponseStore(path, max_bytes=int(max_mb * 1024 * 1024)).close()
    except StoreError as exc:
        raise ConfigError(str(exc)) from exc
    return path


def resolve_model_arg(model: str | None) -> tuple[str, str, bool]:
    """(model id, local folder, pinned) for ``--model`` or the demo model."""
    if model is None:
        path = build_demo_model()
        log.warning(
            "No --model given: serving the built-in demo model `%s`, a tiny toy trained in "
            "seconds on a fixed corpus (greetings, weather and sum tool calls). Use --model for "
            "a real model.",
            DEMO_MODEL_ID,
        )
        return DEMO_MODEL_ID, str(path), False
    if os.path.isdir(model):
        check_model_folder(Path(model))
        return model, str(Path(model).resolve()), True
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model folder {model} does not exist")
    from sanic_serve.models import ModelNotFound, _locate

    try:
        folder = _locate(model)
    except ModelNotFound as exc:
        raise DemoModelError(f"model {model!r} not found locally or on the Hub") from exc
    check_model_folder(folder, weights=False)  # the host downloads the weights
    return model, str(folder), True

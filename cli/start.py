"""``hfserve start``: run the main process, one model host and N HTTP workers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

from sanic import Sanic
from sanic.worker.loader import AppLoader

from sanic_serve.app import create_app
from sanic_serve.config import ServerConfig

log = logging.getLogger("hfserve")

DEMO_MODEL_ID = "hfserve-demo"


class DemoModelError(RuntimeError):
    pass


def build_demo_model(cache_dir: Path | None = None) -> Path:
    """Build or find the demo model in a child process, keeping torch out of the main process."""
    cmd = [sys.executable, "-m", "model_host.demo"] + ([str(cache_dir)] if cache_dir else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise DemoModelError("building the demo model failed (see the log above)")
    return Path(proc.stdout.strip().splitlines()[-1])


def serve(config: ServerConfig) -> None:
    loader = AppLoader(factory=partial(create_app, config))
    app = loader.load()
    app.prepare(
        host=config.host,
        port=config.port,
        workers=config.workers,
        access_log=config.log_level.upper() == "DEBUG",
        motd=False,
        single_process=False,
    )
    Sanic.serve(primary=app, app_loader=loader)


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
        return model, str(Path(model).resolve()), True
    from sanic_serve.models import ModelNotFound, _locate

    try:
        return model, str(_locate(model)), True
    except ModelNotFound as exc:
        raise DemoModelError(f"model {model!r} not found locally or on the Hub") from exc

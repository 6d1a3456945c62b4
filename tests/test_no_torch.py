"""The HTTP side must never import torch: workers stay small."""

from __future__ import annotations

import subprocess
import sys


def test_importing_http_side_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import sanic_serve.app, sanic_serve.chat.route, sanic_serve.chat.prompt\n"
        "import model_host.ipc, model_host.main, cli.start\n"
        "from sanic_serve.app import create_app\n"
        "from sanic_serve.config import ServerConfig\n"
        "create_app(ServerConfig())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'transformers.models' not in sys.modules\n"
        "import torch\n"
        "assert 'torch' in sys.modules\n"  # the check can fail
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

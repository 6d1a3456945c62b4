"""A model host that hangs without freezing (its loop stuck in a forward pass that never returns,
as in a deadlock or a hung CUDA call, while its other threads run on) stops its heartbeat: /health
says 503 and systemd's watchdog pings stop; when the loop moves again, both come back."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.test_service import _wait, notify_server

# The demo model (a Qwen2) with a forward pass that waits while a file named HANG is in the model's
# folder: the test decides when the loop is stuck, with no hook in the server.
HANGING_MODELING = """
import os
import time

from transformers import Qwen2ForCausalLM


class HangingQwen2ForCausalLM(Qwen2ForCausalLM):
    def forward(self, *args, **kwargs):
        marker = os.path.join(self.config._name_or_path, "HANG")
        while os.path.exists(marker):
            time.sleep(0.05)
        return super().forward(*args, **kwargs)
"""


def hanging_model(demo_model: Path, dst: Path) -> Path:
    shutil.copytree(demo_model, dst)
    (dst / "modeling_hanging.py").write_text(HANGING_MODELING)
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_hanging.HangingQwen2ForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_host_stuck_in_its_loop_stops_the_heartbeat(
    cache_dir: Path, demo_model: Path, tmp_path: Path
) -> None:
    model = hanging_model(demo_model, tmp_path / "hanging")
    env = {"HFSERVE_HOST_STALL_S": "2", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    args = ("--model", str(model), "--trust-remote-code")
    with notify_server(cache_dir, workers=1, args=args, env=env, model=str(model)) as (srv, listener):
        _wait(lambda: listener.ready_check is not None, 240, "READY=1")
        assert listener.ready_check is not None and listener.ready_check[0] == 200
        _wait(lambda: len(listener.lines("WATCHDOG=1")) >= 2, 10, "watchdog pings")

        (model / "HANG").touch()
        answer: dict[str, httpx.Response] = {}

        def ask() -> None:
            body = {"model": str(model), "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
            answer["r"] = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=120)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        # Stall allowance 2 s, then the workers' 3 s heartbeat threshold; generous for a busy machine.
        _wait(lambda: srv.health().status_code == 503, 60, "/health 503 with the loop stuck")
        (host,) = srv.titled("hfserve: model-host")
        assert host.status() != psutil.STATUS_STOPPED  # hung, not frozen: its threads still run
        assert srv.health().json()["status"] != "draining"
        unhealthy_at = time.monotonic()
        time.sleep(3.0)
        late = [t for t, _ in listener.lines("WATCHDOG=1") if t > unhealthy_at]
        assert late == [], f"watchdog pings while the host's loop was stuck: {late}"
        assert srv.health().status_code == 503
        # The request the host is stuck on fails with an OpenAI error, not a hang.
        asker.join(60)
        assert answer["r"].status_code == 503, answer["r"].text
        assert answer["r"].json()["error"]["code"] == "engine_unavailable"
        assert "loop has not moved for 2 s" in srv.log_text()

        (model / "HANG").unlink()
        moved_at = time.monotonic()
        _wait(lambda: srv.health().status_code == 200, 60, "/health 200 once the loop moves")
        _wait(lambda: any(t > moved_at for t, _ in listener.lines("WATCHDOG=1")), 10, "pings again")
        assert srv.stop(signal.SIGTERM) == 0

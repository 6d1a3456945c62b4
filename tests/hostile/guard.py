"""What must survive hostile input: the greedy reference reply and every server process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import psutil

from tests.hostile.cases import CHAT, MODEL
from tests.server import ServerProcess

REFERENCE_PROMPT = "Hello!"
REFERENCE_REPLY = "Hello! How can I help you today?"


def reference_reply(base_url: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": REFERENCE_PROMPT}], "temperature": 0}
    resp = httpx.post(f"{base_url}{CHAT}", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


@dataclass
class Guard:
    """What must not change under hostile input: the greedy reply and every server process."""

    server: ServerProcess
    processes: dict[int, float]  # pid -> create time
    host_pid: int

    @classmethod
    def of(cls, server: ServerProcess) -> Guard:
        assert reference_reply(server.base_url) == REFERENCE_REPLY
        procs = {p.pid: p.create_time() for p in server.processes()}
        return cls(server, procs, int(server.host_status()["pid"]))

    def check(self) -> None:
        assert self.server.proc.poll() is None, "the main process exited"
        assert self.server.health().status_code == 200
        assert reference_reply(self.server.base_url) == REFERENCE_REPLY
        for pid, created in self.processes.items():
            try:
                proc = psutil.Process(pid)
                alive = proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            assert alive, f"server process {pid} died or was replaced"
        assert int(self.server.host_status()["pid"]) == self.host_pid


BURST_TOKENS = 300  # long enough that the burst arrives while the first ones still run


async def burst_one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, Any]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"burst {i}"}],
        "max_tokens": BURST_TOKENS,
        "ignore_eos": True,
        "stream": i % 2 == 1,
    }
    resp = await client.post(CHAT, json=body)
    if resp.status_code == 200 and body["stream"]:
        return 200, None, resp.text
    return resp.status_code, resp.headers.get("retry-after"), resp.json()

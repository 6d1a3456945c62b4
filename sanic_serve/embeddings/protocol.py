"""``POST /v1/embeddings``: OpenAI's ``CreateEmbeddingRequest``, its tokens, and the response.

``input`` is a string, a list of strings, a list of token ids, or a list of token-id lists (at most
2048 inputs, none empty). Text is tokenized here with the model's ``tokenizer.json`` and its special
tokens (``[CLS] ... [SEP]``); token ids are the model's input as given, special tokens included (as
vLLM and ``/v1/completions`` take them). An input longer than the model's limit is a 400
(``context_length_exceeded``) unless ``truncate_prompt_tokens`` (a vLLM extension: a token count,
or -1 for the model's limit) asks to cut it. ``dimensions`` cuts a Matryoshka model's vectors
(renormalised when the model normalises); other models refuse it. ``encoding_format: base64`` is
the little-endian float32 bytes that OpenAI's SDK decodes.
"""

from __future__ import annotations

import base64
import logging
import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tokenizers import Tokenizer

from sanic_serve.embeddings.spec import EmbeddingSpec
from sanic_serve.errors import InvalidRequest

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # as OpenAI
_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens"})
_warned_extras: set[str] = set()

EncodingFormat = Literal["float", "base64"]


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: list[str] | list[list[int]]  # all texts or all token-id lists
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None  # -1: the model's limit
    user: str | None = None

    @property
    def is_text(self) -> bool:
        return bool(self.inputs) and isinstance(self.inputs[0], str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a token id


def _invalid_type(param: str, expected: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}.", param=param, code="invalid_type"
    )


def _parse_input(value: Any) -> list[str] | list[list[int]]:
    expected = "a string, an array of strings, an array of token ids or an array of token-id arrays"
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' cannot be an empty string.", param="input", code="invalid_value")
        return [value]
    if not isinstance(value, list):
        raise _invalid_type("input", expected)
    if not value:
        raise InvalidRequest("'input' cannot be an empty array.", param="input", code="invalid_value")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(
            f"'input' has {len(value)} items; at most {MAX_INPUTS} are allowed.",
            param="input",
            code="invalid_value",
        )
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            index = next(i for i, v in enumerate(value) if not v)
            raise InvalidRequest(
                f"'input[{index}]' cannot be an empty string.", param="input", code="invalid_value"
            )
        return list(value)
    if all(_is_int(v) for v in value):
        return [list(value)]
    if all(isinstance(v, list) for v in value):
        for i, ids in enumerate(value):
            if not ids:
                raise InvalidRequest(
                    f"'input[{i}]' cannot be an empty array.", param="input", code="invalid_value"
                )
            if not all(_is_int(t) for t in ids):
                raise _invalid_type("input", "token-id arrays to hold integers only")
        return [list(ids) for ids in value]
    raise _invalid_type("input", expected)


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise _invalid_type(name, "an integer")
    return int(value)


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    """Validate a JSON body; every refusal is an :class:`InvalidRequest` naming its field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise InvalidRequest(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str) or not model:
        raise _invalid_type("model", "a non-empty string")
    if "input" not in body:
        raise InvalidRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    inputs = _parse_input(body["input"])
    encoding_format: EncodingFormat = "float"
    if body.get("encoding_format") == "base64":
        encoding_format = "base64"
    elif body.get("encoding_format") not in (None, "float"):
        raise InvalidRequest(
            f"Invalid value for 'encoding_format': {body['encoding_format']!r}; use 'float' or 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )
    dimensions = _optional_int(body, "dimensions")
    if dimensions is not None and dimensions < 1:
        raise InvalidRequest("'dimensions' must be at least 1.", param="dimensions", code="invalid_value")
    truncate = _optional_int(body, "truncate_prompt_tokens")
    if truncate is not None and truncate < 1 and truncate != -1:
        raise InvalidRequest(
            "'truncate_prompt_tokens' must be a positive token count, or -1 for the model's limit.",
            param="truncate_prompt_tokens",
            code="invalid_value",
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid_type("user", "a string")
    for name in body.keys() - _FIELDS:
        if name not in _warned_extras:
            _warned_extras.add(name)
            log.warning("ignoring unknown embeddings request field %r", name)
    return EmbeddingRequest(model, inputs, encoding_format, dimensions, truncate, user)


def check_dimensions(req: EmbeddingRequest, spec: EmbeddingSpec, model_id: str) -> None:
    """``dimensions`` is for Matryoshka models only, and only at the sizes they were trained for."""
    if req.dimensions is None:
        return
    if spec.matryoshka_dims is None:
        raise InvalidRequest(
            f"The model `{model_id}` does not support 'dimensions': it is not a Matryoshka model, "
            "so shortened vectors would lose meaning.",
            param="dimensions",
            code="unsupported_value",
        )
    if req.dimensions not in spec.matryoshka_dims:
        sizes = ", ".join(str(d) for d in spec.matryoshka_dims)
        raise InvalidRequest(
            f"The model `{model_id}` supports 'dimensions' of {sizes}, not {req.dimensions}.",
            param="dimensions",
            code="unsupported_value",
        )


def _limit(req: EmbeddingRequest, spec: EmbeddingSpec, tokenizer: Tokenizer) -> int | None:
    """The token count inputs are cut to, or None when the request does not ask to cut."""
    if req.truncate_prompt_tokens is None:
        return None
    if req.truncate_prompt_tokens == -1:
        return spec.max_tokens
    if req.truncate_prompt_tokens > spec.max_tokens:
        raise InvalidRequest(
            f"'truncate_prompt_tokens' is {req.truncate_prompt_tokens}, more than the model's limit of "
            f"{spec.max_tokens} tokens.",
            param="truncate_prompt_tokens",
            code="invalid_value",
        )
    specials = tokenizer.num_special_tokens_to_add(False)
    if req.is_text and req.truncate_prompt_tokens < specials:
        raise InvalidRequest(
            f"'truncate_prompt_tokens' must be at least {specials} for this model: its special tokens.",
            param="truncate_prompt_tokens",
            code="invalid_value",
        )
    return req.truncate_prompt_tokens


def tokenize_inputs(
    req: EmbeddingRequest, spec: EmbeddingSpec, tokenizer: Tokenizer, model_id: str
) -> list[list[int]]:
    """Each input's token ids with the special tokens, cut or refused by the model's limit.

    ``tokenizer`` comes from :func:`sanic_serve.embeddings.spec.load_embedding_tokenizer` (no
    truncation or padding of its own)."""
    check_dimensions(req, spec, model_id)
    limit = _limit(req, spec, tokenizer)
    if req.is_text:
        texts = [t for t in req.inputs if isinstance(t, str)]
        specials = tokenizer.num_special_tokens_to_add(False)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        batch: list[list[int]] = []
        for enc in encodings:
            # Cutting the content before adding the special tokens keeps them, as the tokenizer's
            # own truncation (and sentence-transformers' max_seq_length) does.
            if limit is not None and len(enc.ids) + specials > limit:
                enc.truncate(limit - specials, direction=spec.truncation_side)
            batch.append(list(tokenizer.post_process(enc).ids))
    else:
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        batch = [list(ids) for ids in req.inputs if isinstance(ids, list)]
        for i, ids in enumerate(batch):
            if not all(0 <= t < vocab for t in ids):
                raise InvalidRequest(
                    f"'input[{i}]' has token ids outside the model's vocabulary [0, {vocab}).",
                    param="input",
                    code="invalid_value",
                )
            if limit is not None and len(ids) > limit:
                batch[i] = ids[-limit:] if spec.truncation_side == "left" else ids[:limit]
    for i, ids in enumerate(batch):
        if len(ids) > spec.max_tokens:
            raise InvalidRequest(
                f"'input[{i}]' has {len(ids)} tokens; the model `{model_id}` takes at most "
                f"{spec.max_tokens}. Shorten it, or set truncate_prompt_tokens to cut it.",
                param="input",
                code="context_length_exceeded",
            )
    return batch


def _float32(vector: Sequence[float] | bytes | memoryview) -> array[float]:
    if isinstance(vector, bytes | memoryview):
        values = array("f")
        values.frombytes(vector)
        if sys.byteorder == "big":  # the bytes are little-endian float32
            values.byteswap()
        return values
    return array("f", vector)


def embedding_value(
    vector: Sequence[float] | bytes | memoryview,
    encoding_format: EncodingFormat,
    dimensions: int | None = None,
    normalizes: bool = False,
) -> list[float] | str:
    """One vector as the response carries it: cut to ``dimensions`` (and brought back to unit norm
    when the model's vectors have it), then float32 values or their base64 bytes.

    A float is the exact value of its float32, so the two encodings decode to the same numbers."""
    values = _float32(vector)
    if dimensions is not None and dimensions < len(values):
        values = values[:dimensions]
        if normalizes:
            norm = math.sqrt(math.fsum(x * x for x in values))
            if norm > 0.0:
                values = array("f", (x / norm for x in values))
    if encoding_format == "float":
        return values.tolist()
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def embedding_response(
    req: EmbeddingRequest,
    spec: EmbeddingSpec,
    model_id: str,
    vectors: Sequence[Sequence[float] | bytes | memoryview],
    prompt_tokens: int,
) -> dict[str, Any]:
    """OpenAI's ``CreateEmbeddingResponse``; ``vectors`` are the model's, one per input, in order."""
    if len(vectors) != len(req.inputs):
        raise ValueError(f"{len(vectors)} vectors for {len(req.inputs)} inputs")
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": embedding_value(vector, req.encoding_format, req.dimensions, spec.normalizes),
        }
        for i, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model_id,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }

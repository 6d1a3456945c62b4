"""Model resolution on the HTTP side: model id → local folder, tokenizer, chat template, limits.

Workers load only ``tokenizer.json`` (with the ``tokenizers`` library) and JSON/Jinja files, never
weights and never ``transformers.AutoTokenizer`` (which would import torch).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from model_host.ipc.model_kind import ModelKind, detect_kind
from sanic_serve.completions.fim import FimFormat, detect_fim
from sanic_serve.config import ServerConfig
from sanic_serve.embeddings.spec import (
    EmbeddingSpec,
    EmbeddingSpecError,
    load_embedding_tokenizer,
    read_embedding_spec,
)
from sanic_serve.errors import InvalidRequest, ModelNotFound
from sanic_serve.parsing.reasoning import template_reasons
from sanic_serve.parsing.response_template import read_response_template, template_call_markup
from sanic_serve.parsing.tool_parsers import detect_parser

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ["*.json", "*.jinja", "*.txt", "*.model"]

RESPONSE_TEMPLATE = "response_template"  # the tool parser that follows the tokenizer's template
GIL_FREE_ENCODE_CHARS = 4096  # texts longer than this are tokenised with the GIL released


@dataclass(frozen=True)
class ModelBundle:
    id: str
    path: str
    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]  # bos_token, eos_token, ... for the template
    stop_token_ids: tuple[int, ...]
    max_context: int
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    tool_parser: str | None = None  # a name in sanic_serve.parsing.tool_parsers, or RESPONSE_TEMPLATE
    call_markup: str | None = None  # the markup a forced tool call is generated in
    response_template: dict[str, Any] | None = None  # the tokenizer's, when it has one
    reasons: bool = False  # the template knows <think>...</think>
    fim: FimFormat | None = None  # fill-in-the-middle sentinels, for completions with a suffix
    kind: ModelKind = ModelKind.CAUSAL
    embedding: EmbeddingSpec | None = None  # for an embedding model: its limits and output
    created: int = field(default_factory=lambda: int(time.time()))

    def require(self, kind: ModelKind) -> None:
        """A 400 naming ``model`` when this model is of another kind than the endpoint serves."""
        if self.kind is kind:
            return
        does = {
            ModelKind.CAUSAL: "generates text: use /v1/chat/completions or /v1/completions",
            ModelKind.VISION: "generates text: use /v1/chat/completions or /v1/responses",
            ModelKind.EMBEDDING: "is an embedding model: use /v1/embeddings",
            ModelKind.SEQ2SEQ: "is a speech-to-text model: use /v1/audio/transcriptions",
        }[self.kind]
        raise InvalidRequest(f"The model `{self.id}` {does}.", param="model", code="model_not_supported")

    @property
    def reads_response_template(self) -> bool:
        """Replies are read by the tokenizer's response template (sanic_serve.parsing.response_template)."""
        return self.tool_parser == RESPONSE_TEMPLATE and self.response_template is not None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > GIL_FREE_ENCODE_CHARS:
            # ``encode_batch`` releases the GIL while it works and ``encode`` does not: a big text
            # tokenised in a worker's thread pool then leaves its event loop free.
            return list(self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open() as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # serialized AddedToken
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = _read_json(folder / "chat_template.json").get("chat_template")
    template = template or tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _embedding_bundle(model_id: str, folder: Path) -> ModelBundle:
    try:
        spec = read_embedding_spec(folder)
        tokenizer = load_embedding_tokenizer(spec)
    except EmbeddingSpecError as exc:
        log.warning("model %s is not a usable embedding model: %s", model_id, exc)
        raise InvalidRequest(
            f"The model `{model_id}` is not an embedding model this server can run.", param="model"
        ) from exc
    return ModelBundle(
        id=model_id,
        path=str(folder.resolve()),
        tokenizer=tokenizer,
        chat_template=None,
        special_tokens={},
        stop_token_ids=(),
        max_context=spec.max_tokens,
        kind=ModelKind.EMBEDDING,
        embedding=spec,
    )


def _speech_bundle(model_id: str, folder: Path) -> ModelBundle:
    """A Whisper-family model: the worker needs only its tokenizer (prompts in, transcripts out);
    its features' settings are read by ``sanic_serve.audio.features`` from the same folder."""
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise InvalidRequest(f"The model `{model_id}` has no fast tokenizer (tokenizer.json).", param="model")
    config = _read_json(folder / "config.json")
    return ModelBundle(
        id=model_id,
        path=str(folder.resolve()),
        tokenizer=Tokenizer.from_file(str(tok_file)),
        chat_template=None,
        special_tokens={},
        stop_token_ids=tuple(_as_ids(config.get("eos_token_id"))),
        max_context=int(config.get("max_target_positions") or 448),
        default_temperature=0.0,
        kind=ModelKind.SEQ2SEQ,
    )


def load_bundle(model_id: str, folder: Path, tool_parser: str | None = None) -> ModelBundle:
    kind = detect_kind(folder)
    if kind is ModelKind.EMBEDDING:
        return _embedding_bundle(model_id, folder)
    if kind is ModelKind.SEQ2SEQ:
        return _speech_bundle(model_id, folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise InvalidRequest(f"The model `{model_id}` has no fast tokenizer (tokenizer.json).", param="model")
    tokenizer = Tokenizer.from_file(str(tok_file))
    tok_config = _read_json(folder / "tokenizer_config.json")
    config = _read_json(folder / "config.json")
    text_config = config.get("text_config") or config
    gen_config = _read_json(folder / "generation_config.json")
    special: dict[str, str] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _token_text(tok_config.get(key))
        if text is not None:
            special[key] = text
    stop_ids = set(_as_ids(gen_config.get("eos_token_id")) + _as_ids(text_config.get("eos_token_id")))
    eos_id = tokenizer.token_to_id(special["eos_token"]) if "eos_token" in special else None
    if eos_id is not None:
        stop_ids.add(eos_id)
    max_context = int(text_config.get("max_position_embeddings") or text_config.get("n_positions") or 2048)
    # Like vLLM, defaults come from the model's generation config: a model published for greedy
    # decoding (do_sample false) answers greedily unless the request asks otherwise.
    sampled = bool(gen_config.get("do_sample", False)) if gen_config else True
    template = _chat_template(folder, tok_config)
    model_type = config.get("model_type") or text_config.get("model_type")
    response_template = read_response_template(tok_config, model_id, model_type)
    # --tool-parser wins, then the tokenizer's own template, then markup the chat template shows.
    detected = detect_parser(template)
    call_markup = tool_parser or detected
    if tool_parser is None and response_template is not None:
        tool_parser = RESPONSE_TEMPLATE
        call_markup = template_call_markup(response_template) or detected
    tool_parser = tool_parser or detected
    log.info("model %s: tool calls read by %s", model_id, tool_parser or "nothing (no known format)")
    return ModelBundle(
        tool_parser=tool_parser,
        call_markup=call_markup,
        response_template=response_template,
        reasons=template_reasons(template),
        fim=detect_fim(tokenizer),
        default_temperature=float(gen_config.get("temperature", 1.0)) if sampled else 0.0,
        default_top_p=float(gen_config.get("top_p", 1.0)) if sampled else 1.0,
        id=model_id,
        path=str(folder.resolve()),
        tokenizer=tokenizer,
        chat_template=template,
        special_tokens=special,
        stop_token_ids=tuple(sorted(stop_ids)),
        max_context=max_context,
        kind=kind,  # a causal LM, or a vision-language model (which takes images too)
    )


def _locate(model_id: str) -> Path:
    """A local folder, or the Hub snapshot holding the tokenizer files (offline: cache only)."""
    if os.path.isdir(model_id):
        return Path(model_id)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelNotFound(model_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=_TOKENIZER_FILES))
    except Exception as exc:  # offline miss, unknown repo, bad id: all mean "not here"
        log.info("model %s not found: %s", model_id, exc)
        raise ModelNotFound(model_id) from exc


class ModelResolver:
    """Per-worker cache of model bundles. Loading runs in a thread; concurrent first requests for
    the same model share one load."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._bundles: dict[str, ModelBundle] = {}
        self._loading: dict[str, asyncio.Future[ModelBundle]] = {}
        if config.default_model_id and config.default_model_path:
            bundle = load_bundle(config.default_model_id, Path(config.default_model_path), config.tool_parser)
            self._bundles[config.default_model_id] = bundle

    @property
    def default(self) -> ModelBundle | None:
        mid = self.config.default_model_id
        return self._bundles.get(mid) if mid else None

    def known(self) -> list[ModelBundle]:
        return list(self._bundles.values())

    def id_for_path(self, path: str) -> str:
        for bundle in self._bundles.values():
            if bundle.path == path:
                return bundle.id
        return path

    async def resolve(self, model_id: str) -> ModelBundle:
        found = self._bundles.get(model_id)
        if found is not None:
            return found
        if self.config.pinned:
            raise ModelNotFound(model_id)
        pending = self._loading.get(model_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(None, self._load, model_id, self.config.tool_parser)
            self._loading[model_id] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(model_id, None))
        bundle = await asyncio.shield(pending)
        self._bundles[model_id] = bundle
        return bundle

    @staticmethod
    def _load(model_id: str, tool_parser: str | None) -> ModelBundle:
        return load_bundle(model_id, _locate(model_id), tool_parser)

"""What every generation endpoint does before it generates: parse, admit, build sampling."""

from __future__ import annotations

from typing import Any

import orjson
from sanic import Request

from model_host.ipc import HostClient, SamplingParams
from model_host.ipc.status import StatusField
from sanic_serve.config import ServerConfig
from sanic_serve.errors import InvalidRequest, Overloaded
from sanic_serve.generation_config import config_stop_token_ids, config_temperature
from sanic_serve.models import ModelBundle, ModelResolver
from sanic_serve.protocol import GenerationFields


def parse_json_body(request: Request) -> Any:
    if not request.body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc


async def admit(request: Request, model_id: str) -> ModelBundle:
    """Refuse at once when the host's queue is full (the host enforces it too, exactly), then
    resolve the model."""
    client: HostClient = request.app.ctx.client
    config: ServerConfig = request.app.ctx.config
    if client.status.get(StatusField.WAITING) >= config.max_queue:
        raise Overloaded("The server is busy: too many waiting requests. Retry shortly.")
    models: ModelResolver = request.app.ctx.models
    return await models.resolve(model_id)


def output_grammar(req: GenerationFields) -> str | None:
    """The grammar of a structured-output request, compiled here so that a schema the decoder
    cannot enforce is a 400 naming the field, before anything is generated."""
    response_format = getattr(req, "response_format", None)
    schema = response_format.schema_text() if response_format is not None else None
    if schema is None:
        return None
    import llguidance

    try:
        return str(llguidance.JsonCompiler().compile(schema))
    except ValueError as exc:
        raise InvalidRequest(
            f"response_format: unsupported JSON schema: {exc}", param="response_format"
        ) from exc


def sampling_params(req: GenerationFields, bundle: ModelBundle, max_new_tokens: int) -> SamplingParams:
    bias = req.bias_pairs()
    vocab = bundle.tokenizer.get_vocab_size(with_added_tokens=True)
    if any(token >= vocab for token, _ in bias):
        raise InvalidRequest(
            f"logit_bias names a token id outside the vocabulary of {vocab}.", param="logit_bias"
        )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=config_temperature(req, bundle),
        top_p=req.top_p if req.top_p is not None else bundle.default_top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=bias,
        logprobs=req.logprob_count(),
        prompt_logprobs=req.prompt_logprob_count(),
        grammar=output_grammar(req),
        stop_token_ids=config_stop_token_ids(req, bundle),
    )

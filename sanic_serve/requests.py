"""What every generation endpoint does before it generates: parse, admit, build sampling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import orjson
from sanic import Request

from model_host.ipc import HostClient, SamplingParams
from model_host.ipc.model_kind import GENERATIVE, ModelKind
from model_host.ipc.status import StatusField
from sanic_serve.config import ServerConfig
from sanic_serve.errors import InvalidRequest, Overloaded
from sanic_serve.generation_config import config_stop_token_ids, config_temperature
from sanic_serve.models import ModelBundle, ModelResolver
from sanic_serve.parsing.call_grammar import JSON_SEPARATORS
from sanic_serve.protocol import GenerationFields

T = TypeVar("T")
# Requests with bodies over this size are tokenised in a thread (about 1 ms of tokenising on a
# loaded core).
_OFF_LOOP_MIN_BODY_BYTES = 32 * 1024


def parse_json_body(request: Request) -> Any:
    if not request.body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc


async def admit(request: Request, model_id: str, kind: ModelKind | None = None) -> ModelBundle:
    """Resolve the model (an unknown one is a 404 whatever the load; one of another kind than the
    endpoint serves, a 400: ``kind``, by default any kind that generates text, a vision-language
    model included), then refuse at once when the host's queue is full: requests that fit a free
    batch slot start at the next step and never wait, so ``--max-queue 0`` means no waiting room,
    not no service. The host enforces the same rule exactly; this check only spares a full host
    the message."""
    models: ModelResolver = request.app.ctx.models
    bundle = await models.resolve(model_id)
    if kind is not None or bundle.kind not in GENERATIVE:
        bundle.require(kind or ModelKind.CAUSAL)
    client: HostClient = request.app.ctx.client
    config: ServerConfig = request.app.ctx.config
    free_slots = max(0, config.engine.max_batch_size - client.status.get(StatusField.RUNNING))
    if client.status.get(StatusField.WAITING) >= config.engine.max_queue + free_slots:
        raise Overloaded("The server is busy: too many waiting requests. Retry shortly.")
    return bundle


async def off_the_loop(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args)`` (tokenising, rendering a template) in a thread when its input is large, so
    that one big request never stalls the other requests of this worker's event loop; small
    inputs stay on the loop, where a thread hop would cost more than the work. ``tokenizers``
    releases the GIL while it encodes."""
    if len(request.body or b"") < _OFF_LOOP_MIN_BODY_BYTES:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, partial(fn, *args, **kwargs))


def completion_budget(
    bundle: ModelBundle, prompt_tokens: int, requested: int | None, prompt_param: str = "messages"
) -> int:
    """How many tokens may be generated; a request that cannot fit is a 400, as OpenAI does,
    naming the field that holds the prompt (``messages``, or ``prompt`` for text completions)."""
    room = bundle.max_context - prompt_tokens
    if room <= 0 or (requested is not None and requested > room):
        wanted = prompt_tokens + (requested or 0)
        raise InvalidRequest(
            f"This model's maximum context length is {bundle.max_context} tokens. However, you "
            f"requested {wanted} tokens ({prompt_tokens} in the {prompt_param}, {requested or 0} in the "
            f"completion). Please reduce the length of the {prompt_param} or completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    return requested if requested is not None else room


def output_grammar(req: GenerationFields) -> str | None:
    """The grammar of a structured-output request, compiled here so that a schema the decoder
    cannot enforce is a 400 naming the field, before anything is generated."""
    response_format = getattr(req, "response_format", None)
    schema = response_format.schema_text() if response_format is not None else None
    if schema is None:
        return None
    import llguidance

    try:
        # One layout, no free whitespace: a weak model cannot pad its way to max_tokens.
        compiler = llguidance.JsonCompiler(separators=JSON_SEPARATORS, whitespace_flexible=False)
        return str(compiler.compile(schema))
    except ValueError as exc:
        raise InvalidRequest(
            f"response_format: unsupported JSON schema: {exc}", param="response_format"
        ) from exc


def ban(logit_bias: tuple[tuple[int, float], ...], tokens: tuple[int, ...]) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` with ``tokens`` banned; the ban wins over the request's own bias for them."""
    return (*((t, b) for t, b in logit_bias if t not in tokens), *((t, float("-inf")) for t in tokens))


def sampling_params(
    req: GenerationFields,
    bundle: ModelBundle,
    max_new_tokens: int,
    *,
    grammar: str | None = None,
    banned_tokens: tuple[int, ...] = (),
    min_logprobs: int = -1,
) -> SamplingParams:
    """The one place a request becomes its ``SamplingParams``. ``grammar``: a forced call's shape
    (else the request's ``response_format``); ``banned_tokens``: never sampled, whatever the
    request's own ``logit_bias`` says; ``min_logprobs``: logprobs the server needs itself (to rank
    ``best_of`` candidates)."""
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
        logit_bias=ban(bias, banned_tokens) if banned_tokens else bias,
        logprobs=max(req.logprob_count(), min_logprobs),
        prompt_logprobs=req.prompt_logprob_count(),
        grammar=grammar if grammar is not None else output_grammar(req),
        stop_token_ids=config_stop_token_ids(req, bundle),
    )

"""``POST /v1/completions`` (legacy text completions): raw prompts, no chat template."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from model_host.ipc import HostClient
from sanic_serve.choices import Choice, abort, fan_out, merged, usage
from sanic_serve.completions.request import CompletionRequest, parse_completion_request
from sanic_serve.errors import APIError, InvalidRequest
from sanic_serve.generation import Delta
from sanic_serve.models import ModelBundle
from sanic_serve.requests import admit, completion_budget, off_the_loop, parse_json_body, sampling_params
from sanic_serve.sse import DONE, SYSTEM_FINGERPRINT, event

bp = Blueprint("completions")


def _prompt_ids(
    bundle: ModelBundle, prompt: str | list[int], suffix: str | None, param: str = "prompt"
) -> list[int]:
    if prompt == "" and not suffix:  # with a suffix, an empty prefix is a fill at the start
        raise InvalidRequest(f"{param} must not be empty.", param=param)
    if not isinstance(prompt, str):
        vocab = bundle.tokenizer.get_vocab_size(with_added_tokens=True)
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequest(f"{param} token ids must be within [0, {vocab}).", param=param)
        if not suffix:
            return prompt
    text = _infill(bundle, prompt, suffix) if suffix else prompt
    assert isinstance(text, str)
    # As vLLM does for raw prompts: the tokenizer adds its BOS (if it has one).
    ids = bundle.encode(text, add_special_tokens=True)
    if not ids:
        raise InvalidRequest(f"{param} tokenizes to nothing.", param=param)
    return ids


def _all_prompt_ids(bundle: ModelBundle, req: CompletionRequest) -> list[list[int]]:
    """Every prompt's token ids; ``param`` names the one at fault (``prompt`` or ``prompt[i]``)."""
    one = isinstance(req.prompt, str) or all(isinstance(t, int) for t in req.prompt)  # text or ids
    return [
        _prompt_ids(bundle, prompt, req.suffix, "prompt" if one else f"prompt[{p}]")
        for p, prompt in enumerate(req.prompts())
    ]


def _infill(bundle: ModelBundle, prompt: str | list[int], suffix: str) -> str:
    """The prompt as the text before the hole and ``suffix`` as the text after it, between the
    model's fill-in-the-middle sentinels."""
    if bundle.fim is None:
        raise InvalidRequest(
            f"The model `{bundle.id}` has no fill-in-the-middle tokens (such as <|fim_prefix|>, "
            "<|fim_suffix|>, <|fim_middle|>); suffix needs a model trained for infilling.",
            param="suffix",
        )
    before = prompt if isinstance(prompt, str) else bundle.tokenizer.decode(prompt, skip_special_tokens=False)
    return bundle.fim.render(before, suffix)


async def prepare(request: Request, req: CompletionRequest) -> tuple[list[Choice], list[str]]:
    """All candidates (``best_of`` or ``n`` per prompt, indexed prompt by prompt) and each one's
    echo text."""
    client: HostClient = request.app.ctx.client
    bundle = await admit(request, req.model)
    k = req.candidates
    choices: list[Choice] = []
    echoes: list[str] = []
    all_ids = await off_the_loop(request, _all_prompt_ids, bundle, req)
    for p, (prompt, ids) in enumerate(zip(req.prompts(), all_ids, strict=True)):
        budget = completion_budget(bundle, len(ids), req.max_new_tokens, prompt_param="prompt")
        # Candidates beyond n are ranked by their tokens' logprobs.
        sampling = sampling_params(req, bundle, budget, min_logprobs=0 if k > (req.n or 1) else -1)
        choices += fan_out(client, bundle, ids, sampling, req.stop_strings, k, first_index=p * k)
        text = prompt if isinstance(prompt, str) else bundle.tokenizer.decode(ids)
        echoes += [text] * k
    return choices, echoes


def _best(choices: list[Choice], entries: dict[int, list[dict[str, Any]]], k: int, n: int) -> list[Choice]:
    """Of each prompt's ``k`` candidates, the ``n`` with the highest mean token logprob (as
    OpenAI ranks ``best_of``), best first."""

    def mean_logprob(c: Choice) -> float:
        values = [e["logprob"] for e in entries[c.index]]
        return sum(values) / len(values) if values else 0.0

    kept = []
    for at in range(0, len(choices), k):
        kept += sorted(choices[at : at + k], key=mean_logprob, reverse=True)[:n]
    return kept


@bp.post("/v1/completions", ctx_large_body=True)
async def completions(request: Request) -> HTTPResponse | None:
    req = parse_completion_request(parse_json_body(request))
    choices, echoes = await prepare(request, req)
    try:
        return await _respond(request, req, choices, echoes)
    finally:
        abort(choices)  # however the response ended (client gone included), nothing runs on


async def _respond(
    request: Request, req: CompletionRequest, choices: list[Choice], echoes: list[str]
) -> HTTPResponse | None:
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    n, k = req.n or 1, req.candidates
    if req.stream:
        await _stream(request, req, choices, echoes, base, n)
        return None
    texts = {c.index: (echoes[c.index] if req.echo else "") for c in choices}
    entries: dict[int, list[dict[str, Any]]] = {c.index: [] for c in choices}
    async for choice, delta in merged(choices):
        texts[choice.index] += delta.text
        entries[choice.index] += delta.logprobs or []
    returned = _best(choices, entries, k, n) if k > n else choices
    body = {
        **base,
        "choices": [
            {
                "index": i,
                "text": texts[c.index],
                "logprobs": (
                    legacy_logprobs(c.gen.prompt_logprobs + entries[c.index])
                    if req.logprobs is not None
                    else None
                ),
                "finish_reason": c.gen.finish_reason,
            }
            for i, c in enumerate(returned)
        ],
        # Every candidate was generated: all count, as OpenAI bills best_of.
        "usage": usage(choices, k),
    }
    return json(body, dumps=orjson.dumps)


def legacy_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The completions endpoint's older shape of the same information: parallel lists. An echoed
    prompt's first token has null for its logprob and alternatives, as in OpenAI's API."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            for e in entries
        ],
        "text_offset": offsets,
    }


def _chunk(
    base: dict[str, Any], index: int, text: str, finish_reason: str | None, logprobs: Any = None
) -> bytes:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return event({**base, "choices": [choice]})


async def _stream(
    request: Request,
    req: CompletionRequest,
    choices: list[Choice],
    echoes: list[str],
    base: dict[str, Any],
    n: int,
) -> None:
    deltas = merged(choices)
    first = await anext(deltas)  # errors before any token keep their HTTP status
    response = await request.respond(
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    assert response is not None
    offsets = {c.index: 0 for c in choices}
    echoed: set[int] = set()
    try:
        item: tuple[Choice, Delta] | None = first
        while item is not None:
            choice, delta = item
            if req.echo and choice.index not in echoed:
                # A choice's first delta comes after its prompt logprobs: the echo can carry them.
                echoed.add(choice.index)
                lp = None
                if req.logprobs is not None:
                    lp = legacy_logprobs(choice.gen.prompt_logprobs)
                    offsets[choice.index] = sum(len(t) for t in lp["tokens"])
                await response.send(_chunk(base, choice.index, echoes[choice.index], None, lp))
            if delta.text or delta.finish_reason is not None or delta.logprobs:
                lp = None
                if req.logprobs is not None:
                    lp = legacy_logprobs(delta.logprobs or [], offsets[choice.index])
                    offsets[choice.index] += sum(len(t) for t in lp["tokens"])
                await response.send(_chunk(base, choice.index, delta.text, delta.finish_reason, lp))
            item = await anext(deltas, None)
    except APIError as exc:
        await response.send(event(exc.body()))
    if req.include_usage:
        await response.send(event({**base, "choices": [], "usage": usage(choices, n)}))
    await response.send(DONE)
    await response.eof()

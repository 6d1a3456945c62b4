"""The ``n`` choices of one completion request: run together, merged into one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from model_host.ipc import HostClient, SamplingParams
from model_host.ipc.messages import ImageInput
from sanic_serve.errors import APIError
from sanic_serve.generation import Delta, Generation
from sanic_serve.models import ModelBundle
from sanic_serve.parsing.assembler import ChoiceAssembler


@dataclass
class Choice:
    index: int
    gen: Generation
    out: ChoiceAssembler


def fan_out(
    client: HostClient,
    bundle: ModelBundle,
    prompt_ids: list[int],
    sampling: SamplingParams,
    stop_strings: list[str],
    n: int,
    first_index: int = 0,
    assembler: Callable[[], ChoiceAssembler] = ChoiceAssembler,
    keep_special_tokens: bool = False,
    images: tuple[ImageInput, ...] = (),
    prompt_text: str | None = None,
) -> list[Choice]:
    """``n`` generations of one prompt. With a seed, choice *i* uses ``seed + i``: the choices
    differ, and each is reproducible. ``assembler`` makes each choice's output reader (by default
    plain text). ``images``, with the rendered ``prompt_text``: a vision-language model's prompt
    (each choice is a request of its own, and carries them)."""
    choices = []
    for i in range(n):
        seeded = sampling.replace(seed=sampling.seed + i) if sampling.seed is not None else sampling
        gen = Generation(
            client, bundle, prompt_ids, seeded, stop_strings, keep_special_tokens, images, prompt_text
        )
        choices.append(Choice(first_index + i, gen, assembler()))
    return choices


def usage(choices: Sequence[Choice], n: int = 1) -> dict[str, Any]:
    """Each prompt is counted once, however many choices share it (as OpenAI does); so are its
    tokens that came from the prefix cache."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.gen.prompt_tokens for c in firsts)
    completion = sum(c.gen.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.gen.cached_tokens for c in firsts)},
    }


def abort(choices: Sequence[Choice]) -> None:
    """Stop every unfinished choice in the host at once."""
    for choice in choices:
        choice.gen.abort()


async def merged(choices: Sequence[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Deltas of all choices as they come. The first error of any choice is raised; leaving the
    iteration early (error, client gone) cancels every choice, which aborts it in the host."""
    if len(choices) == 1:  # the common case needs no tasks
        async for delta in choices[0].gen.deltas():
            yield choices[0], delta
        return
    queue: asyncio.Queue[tuple[Choice, Delta | None, APIError | None]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for delta in choice.gen.deltas():
                await queue.put((choice, delta, None))
        except APIError as exc:
            await queue.put((choice, None, exc))
        else:
            await queue.put((choice, None, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        running = len(tasks)
        while running:
            source, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                running -= 1
            else:
                yield source, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

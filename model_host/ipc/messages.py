"""Typed messages that cross the worker ⇄ model-host boundary.

Every message is a ``msgspec`` struct tagged with its :class:`MessageKind`; :mod:`model_host.ipc.codec`
turns them into bytes and back, and the tag alone says what a message is. Worker → host messages go
down a per-worker pipe; host → worker :class:`TokenFrame` s go into the worker's shared-memory ring
(:mod:`model_host.ipc.ring`). A request carries a typed payload whose own tag is its :class:`Task`
(generate, embed). Errors cross as values (:class:`ErrorInfo`), never as raised exceptions.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec


class MessageKind(enum.IntEnum):
    ADD = 1
    ABORT = 2
    WORKER_RESET = 3
    UNLOAD_MODELS = 4
    FRAME = 5


class Task(enum.IntEnum):
    """What a request asks of its model; each model kind serves one (see ``model_kind``)."""

    GENERATE = 1  # causal LM: tokens in, tokens out
    EMBED = 2  # sentence embedder: token ids in, one vector per input out
    TRANSCRIBE = 3  # speech-to-text (Whisper family): log-mel features in, decoder tokens out


class FinishReason(enum.IntEnum):
    """Why a request stopped. ``NONE`` means the frame carries more and the request runs on."""

    NONE = 0
    STOP = 1  # a stop token (EOS, end-of-turn) was sampled; for an embedding: every vector sent
    LENGTH = 2  # max_tokens or the context window was reached
    ABORT = 3  # the worker asked the host to stop it
    ERROR = 4  # the frame carries an ErrorInfo


class ErrorKind(enum.IntEnum):
    MODEL_NOT_FOUND = 1
    MODEL_LOAD_FAILED = 2
    GENERATION_FAILED = 3
    ENGINE_DEAD = 4
    INVALID_REQUEST = 5
    OVERLOADED = 6
    # The prompt as the model reads it (a vision model's images expanded by the host's processor)
    # leaves no room in the context: the worker's context_length_exceeded 400.
    CONTEXT_LENGTH_EXCEEDED = 7


class ErrorInfo(msgspec.Struct, frozen=True, array_like=True):
    kind: ErrorKind
    message: str


def request_ref(worker_index: int, request_id: int) -> str:
    """The name of one request in the host's log and in the body of a 5xx the client gets: both
    sides know the pair, so a client's report leads straight to the traceback."""
    return f"req_{worker_index}_{request_id:x}"


class SamplingParams(msgspec.Struct, frozen=True):
    """Per-request sampling settings; ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logprobs: int = -1  # -1: none; 0: the sampled token's; k: and the k most likely alternatives
    prompt_logprobs: int = -1  # the same for each prompt token, sent ahead of the first token
    grammar: str | None = None  # an llguidance grammar the output must match (structured output)
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def replace(self, **changes: Any) -> SamplingParams:
        return msgspec.structs.replace(self, **changes)


class ImageInput(msgspec.Struct, frozen=True, array_like=True):
    """One image of a request, as the client sent it (PNG, JPEG, WebP or GIF file bytes), already
    checked by the worker (format, byte size, pixel count); the host decodes it again. It crosses
    once, in the request, never per token."""

    data: bytes
    digest: bytes  # sha256 of ``data``: the prefix cache tells images apart by it


class Generate(msgspec.Struct, frozen=True, tag=int(Task.GENERATE), tag_field="task"):
    """Continue ``prompt_token_ids``; frames carry the new tokens.

    With ``images`` (a vision model), ``prompt_text`` is the rendered prompt, one placeholder per
    image where the chat template put it: the host's processor expands the placeholders to the
    image's tokens, as ``processor(text=..., images=...)`` does, and its ids replace
    ``prompt_token_ids`` (the worker's tokenization of that text, placeholders unexpanded)."""

    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    images: tuple[ImageInput, ...] = ()
    prompt_text: str | None = None
    # Only the prompt as the model reads it is asked (``/tokenize``, ``count_tokens`` with images):
    # the host prepares it (a vision model's processor expands the placeholders), sends its ids in
    # prompt frames without logprobs, and finishes with ``LENGTH`` and ``prompt_tokens``; the model
    # does not run, and the context does not limit it.
    count_only: bool = False


class Embed(msgspec.Struct, frozen=True, tag=int(Task.EMBED), tag_field="task"):
    """One vector per input (token ids with the model's special tokens, already within its limit),
    in one frame per input that carries its ``index``."""

    inputs: tuple[tuple[int, ...], ...]


WHISPER_FRAMES = 3000  # feature frames per 30 s window (10 ms hop)
WHISPER_WINDOW_S = 30.0


class Transcribe(msgspec.Struct, frozen=True, tag=int(Task.TRANSCRIBE), tag_field="task"):
    """Speech to text with a Whisper-family model (the ``seq2seq`` runner).

    Input: ``features`` are the log-mel spectrogram the worker computed (Whisper's feature
    extractor: 16 kHz mono, 25 ms windows, 10 ms hop, padded to whole 30 s windows), as float32
    bytes in C order of shape ``(n_windows, n_mels, 3000)`` (3000 frames = 30 s). ``n_mels`` is the
    model's ``num_mel_bins`` (80 for whisper-base; a mismatch is an ``INVALID_REQUEST``). Each
    window holds one chunk of the audio (at most 30 s, featurised alone and zero-padded to 30 s);
    ``window_starts`` are the chunks' starts in feature frames of the audio (10 ms; the first 0,
    increasing by at most 3000, each even so a start is a whole number of 0.02 s timestamp steps).
    Empty: window ``i`` covers seconds ``[30 i, 30 (i + 1))`` (fixed cuts).

    ``language``: an ISO-639-1 code (``"en"``, ``"de"``) the host forces as the language token;
    None: the host detects it from the first window. ``task``: ``"translate"`` makes the model
    answer in English. ``prompt_ids``: Whisper's previous-text prompt, already tokenized by the
    worker *without* special tokens (the host adds ``<|startofprev|>`` and keeps only the last
    ``max_target_positions // 2 - 1`` ids). ``timestamps``: decode with timestamp tokens (needed for
    segments and srt/vtt); else the host forces ``<|notimestamps|>``. ``sampling``: temperature
    (0 = greedy) and ``max_new_tokens`` (the limit per 30 s window); other fields are ignored.

    Output: ``TokenFrame`` s whose ``token_ids`` are the decoder's output tokens in order, which the
    worker decodes. The very first token of the first frame is the language token chosen
    (``<|en|>``, given or detected); the start-of-transcript, task and no-timestamps tokens are
    not sent, nor is end-of-text. With ``timestamps``, timestamp tokens (ids from
    ``<|0.00|>`` upward, 0.02 s apart) are sent as they come, and they are **continuous across
    windows**: the host offsets window ``i``'s timestamps by its start (``window_start_s``), so a
    token may stand for a time past ``<|30.00|>`` (id = ``<|0.00|>`` id + round(seconds / 0.02)); the
    worker must turn any id at or above ``<|0.00|>`` into a time itself, not through the
    tokenizer. Windows are decoded one after another and the tokens of window ``i + 1`` follow those
    of window ``i`` in the same stream. The request finishes with ``STOP`` after the last window,
    or ``LENGTH`` when a window hit ``max_new_tokens`` (decoding then goes on with the next window
    and ``LENGTH`` is reported at the end).

    Each window's last frame carries a ``WindowResult`` (see there): the tokens sent since the
    previous one are that window's. With ``sampling.logprobs >= 0`` every token comes with its
    logprob (NaN for the language token). When the model's generation config has Whisper's
    thresholds, a window's tokens are held until it passed them and all come in its last frame.
    ``word_timestamps``: the ``WindowResult`` carries a time per token, from the alignment heads;
    ``audio_frames``: feature frames that hold audio (the rest is padding the alignment ignores;
    0: every window is full); a window's own are up to the next window's start
    (``window_audio_frames``).
    """

    features: bytes
    n_windows: int
    n_mels: int
    language: str | None
    # Encoded as "mode": the payload's tag already takes the name "task" on the wire.
    task: Literal["transcribe", "translate"] = msgspec.field(name="mode")
    prompt_ids: tuple[int, ...]
    timestamps: bool
    sampling: SamplingParams
    word_timestamps: bool = False
    audio_frames: int = 0
    window_starts: tuple[int, ...] = ()

    def window_start_frames(self, window: int) -> int:
        """Window ``window``'s start in feature frames of the whole audio."""
        if self.window_starts:
            return self.window_starts[window]
        return window * WHISPER_FRAMES

    def window_start_s(self, window: int) -> float:
        return self.window_start_frames(window) * WHISPER_WINDOW_S / WHISPER_FRAMES

    def window_audio_frames(self, window: int) -> int:
        """Feature frames of window ``window`` that hold audio (the rest is its padding)."""
        start = self.window_start_frames(window)
        if window + 1 < self.n_windows:
            end = self.window_start_frames(window + 1)
        elif self.audio_frames > 0:
            end = self.audio_frames
        else:
            end = start + WHISPER_FRAMES
        return max(1, min(WHISPER_FRAMES, end - start))

    def window_starts_problem(self) -> str | None:
        """Why ``window_starts`` (with ``audio_frames``) cannot be this audio's layout, if so."""
        starts = self.window_starts
        if not starts:
            return None
        if len(starts) != self.n_windows or starts[0] != 0:
            return "window_starts must hold one start per window, the first 0"
        steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        if any(not 0 < step <= WHISPER_FRAMES for step in steps) or any(s % 2 for s in starts):
            return "window starts must be even and increase by 1 to 3000 frames"
        if self.audio_frames > 0 and not 0 < self.audio_frames - starts[-1] <= WHISPER_FRAMES:
            return "the last window must hold 1 to 3000 frames of audio"
        return None


Payload = Generate | Embed | Transcribe


class AddRequest(msgspec.Struct, frozen=True, tag=int(MessageKind.ADD), tag_field="kind"):
    request_id: int
    worker_index: int
    epoch: int  # host epoch the worker saw; a restarted host drops adds meant for its predecessor
    model_path: str
    payload: Payload

    @property
    def task(self) -> Task:
        if isinstance(self.payload, Generate):
            return Task.GENERATE
        return Task.EMBED if isinstance(self.payload, Embed) else Task.TRANSCRIBE


class AbortRequest(msgspec.Struct, frozen=True, tag=int(MessageKind.ABORT), tag_field="kind"):
    request_id: int
    worker_index: int


class WorkerReset(msgspec.Struct, frozen=True, tag=int(MessageKind.WORKER_RESET), tag_field="kind"):
    """A worker (re)started: whatever its predecessor left running has no reader any more."""

    worker_index: int


class UnloadModels(msgspec.Struct, frozen=True, tag=int(MessageKind.UNLOAD_MODELS), tag_field="kind"):
    """Unload every model except the preloaded (default or pinned) one and those with requests
    waiting or running. The host answers, once done, with a frame for ``request_id`` that finishes
    with ``STOP``: the worker waits on it like on a request."""

    request_id: int
    worker_index: int


HostMessage = AddRequest | AbortRequest | WorkerReset | UnloadModels


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """The sampled token's log probability and the most likely alternatives, best first. A
    prompt's first token has no logprob (nothing predicts it): NaN."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class WindowResult(msgspec.Struct, frozen=True, array_like=True):
    """How a 30 s window of a transcription (``Transcribe``) was decoded, as Whisper measures it:
    ``avg_logprob`` over its tokens and end-of-text, the probability of ``<|nospeech|>`` at the
    start-of-transcript position, the ``temperature`` of the decode kept (above the request's after
    a fallback), ``skipped`` when the window was judged silence (its tokens dropped), and with
    ``word_timestamps`` each of the window's tokens' start time in seconds of the whole audio."""

    avg_logprob: float
    no_speech_prob: float
    temperature: float
    skipped: bool = False
    token_times: tuple[float, ...] = ()


class TokenFrame(msgspec.Struct, frozen=True, array_like=True, tag=int(MessageKind.FRAME), tag_field="kind"):
    """What the host sends for one request: new tokens, and how it finished if it did. A ``prompt``
    frame carries prompt tokens with their logprobs (``prompt_logprobs``) ahead of any new token;
    an embedding frame carries the ``vector`` (little-endian float32) of input ``index``."""

    request_id: int
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason = FinishReason.NONE
    error: ErrorInfo | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when the request asked
    prompt: bool = False
    cached_tokens: int = 0  # on a request's first frame: prompt tokens reused, not prefilled
    vector: bytes | None = None
    index: int = 0
    queue_s: float = 0.0  # on a request's first frame: seconds it waited in the host's queue
    # On a generation's first frame: the prompt's length as the model read it (a vision model's
    # prompt has each image placeholder expanded to the image's tokens).
    prompt_tokens: int = 0
    window: WindowResult | None = None  # a transcription window's last frame (see ``Transcribe``)
    # A generated token with more to follow, neither the request's first nor its last: the host may
    # hold it back to deliver it with the next ones (``HostSettings.stream_interval_ms``).
    mid_stream: bool = False

"""The multipart form of ``/v1/audio/transcriptions`` and ``/v1/audio/translations``, checked field by
field against OpenAI's ``CreateTranscriptionRequest`` / ``CreateTranslationRequest`` (the field names
exactly the spec's, ``timestamp_granularities[]`` and ``include[]`` with their brackets, as the
OpenAI SDKs send them). Every refusal is a 400 naming its field (413 for an upload over the limit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sanic_serve.audio.formats import RESPONSE_FORMATS, ResponseFormat
from sanic_serve.audio.languages import LANGUAGES
from sanic_serve.errors import APIError, InvalidRequest

Task = Literal["transcribe", "translate"]
DEFAULT_MAX_AUDIO_MB = 25  # OpenAI's own limit per upload
DEFAULT_MAX_AUDIO_S = 3600.0

# Fields of the spec this server does not implement (gpt-transcribe's and the diarizing model's),
# and on translations the fields only transcriptions have: refused with a 400 naming the field
# rather than silently ignored. Any other unknown field is accepted, as on the other routes.
# ``chunking_strategy`` is an accepted no-op: long audio is always cut at quiet points into chunks
# of at most 30 s here.
_TRANSCRIBE_ONLY = ("language", "include", "timestamp_granularities", "stream")
_REFUSED: dict[Task, frozenset[str]] = {
    "transcribe": frozenset({"languages", "keywords", "known_speaker_names", "known_speaker_references"}),
    "translate": frozenset(_TRANSCRIBE_ONLY),
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class UploadTooLarge(APIError):
    status = 413

    def __init__(self, limit_mb: float) -> None:
        super().__init__(
            f"The uploaded file is larger than this server's limit of {limit_mb:g} MB.",
            param="file",
            code="file_too_large",
        )


@dataclass(frozen=True)
class AudioRequest:
    task: Task
    audio: bytes
    filename: str
    model: str
    language: str | None  # an ISO-639-1 code; None: detected by the model
    prompt: str | None
    response_format: ResponseFormat
    temperature: float
    word_timestamps: bool
    include_logprobs: bool
    stream: bool

    @property
    def timestamps(self) -> bool:
        """Decode with timestamp tokens: the formats that show segments need them."""
        return self.response_format in ("srt", "vtt", "verbose_json")


def _one(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = form.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(f"The field `{name}` was given {len(values)} times; give it once.", param=name)
    return values[0]


def _many(form: Mapping[str, Sequence[str]], name: str) -> list[str]:
    # The SDKs send arrays as repeated `name[]` fields; a bare `name` is accepted as well.
    bare = name.removesuffix("[]")
    return [*form.get(name, ()), *form.get(bare, ())]


def parse_audio_form(
    task: Task,
    form: Mapping[str, Sequence[str]],
    files: Mapping[str, Sequence[Any]],
    *,
    max_audio_mb: float = DEFAULT_MAX_AUDIO_MB,
) -> AudioRequest:
    """``form``: text fields (name -> values); ``files``: uploads (name -> objects with ``body``
    and ``name``), as Sanic parses ``multipart/form-data``."""
    for name in [*form, *files]:
        if name.removesuffix("[]") in _REFUSED[task]:
            where = "transcriptions only" if task == "translate" else "not supported by this server"
            raise InvalidRequest(f"The field `{name}` is {where}.", param=name, code="unsupported_parameter")

    uploads = files.get("file") or []
    if not uploads:
        message = (
            "The field `file` must be a file upload (multipart/form-data with a filename)."
            if form.get("file")
            else "You must provide a `file` to transcribe."
        )
        raise InvalidRequest(message, param="file", code="missing_required_parameter")
    if len(uploads) > 1:
        raise InvalidRequest("Upload one `file` per request.", param="file")
    upload = uploads[0]
    audio = bytes(upload.body or b"")
    if len(audio) > max_audio_mb * 1024 * 1024:
        raise UploadTooLarge(max_audio_mb)

    model = _one(form, "model")
    if not model:
        raise InvalidRequest("You must provide a `model`.", param="model", code="missing_required_parameter")

    response_format = _one(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"`response_format` must be one of {', '.join(RESPONSE_FORMATS)}; got `{response_format}`.",
            param="response_format",
        )

    temperature = _temperature(_one(form, "temperature"))
    language = _language(_one(form, "language"))
    stream = _bool(_one(form, "stream"), "stream")
    granularities = _many(form, "timestamp_granularities[]")
    include = _many(form, "include[]")

    for g in granularities:
        if g not in ("segment", "word"):
            raise InvalidRequest(
                f"`timestamp_granularities[]` takes `segment` and `word`; got `{g}`.",
                param="timestamp_granularities[]",
            )
    if granularities and response_format != "verbose_json":
        raise InvalidRequest(
            "`timestamp_granularities[]` needs `response_format` `verbose_json`.",
            param="timestamp_granularities[]",
        )
    for item in include:
        if item != "logprobs":
            raise InvalidRequest(f"`include[]` takes `logprobs`; got `{item}`.", param="include[]")
    if include and response_format != "json":
        raise InvalidRequest("`include[]=logprobs` needs `response_format` `json`.", param="include[]")
    if stream and response_format not in ("json", "text"):
        raise InvalidRequest(f"Streaming answers `json` or `text`, not `{response_format}`.", param="stream")
    return AudioRequest(
        task=task,
        audio=audio,
        filename=str(getattr(upload, "name", "") or ""),
        model=model,
        language=language,
        prompt=_one(form, "prompt") or None,
        response_format=response_format,  # type: ignore[arg-type]  # checked against the literal's values
        temperature=temperature,
        word_timestamps="word" in granularities,
        include_logprobs=bool(include),
        stream=stream,
    )


def _temperature(raw: str | None) -> float:
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise InvalidRequest(f"`temperature` must be a number from 0 to 1; got `{raw}`.", param="temperature")
    return value


def _language(raw: str | None) -> str | None:
    if raw is None or raw.strip() == "":
        return None
    code = raw.strip().lower()
    if code not in LANGUAGES:
        raise InvalidRequest(
            f"`language` must be an ISO-639-1 code Whisper knows (such as `en` or `de`); got `{raw}`.",
            param="language",
            code="unsupported_language",
        )
    return code


def _bool(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidRequest(f"`{name}` must be `true` or `false`; got `{raw}`.", param=name)

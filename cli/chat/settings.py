"""Generation settings of a chat session, validated as `!set key=value` and command-line options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class SettingError(ValueError):
    """A bad `!set` key or value; the message says what is allowed."""


@dataclass(frozen=True)
class Setting:
    kind: Callable[[str], Any]
    low: float | None = None
    high: float | None = None
    help: str = ""

    def parse(self, key: str, raw: str) -> Any:
        try:
            value = self.kind(raw)
        except ValueError:
            kind = "true or false" if self.kind is boolean else self.kind.__name__
            raise SettingError(f"{key} must be {kind}, got {raw!r}") from None
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SettingError(f"{key} must be within [{self.low}, {self.high}], got {value}")
        return value


def boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


SETTINGS: dict[str, Setting] = {
    "temperature": Setting(float, 0.0, 2.0, "0 is greedy"),
    "top_p": Setting(float, 0.0, 1.0, "nucleus sampling mass"),
    "top_k": Setting(int, 0, None, "0 is off"),
    "min_p": Setting(float, 0.0, 1.0),
    "max_tokens": Setting(int, 1, None, "reply length limit"),
    "seed": Setting(int, None, None, "same seed, same sampled reply"),
    "presence_penalty": Setting(float, -2.0, 2.0),
    "frequency_penalty": Setting(float, -2.0, 2.0),
    "repetition_penalty": Setting(float, 0.01, 10.0),
    "ignore_eos": Setting(boolean, help="keep generating past end-of-sequence (hfserve, vLLM)"),
}
# Sent in the request body's extra fields: not part of OpenAI's own schema.
EXTRA_BODY_KEYS = frozenset({"top_k", "min_p", "repetition_penalty", "ignore_eos"})


def parse_assignments(args: list[str]) -> dict[str, Any]:
    """``["temperature=0", "seed=3"]`` → ``{"temperature": 0.0, "seed": 3}``; all or nothing."""
    if not args:
        raise SettingError("usage: !set key=value ...  (keys: " + ", ".join(SETTINGS) + ")")
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not raw:
            raise SettingError(f"expected key=value, got {arg!r}")
        setting = SETTINGS.get(key)
        if setting is None:
            raise SettingError(f"unknown setting {key!r}; known: " + ", ".join(SETTINGS))
        out[key] = setting.parse(key, raw)
    return out


def request_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Split settings into OpenAI client keyword arguments and ``extra_body``."""
    kwargs = {k: v for k, v in settings.items() if k not in EXTRA_BODY_KEYS}
    extra = {k: v for k, v in settings.items() if k in EXTRA_BODY_KEYS}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs

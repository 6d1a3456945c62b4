"""Splitting a reasoning model's ``<think>...</think>`` from its answer, streaming and whole."""

from __future__ import annotations

from dataclasses import dataclass

from sanic_serve.text import partial_suffix

THINK_START = "<think>"
THINK_END = "</think>"


def template_reasons(chat_template: str | None) -> bool:
    return bool(chat_template) and THINK_END in (chat_template or "")


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Templates such as Qwen3's end the generation prompt inside an open ``<think>``."""
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


@dataclass(slots=True)
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    def __init__(self, in_reasoning: bool) -> None:
        self._in_reasoning = in_reasoning
        self._buffer = ""
        self._after_thought = False  # drop the newlines that separate thought and answer

    def feed(self, text: str) -> Split:
        self._buffer += text
        out = Split()
        while True:
            marker = THINK_END if self._in_reasoning else THINK_START
            at = self._buffer.find(marker)
            if at == -1:
                keep = partial_suffix(self._buffer, [marker])
                ready, self._buffer = (
                    self._buffer[: len(self._buffer) - keep],
                    self._buffer[len(self._buffer) - keep :],
                )
                self._add(out, ready)
                return out
            self._add(out, self._buffer[:at])
            self._buffer = self._buffer[at + len(marker) :]
            self._after_thought = self._in_reasoning
            self._in_reasoning = not self._in_reasoning

    def finish(self) -> Split:
        out = Split()
        self._add(out, self._buffer)
        self._buffer = ""
        return out

    def _add(self, out: Split, text: str) -> None:
        if self._in_reasoning:
            out.reasoning += text
            return
        if self._after_thought:
            text = text.lstrip("\n")
            self._after_thought = not text
        out.content += text

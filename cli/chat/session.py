"""A conversation with an OpenAI-compatible server: streaming turns, tool calls, save and load."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from cli.chat.settings import request_kwargs


class ChatError(RuntimeError):
    """The server is unreachable or answered an error; the message is one line for the user."""


def describe(exc: Exception) -> str:
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach the server ({exc.__cause__ or exc})"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or str(exc)
        return f"server error {exc.status_code}: {message}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    elapsed_s: float = 0.0

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg

    def tokens_per_s(self) -> float:
        tokens = (self.usage or {}).get("completion_tokens", 0)
        return tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ChatSession:
    def __init__(self, base_url: str, api_key: str, model: str | None, settings: dict[str, Any]) -> None:
        self.base_url = base_url.rstrip("/")
        root = self.base_url if self.base_url.endswith("/v1") else self.base_url + "/v1"
        self.client = openai.OpenAI(base_url=root, api_key=api_key or "none", max_retries=0, timeout=600)
        self.model = model
        self.settings = dict(settings)
        self.system: str | None = None
        self.messages: list[dict[str, Any]] = []
        self.tools: list[dict[str, Any]] = []

    # -- server ----------------------------------------------------------------------------------
    def resolve_model(self) -> str:
        """Use --model, else the server's only (or first) model."""
        if self.model:
            return self.model
        try:
            models = [m.id for m in self.client.models.list().data]
        except openai.OpenAIError as exc:
            raise ChatError(describe(exc)) from exc
        if not models:
            raise ChatError("the server lists no models; pass --model")
        self.model = models[0]
        return self.model

    def conversation(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    # -- turns -----------------------------------------------------------------------------------
    def _create(self, **kwargs: Any) -> Any:
        # The conversation is plain dicts and the settings are validated by us; the client's
        # per-field TypedDict overloads add nothing here.
        create: Any = self.client.chat.completions.create
        return create(
            model=self.resolve_model(),
            messages=self.conversation(),
            tools=self.tools or openai.omit,
            **request_kwargs(self.settings),
            **kwargs,
        )

    def stream_reply(self, on_content: Callable[[str], None], on_reasoning: Callable[[str], None]) -> Reply:
        """One streamed completion of the conversation as it stands. Ctrl-C (KeyboardInterrupt)
        closes the connection, which makes the server abort the request."""
        reply = Reply()
        calls: dict[int, dict[str, Any]] = {}
        started = time.monotonic()
        try:
            stream = self._create(stream=True, stream_options={"include_usage": True})
        except openai.OpenAIError as exc:
            raise ChatError(describe(exc)) from exc
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    reply.usage = chunk.usage.model_dump()
                for choice in chunk.choices:
                    delta = choice.delta
                    reasoning = getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get(
                        "reasoning_content"
                    )
                    if reasoning:
                        reply.reasoning += reasoning
                        on_reasoning(reasoning)
                    if delta.content:
                        reply.content += delta.content
                        on_content(delta.content)
                    for tc in delta.tool_calls or []:
                        slot = calls.setdefault(
                            tc.index,
                            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                        )
                        slot["id"] = tc.id or slot["id"]
                        if tc.function is not None:
                            slot["function"]["name"] += tc.function.name or ""
                            slot["function"]["arguments"] += tc.function.arguments or ""
                    if choice.finish_reason:
                        reply.finish_reason = choice.finish_reason
        except openai.OpenAIError as exc:
            raise ChatError(describe(exc)) from exc
        finally:
            stream.close()  # on Ctrl-C too: the server sees the disconnect and aborts
        reply.tool_calls = [calls[i] for i in sorted(calls)]
        reply.elapsed_s = time.monotonic() - started
        return reply

    def complete_once(self) -> dict[str, Any]:
        """A non-streamed completion, returned as the response object (for --json)."""
        try:
            resp = self._create()
        except openai.OpenAIError as exc:
            raise ChatError(describe(exc)) from exc
        return resp.model_dump(exclude_none=True)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "model": self.model,
            "system": self.system,
            "settings": self.settings,
            "messages": self.messages,
        }
        path.write_text(json.dumps(data, indent=2))
        return path

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ChatError(f"cannot load {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ChatError(f"{path} is not a saved conversation")
        self.messages = data["messages"]
        self.system = data.get("system")
        self.settings.update(data.get("settings") or {})

    def reset(self) -> None:
        self.messages = []

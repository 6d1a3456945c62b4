"""Anthropic's Messages request: its body validated with Anthropic's field names (the 400s name
Anthropic's fields, as ``messages.1.content.0``). ``sanic_serve.messages.translate`` turns the
validated request into OpenAI chat's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sanic_serve.chat.types import check_json_limits
from sanic_serve.errors import InvalidRequest
from sanic_serve.protocol import MAX_STOP_SEQUENCES


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations: accepted, no effect here


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ImageBlock(_Block):
    type: Literal["image"]
    source: dict[str, Any]


class DocumentBlock(_Block):
    type: Literal["document"]
    source: dict[str, Any]


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


ResultPart = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class InputMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("input_schema")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_limits(v)
        return v


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(BaseModel):
    # adaptive: the model decides how much to think; to a chat template that is thinking on.
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1024)


class OutputFormat(BaseModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_limits(v)
        return v


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    # effort: how hard the model tries; no knob of a local model's decoding, accepted as a no-op.
    effort: str | None = None
    format: OutputFormat | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # metadata, service_tier, container, ...: no effect here

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's spelling
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class CountTokensRequest(MessagesRequest):
    max_tokens: int | None = Field(default=None, ge=1)  # type: ignore[assignment]
    stream: bool = False


# Pydantic names the union member it tried (``content.list[...]``, ``system.str``); Anthropic names
# the field alone.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _where(loc: tuple[int | str, ...]) -> str:
    parts = []
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            continue
        parts.append(str(part))
    return ".".join(parts)


def _refuse_server_tools(body: dict[str, Any]) -> None:
    """Anthropic's server-side tools (web search, code execution, ...) would run on Anthropic's
    side; nothing here runs them, and ignoring one would answer a different question."""
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            raise InvalidRequest(
                f"tools.{i}: the tool type `{kind}` is not supported by this server; only custom tools "
                "(name, description, input_schema) are.",
                param=f"tools[{i}]",
            )


def parse_messages_request(body: Any, counting: bool = False) -> MessagesRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _refuse_server_tools(body)
    model = CountTokensRequest if counting else MessagesRequest
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        # A union reports each member's failure; the deepest one says what was really wrong
        # (a bad block in a list of blocks, not "content should be a string").
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        where = _where(tuple(first["loc"]))
        raise InvalidRequest(f"{where}: {first['msg']}" if where else first["msg"], param=where) from exc
    if any(s == "" for s in req.stop_sequences or []):
        raise InvalidRequest("stop_sequences: stop sequences must not be empty.", param="stop_sequences")
    if req.tool_choice is not None:
        _check_tool_choice(req)
    thinking = req.thinking
    if thinking is not None and thinking.type == "enabled":
        if thinking.budget_tokens is None:
            raise InvalidRequest("thinking.budget_tokens: Field required", param="thinking.budget_tokens")
        if req.max_tokens is not None and thinking.budget_tokens >= req.max_tokens:
            raise InvalidRequest(
                "`max_tokens` must be greater than `thinking.budget_tokens`.", param="thinking.budget_tokens"
            )
    return req


def _check_tool_choice(req: MessagesRequest) -> None:
    choice = req.tool_choice
    assert choice is not None
    if choice.type == "tool" and not choice.name:
        raise InvalidRequest("tool_choice.name: Field required", param="tool_choice.name")
    if choice.type in ("any", "tool") and not req.tools:
        raise InvalidRequest(f"tool_choice.type `{choice.type}` needs `tools`.", param="tool_choice")
    if choice.type == "tool" and choice.name not in {t.name for t in req.tools or []}:
        raise InvalidRequest(
            f"tool_choice.name: `{choice.name}` is not among the tools offered.", param="tool_choice.name"
        )

"""OpenAI's ``CreateResponse`` body and its validation.

Fields that change the output are honoured or refused with a 400 naming them; ``conversation`` and
``prompt`` (hosted conversations and prompt templates, which this server has not) are refused rather
than ignored. Input items are kept as dicts here and read by ``sanic_serve.responses.items``, which
names the offending ``input[i]`` when one is malformed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sanic_serve.chat.types import FunctionDefinition, JsonSchemaFormat, check_json_limits
from sanic_serve.errors import InvalidRequest
from sanic_serve.protocol import MAX_TOP_LOGPROBS, GenerationFields, parse_request

log = logging.getLogger(__name__)

DEFAULT_MAX_TOOL_CALLS = 8  # server-side tool calls run within one response
MAX_METADATA_KEYS = 16  # OpenAI's limits on metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
INCLUDE_LOGPROBS = "message.output_text.logprobs"
NAMESPACE_SEPARATOR = "__"  # a namespaced function's name for the model: ``<namespace>__<name>``
_MODEL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what chat templates and call parsers take
# Everything OpenAI's ``include`` names; only logprobs change what this server returns (reasoning
# is never encrypted here, its raw text is in the item).
KNOWN_INCLUDES = frozenset(
    {
        INCLUDE_LOGPROBS,
        "reasoning.encrypted_content",
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
    }
)
# Tool types that only OpenAI's own servers run: skipped with a warning, never a 400 (Codex and
# other agents send them with every request).
HOSTED_TOOL_TYPES = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "web_search_2025_08_26",
        "file_search",
        "computer_use_preview",
        "computer",
        "code_interpreter",
        "image_generation",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
    }
)


class TextFormat(BaseModel):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (its fields inline, as the
    Responses API puts them, not under ``json_schema`` as chat does)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json_limits(v)
        return v


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat = Field(default_factory=TextFormat)
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ChatResponseFormat:
    """``text.format`` in the shape ``sampling_params`` reads (chat's ``response_format``)."""

    def __init__(self, fmt: TextFormat) -> None:
        self.type = fmt.type
        self.json_schema = (
            JsonSchemaFormat(name=fmt.name or "response", schema=fmt.schema_ or {})
            if fmt.type == "json_schema"
            else None
        )

    def schema_text(self) -> str | None:
        import json

        if self.type == "json_object":
            return json.dumps({"type": "object"})
        if self.json_schema is not None:
            return json.dumps(self.json_schema.schema_)
        return None


class ResponsesRequest(GenerationFields):
    """``CreateResponse``. ``GenerationFields`` brings the sampling fields chat shares (and its
    extensions: ``seed``, ``top_k``, ``min_p``, ...)."""

    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | list[dict[str, Any]] | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    text: TextConfig = Field(default_factory=TextConfig)
    reasoning: ReasoningConfig | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys are allowed")
        for key, value in v.items():
            if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(
                    f"keys are at most {MAX_METADATA_KEY_CHARS} and values {MAX_METADATA_VALUE_CHARS} "
                    "characters long"
                )
        return v

    @field_validator("include")
    @classmethod
    def _check_include(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in KNOWN_INCLUDES:
                raise ValueError(f"{name!r} is not a known include value")
        return v

    # -- what the chat machinery reads (see sanic_serve.requests.sampling_params) ------------------
    @property
    def max_new_tokens(self) -> int | None:
        return self.max_output_tokens

    @property
    def response_format(self) -> ChatResponseFormat:
        return ChatResponseFormat(self.text.format)

    @property
    def wants_logprobs(self) -> bool:
        return INCLUDE_LOGPROBS in (self.include or [])

    def logprob_count(self) -> int:
        return (self.top_logprobs or 0) if self.wants_logprobs else -1

    @property
    def reasoning_effort(self) -> str | None:
        return self.reasoning.effort if self.reasoning is not None else None

    # -- tools ---------------------------------------------------------------------------------
    def functions(self) -> list[FunctionEntry]:
        """The ``function`` tools, namespaces flattened (validated by ``parse_responses_request``)."""
        return [
            FunctionEntry.of(tool, namespace)
            for _, tool, namespace in _flatten(self.tools, "tools")
            if tool.get("type") == "function"
        ]

    def function_tools(self) -> list[dict[str, Any]]:
        """The ``function`` tools in chat's ``tools`` shape, under the names the model sees."""
        return [entry.chat_tool() for entry in self.functions()]

    def function_origin(self, model_name: str) -> tuple[str | None, str]:
        """A called name the model saw -> (namespace, the client's function name)."""
        for entry in self.functions():
            if entry.model_name == model_name:
                return entry.namespace, entry.name
        return None, model_name

    def mcp_tools(self) -> list[dict[str, Any]]:
        return [t for t in self.tools if t.get("type") == "mcp"]

    @property
    def tool_call_limit(self) -> int:
        return self.max_tool_calls or DEFAULT_MAX_TOOL_CALLS


def namespaced_name(namespace: str | None, name: str) -> str:
    """The name the model sees for a function: namespaced ones carry their namespace, so the same
    function name in two namespaces stays two tools (``crm__lookup``, ``erp__lookup``)."""
    return name if namespace is None else f"{namespace}{NAMESPACE_SEPARATOR}{name}"


@dataclass(frozen=True)
class FunctionEntry:
    """One client function: its name as the client knows it, its namespace, and its tool."""

    name: str
    namespace: str | None
    tool: dict[str, Any]
    namespace_description: str | None = None

    @classmethod
    def of(cls, tool: dict[str, Any], namespace: dict[str, Any] | None) -> FunctionEntry:
        if namespace is None:
            return cls(str(tool["name"]), None, tool)
        return cls(str(tool["name"]), str(namespace["name"]), tool, namespace.get("description"))

    @property
    def model_name(self) -> str:
        return namespaced_name(self.namespace, self.name)

    def chat_tool(self) -> dict[str, Any]:
        fn = {k: self.tool[k] for k in ("description", "parameters", "strict") if k in self.tool}
        if self.namespace_description:  # the namespace's description is shown to the model with it
            fn["description"] = f"{self.namespace_description}\n\n{fn.get('description') or ''}".strip()
        return {"type": "function", "function": {"name": self.model_name, **fn}}


def _flatten(
    tools: list[Any], where: str, namespace: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """Every tool with its place in the request and its ``namespace`` tool (Codex groups its
    functions so); a malformed namespace is a 400 naming it."""
    out: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    for i, tool in enumerate(tools):
        param = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest("A tool must be an object.", param=param)
        if tool.get("type") != "namespace":
            out.append((param, tool, namespace))
            continue
        if namespace is not None:
            raise InvalidRequest("A namespace holds function tools, not namespaces.", param=param)
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("A namespace needs a name (a string).", param=f"{param}.name")
        if not isinstance(tool.get("description"), str | None):
            raise InvalidRequest("description must be a string.", param=f"{param}.description")
        inner = tool.get("tools")
        if not isinstance(inner, list) or not inner:
            raise InvalidRequest("A namespace needs tools: a list of tool objects.", param=f"{param}.tools")
        out += _flatten(inner, f"{param}.tools", tool)
    return out


# Fields of other APIs that the Responses API does not have: a 400 naming them, since a client
# that sends them expects an effect.
_REFUSED = {
    "conversation": "Conversations are not stored by this server; chain responses with previous_response_id.",
    "prompt": "Hosted prompt templates are not available on this server; send input and instructions.",
    "n": "The Responses API generates one output; n is not a field of it.",
}


def parse_responses_request(body: Any) -> ResponsesRequest:
    if isinstance(body, dict):
        for name, why in _REFUSED.items():
            if body.get(name) is not None:
                raise InvalidRequest(why, param=name, code="unsupported_parameter")
    req = parse_request(ResponsesRequest, body, {})
    if isinstance(req.input, list) and not req.input and req.previous_response_id is None:
        raise InvalidRequest("input must not be empty.", param="input")
    if req.background and not req.store:
        raise InvalidRequest("background requires store to be true.", param="background")
    _check_tools(req)
    _check_tool_choice(req)
    if req.text.format.type == "json_schema" and req.text.format.schema_ is None:
        raise InvalidRequest("text.format.schema is required for json_schema.", param="text.format.schema")
    return req


def _check_tools(req: ResponsesRequest) -> None:
    """Function tools (namespaced ones included) are checked here; ``mcp`` tools by
    ``sanic_serve.mcp.tool_spec.parse_mcp_tool``, when the response starts (before its first event)."""
    names: set[str] = set()
    for param, tool, namespace in _flatten(req.tools, "tools"):
        kind = tool.get("type")
        if kind == "function":
            try:
                FunctionDefinition.model_validate(
                    {k: tool.get(k) for k in ("name", "description", "parameters", "strict")}
                )
            except ValueError as exc:
                raise InvalidRequest(f"Invalid function tool: {_first_error(exc)}", param=param) from exc
            entry = FunctionEntry.of(tool, namespace)
            if not _MODEL_NAME.fullmatch(entry.model_name):
                raise InvalidRequest(
                    f"The namespaced name {entry.model_name!r} must be at most 64 letters, digits, _ or -.",
                    param=f"{param}.name",
                )
            if entry.model_name in names:
                raise InvalidRequest(f"Two tools are named {entry.model_name!r}.", param=f"{param}.name")
            names.add(entry.model_name)
        elif kind == "mcp" and namespace is None:
            continue
        elif isinstance(kind, str):
            if kind not in HOSTED_TOOL_TYPES:
                log.warning("skipping tool of unknown type %r", kind)
            else:
                log.warning("skipping tool of type %r: this server does not run it", kind)
        else:
            raise InvalidRequest("A tool needs a type.", param=f"{param}.type")


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)


def _check_tool_choice(req: ResponsesRequest) -> None:
    choice = req.tool_choice
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(f"Unknown tool_choice {choice!r}.", param="tool_choice")
        if choice == "required" and req.text.format.type != "text":
            raise InvalidRequest(
                "tool_choice and text.format cannot both constrain the output.", param="tool_choice"
            )
        return
    kind = choice.get("type")
    if kind == "function":
        chosen_function(req, choice, "tool_choice")
    elif kind == "mcp":
        _check_mcp_entry(req, choice, "tool_choice")
    elif kind == "allowed_tools":
        if choice.get("mode", "auto") not in ("auto", "required"):
            raise InvalidRequest("tool_choice.mode must be auto or required.", param="tool_choice.mode")
        entries = choice.get("tools")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InvalidRequest(
                "tool_choice.tools must be a list of tool objects.", param="tool_choice.tools"
            )
        for i, entry in enumerate(entries):
            if entry.get("type") == "function":
                chosen_function(req, entry, f"tool_choice.tools[{i}]")
            elif entry.get("type") == "mcp":
                _check_mcp_entry(req, entry, f"tool_choice.tools[{i}]")
    else:
        raise InvalidRequest(f"tool_choice of type {kind!r} is not available here.", param="tool_choice")
    if req.text.format.type != "text":
        raise InvalidRequest(
            "tool_choice and text.format cannot both constrain the output.", param="tool_choice"
        )


def chosen_function(req: ResponsesRequest, choice: dict[str, Any], param: str = "tool_choice") -> str:
    """The model's name of the function a choice names: ``name`` (with ``namespace`` for a
    namespaced one, or its namespaced name itself, or its bare name when only one namespace has it)."""
    name, namespace = choice.get("name"), choice.get("namespace")
    if not isinstance(name, str) or not isinstance(namespace, str | None):
        raise InvalidRequest("name (and namespace) must be strings.", param=f"{param}.name")
    entries = req.functions()
    found = [e for e in entries if e.name == name and e.namespace == namespace]
    if namespace is None and not found:
        found = [e for e in entries if e.model_name == name] or [e for e in entries if e.name == name]
    if len(found) != 1:
        shown = namespaced_name(namespace, name)
        why = "is in more than one namespace: give its namespace" if found else "is not among the functions"
        raise InvalidRequest(f"{param} names {shown!r}, which {why} offered.", param=param)
    return found[0].model_name


def _check_mcp_entry(req: ResponsesRequest, choice: dict[str, Any], param: str) -> None:
    labels = {t.get("server_label") for t in req.mcp_tools()}
    label, name = choice.get("server_label"), choice.get("name")
    if not isinstance(label, str) or label not in labels:
        raise InvalidRequest(f"{param} names an mcp server that is not among the tools.", param=param)
    if not isinstance(name, str | None):
        raise InvalidRequest("name must be a string.", param=f"{param}.name")

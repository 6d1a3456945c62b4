"""The parts of a chat request: messages, tools, tool choice and response format (OpenAI's
shapes, including the deprecated functions API's)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sanic_serve.errors import InvalidRequest


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """An assistant's call in the deprecated functions API."""

    name: str
    arguments: str


def legacy_call_id(name: str | None) -> str:
    """The functions API has no call ids; a call and its result are paired by function name."""
    return f"call_{name or 'function'}"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # deprecated functions API

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it; the functions API's shapes become tool calls
        and tool results, which templates know."""
        if self.role == "function":
            return {
                "role": "tool",
                "content": self.text(),
                "name": self.name,
                "tool_call_id": legacy_call_id(self.name),
            }
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.function_call is not None and not self.tool_calls:
            call = self.function_call
            function = {"name": call.name, "arguments": call.arguments}
            msg["tool_calls"] = [{"id": legacy_call_id(call.name), "type": "function", "function": function}]
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_text(self) -> str | None:
        """The JSON schema the output must satisfy; None for free text."""
        if self.type == "json_object":
            return json.dumps({"type": "object"})
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequest("response_format.json_schema is required.", param="response_format")
            return json.dumps(self.json_schema.schema_)
        return None

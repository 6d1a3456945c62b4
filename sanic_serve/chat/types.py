"""The parts of a chat request: messages, tools, tool choice and response format (OpenAI's
shapes, including the deprecated functions API's)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sanic_serve.errors import InvalidRequest

# Limits on a JSON schema (``response_format``, a tool's ``parameters``), checked without recursion
# before anything walks it recursively (serializing, compiling a grammar, rendering a template).
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays
MAX_SCHEMA_BYTES = 256 * 1024  # about: strings by their characters


def check_json_limits(value: Any, what: str = "JSON schema") -> None:
    """Raise ``ValueError`` when ``value`` nests deeper or is larger than the schema limits."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    size = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                raise ValueError(f"the {what} nests deeper than {MAX_SCHEMA_DEPTH} levels")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                size += len(key) + 4 if isinstance(key, str) else 2
                stack.append((child, depth + 1))
        size += len(node) + 2 if isinstance(node, str) else 2
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"the {what} is larger than {MAX_SCHEMA_BYTES // 1024} KB")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str
    # Accepted; the model's processor decides the image's size. Left out of dumps when not sent.
    detail: Literal["auto", "low", "high"] | None = Field(default=None, exclude_if=lambda v: v is None)


class ImageURLPart(BaseModel):
    """An image (a data URL, an http(s) URL, a file under ``--media-root``): read by
    ``sanic_serve.media.load_image`` for a vision-language model, refused by the others."""

    model_config = ConfigDict(extra="allow")

    type: Literal["image_url"]
    image_url: ImageURL


class MediaPart(BaseModel):
    """An audio or file part: read only to be refused (no model here takes them in chat)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["input_audio", "file"]


ContentPart = Annotated[TextPart | ImageURLPart | MediaPart, Field(discriminator="type")]
_MEDIA_NAMES = {"image_url": "images", "input_audio": "audio", "file": "files"}
IMAGE_PART = {"type": "image"}  # an image's part as chat templates read it (HF's message format)


def refuse_media(messages: list[ChatMessage], model: str, takes_images: bool = False) -> None:
    """A 400 naming the first audio or file part, and the first image part unless the model
    ``takes_images``."""
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if isinstance(part, MediaPart) or (isinstance(part, ImageURLPart) and not takes_images):
                raise InvalidRequest(
                    f"The model `{model}` takes no {_MEDIA_NAMES[part.type]}: content parts must be text.",
                    param=f"messages[{i}].content[{j}]",
                    code="unsupported_content_type",
                )


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """Every image part's URL and where it is (``messages[1].content[0].image_url``), in the order
    the chat template shows them."""
    return [
        (part.image_url.url, f"messages[{i}].content[{j}].image_url")
        for i, message in enumerate(messages)
        for j, part in enumerate(message.content if isinstance(message.content, list) else [])
        if isinstance(part, ImageURLPart)
    ]


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
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # deprecated functions API

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def _template_content(self) -> str | list[dict[str, Any]]:
        """The text; or, when the message holds images, its parts in order as HF's chat templates
        take them (``{"type": "image"}``, ``{"type": "text", "text": ...}``): the template puts
        each image's placeholder where the part is."""
        if not isinstance(self.content, list) or not any(isinstance(p, ImageURLPart) for p in self.content):
            return self.text()
        return [
            dict(IMAGE_PART) if isinstance(p, ImageURLPart) else {"type": "text", "text": p.text}
            for p in self.content
            if isinstance(p, ImageURLPart | TextPart)
        ]

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
        msg: dict[str, Any] = {"role": self.role, "content": self._template_content()}
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

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json_limits(v)
        return v


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

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_limits(v)
        return v


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

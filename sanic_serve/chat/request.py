"""OpenAI's Chat Completions request (``CreateChatCompletionRequest``) and its validation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from sanic_serve.chat.types import (
    ChatMessage,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    ToolDefinition,
)
from sanic_serve.errors import InvalidRequest
from sanic_serve.protocol import MAX_TOP_LOGPROBS, UNSUPPORTED_DEFAULTS, GenerationFields, parse_request


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Extra variables for the chat template (e.g. ``enable_thinking``), as vLLM and TGI accept.
    chat_template_kwargs: dict[str, Any] | None = None
    # Given to the chat template of a reasoning model (see sanic_serve.chat.prompt.reasoning_controls).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # Extensions (as in vLLM): leave the prompt open inside the last (assistant) message, so the
    # reply continues it ("prefill"); or render no generation prompt at all.
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    # Deprecated in favour of tools / tool_choice, and served as them (one call at most).
    functions: list[FunctionDefinition] | None = Field(default=None, min_length=1, max_length=128)
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    def logprob_count(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else -1

    @property
    def uses_functions(self) -> bool:
        """The request speaks the functions API: the reply does too (``function_call``)."""
        return self.functions is not None

    def forced_tool(self) -> str | None:
        """None: calls are optional; "": some call is required; a name: that function's call."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "" if self.tool_choice == "required" else None

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """Tools for the chat template; ``tool_choice: none`` offers none, so none is called."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    req = parse_request(ChatCompletionRequest, body, UNSUPPORTED_DEFAULTS)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true.", param="top_logprobs")
    if req.continue_final_message:
        if req.add_generation_prompt and "add_generation_prompt" in (req.model_fields_set or set()):
            raise InvalidRequest(
                "continue_final_message and add_generation_prompt cannot both be true.",
                param="continue_final_message",
            )
        if req.messages[-1].role != "assistant":
            raise InvalidRequest(
                "continue_final_message needs the last message to be the assistant's.",
                param="continue_final_message",
            )
    if req.functions is not None or req.function_call is not None:
        _adopt_functions(req)
    choice_param = "function_call" if req.uses_functions else "tool_choice"
    forced = req.forced_tool()
    if forced is not None:
        if not req.tools:
            raise InvalidRequest(f"{choice_param} names a call but no tools are given.", param=choice_param)
        names = {t.function.name for t in req.tools}
        if forced and forced not in names:
            raise InvalidRequest(
                f"{choice_param} names {forced!r}, which is not among the functions offered.",
                param=choice_param,
            )
        if req.response_format is not None and req.response_format.type != "text":
            raise InvalidRequest(
                f"{choice_param} and response_format cannot both constrain the output.", param=choice_param
            )
    return req


def _adopt_functions(req: ChatCompletionRequest) -> None:
    """The deprecated functions API is the tools API with at most one call per reply."""
    if req.tools is not None or req.tool_choice is not None:
        raise InvalidRequest("Give tools or functions, not both.", param="functions")
    if req.functions is None:
        if isinstance(req.function_call, NamedFunction):
            raise InvalidRequest(
                "function_call names a function but no functions are given.", param="function_call"
            )
        return  # "none" / "auto" with nothing to call: nothing to do
    req.tools = [ToolDefinition(type="function", function=f) for f in req.functions]
    call = req.function_call
    req.tool_choice = (
        NamedToolChoice(type="function", function=call) if isinstance(call, NamedFunction) else call
    )
    req.parallel_tool_calls = False

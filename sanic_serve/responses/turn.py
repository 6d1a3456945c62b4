"""One model turn of a response, made ready to generate: the prompt rendered by the chat template,
the tools offered, the tool choice enforced, the sampling settings. The same pieces as chat's
(``sanic_serve.chat``), with the Responses API's field names in the errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model_host.ipc import HostClient
from model_host.ipc.messages import ImageInput
from model_host.ipc.status import StatusField
from sanic_serve.chat.prompt import reasoning_controls, render_chat
from sanic_serve.chat.tool_choice import ToolUse, tool_use
from sanic_serve.config import ServerConfig
from sanic_serve.errors import InvalidRequest, Overloaded
from sanic_serve.generation import Generation
from sanic_serve.models import ModelBundle, ModelResolver
from sanic_serve.parsing.assembler import ChoiceAssembler, output_parser
from sanic_serve.parsing.call_grammar import forced_call_grammar
from sanic_serve.requests import completion_budget, sampling_params
from sanic_serve.responses.request import ResponsesRequest, chosen_function

# Contexts larger than this (characters) are rendered and tokenised in a thread, so one long
# conversation does not stall the other requests of the worker's event loop.
_OFF_LOOP_MIN_CHARS = 32 * 1024
# Chat's parameter names -> the Responses API's, for the 400s the shared code raises.
_PARAMS = {
    "messages": "input",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "chat_template_kwargs": "input",
}


async def admit(app_ctx: Any, model_id: str) -> ModelBundle:
    """The model (404 when unknown), and a 429 at once when the host's queue is full (the rule
    of ``sanic_serve.requests.admit``, for callers that hold the app, not a request)."""
    models: ModelResolver = app_ctx.models
    bundle = await models.resolve(model_id)
    from model_host.ipc.model_kind import GENERATIVE, ModelKind

    if bundle.kind not in GENERATIVE:  # a vision-language model generates text too
        bundle.require(ModelKind.CAUSAL)
    client: HostClient = app_ctx.client
    config: ServerConfig = app_ctx.config
    free_slots = max(0, config.engine.max_batch_size - client.status.get(StatusField.RUNNING))
    if client.status.get(StatusField.WAITING) >= config.engine.max_queue + free_slots:
        raise Overloaded("The server is busy: too many waiting requests. Retry shortly.")
    return bundle


def renamed(exc: InvalidRequest) -> InvalidRequest:
    """The same 400, naming the Responses API's field."""
    if exc.param in _PARAMS:
        exc.param = _PARAMS[exc.param]
    elif exc.param and exc.param.startswith("messages"):
        exc.param = "input"
    return exc


@dataclass
class Turn:
    generation: Generation
    output: ChoiceAssembler
    use: ToolUse


def forced_choice(
    tool_choice: str | dict[str, Any], offered: list[dict[str, Any]], mcp_names: list[str]
) -> tuple[str | None, list[dict[str, Any]]]:
    """None: calls optional; "": some call of the returned tools is required; a name: that call."""
    if isinstance(tool_choice, str):
        return ("" if tool_choice == "required" else None), offered
    kind = tool_choice.get("type")
    if kind == "function":
        return str(tool_choice["name"]), offered
    if kind == "mcp":
        allowed = [t for t in offered if t["function"]["name"] in mcp_names]
        if not allowed:
            return None, offered  # the server's tools could not be listed: its item says why
        return (mcp_names[0] if len(mcp_names) == 1 else ""), allowed
    if kind == "allowed_tools" and tool_choice.get("mode") == "required":
        return "", offered
    return None, offered


def allowed(
    req: ResponsesRequest,
    tools: list[dict[str, Any]],
    server_functions: Callable[[dict[str, Any]], list[str]] | None = None,
) -> list[dict[str, Any]]:
    """``tool_choice: {"type": "allowed_tools", "tools": [...]}`` offers only those listed.

    ``tools`` are the client's functions (``server_functions`` None), let through by the
    ``function`` entries naming them; or one request's MCP tools, let through by the ``mcp`` entries
    naming their server (and a tool, when the entry has ``name``): ``server_functions`` is
    ``ServerTools.choice_functions``, which knows which server owns which tool."""
    choice = req.tool_choice
    if not isinstance(choice, dict) or choice.get("type") != "allowed_tools":
        return tools
    entries = [e for e in choice.get("tools") or [] if isinstance(e, dict)]  # checked at parse
    names: set[str] = set()
    for entry in entries:
        if server_functions is None and entry.get("type") == "function":
            names.add(chosen_function(req, entry))
        elif server_functions is not None and entry.get("type") == "mcp":
            names.update(server_functions(entry))
    return [t for t in tools if t["function"]["name"] in names]


async def plan_turn(
    app_ctx: Any,
    bundle: ModelBundle,
    req: ResponsesRequest,
    messages: list[dict[str, Any]],
    offered: list[dict[str, Any]],
    tool_choice: str | dict[str, Any],
    mcp_names: list[str],
    max_new_tokens: int | None,
    images: tuple[ImageInput, ...] = (),
) -> Turn:
    """A turn ready to run (nothing submitted to the host yet). Raises ``InvalidRequest``
    naming the Responses field at fault."""
    try:
        return await _plan(
            app_ctx, bundle, req, messages, offered, tool_choice, mcp_names, max_new_tokens, images
        )
    except InvalidRequest as exc:
        raise renamed(exc) from exc


async def _plan(
    app_ctx: Any,
    bundle: ModelBundle,
    req: ResponsesRequest,
    messages: list[dict[str, Any]],
    offered: list[dict[str, Any]],
    tool_choice: str | dict[str, Any],
    mcp_names: list[str],
    max_new_tokens: int | None,
    images: tuple[ImageInput, ...] = (),
) -> Turn:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        tool_choice = {**tool_choice, "name": chosen_function(req, tool_choice)}  # the model's name
    choice_none = tool_choice == "none" and bool(offered)
    use = tool_use(bundle, offered or None, choice_none)
    forced, grammar_tools = forced_choice(tool_choice, offered, mcp_names) if offered else (None, [])
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "mcp" and forced is not None:
        use = ToolUse(grammar_tools, grammar_tools)  # only that server's tools are offered
    effort = req.reasoning_effort
    template_kwargs = reasoning_controls(bundle, effort) if effort else {}
    args = (bundle, messages, use.rendered, template_kwargs)
    if sum(len(str(m.get("content") or "")) for m in messages) >= _OFF_LOOP_MIN_CHARS:
        prompt_ids, prompt_text = await asyncio.get_running_loop().run_in_executor(None, render_chat, *args)
    else:
        prompt_ids, prompt_text = render_chat(*args)
    budget = completion_budget(bundle, len(prompt_ids), max_new_tokens, prompt_param="input")
    grammar = None
    if forced is not None:
        if bundle.call_markup is None:
            raise InvalidRequest(
                f"The model `{bundle.id}` has no known tool-call format to enforce; start the server "
                "with --tool-parser.",
                param="tool_choice",
            )
        grammar = forced_call_grammar(
            bundle.call_markup, grammar_tools, forced or None, bundle.tokenizer.token_to_id
        )
    sampling = sampling_params(req, bundle, budget, grammar=grammar, banned_tokens=use.banned_tokens)
    client: HostClient = app_ctx.client
    generation = Generation(
        client,
        bundle,
        prompt_ids,
        sampling,
        req.stop_strings,
        # A response template may name special tokens as its markers: it must see them.
        keep_special_tokens=bundle.reads_response_template,
        # The context's images, in the order the template shows their placeholders (image_refs).
        images=images,
        prompt_text=prompt_text if images else None,
        prompt_param="input",
    )
    output = ChoiceAssembler(
        output_parser(bundle, prompt_text, use.parsed),
        parallel_tool_calls=req.parallel_tool_calls,
        calls_allowed=use.calls_allowed,
    )
    return Turn(generation, output, use)

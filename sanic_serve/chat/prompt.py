"""Chat template rendering and prompt limits, without transformers' torch-importing tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from sanic_serve.chat.request import ChatCompletionRequest
from sanic_serve.chat.tool_choice import ToolUse, tool_use
from sanic_serve.chat.types import IMAGE_PART
from sanic_serve.errors import InvalidRequest
from sanic_serve.models import ModelBundle

# Set by the server itself; a request may not override them through chat_template_kwargs.
_RESERVED_TEMPLATE_ARGS = frozenset(
    {
        "conversations",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "return_assistant_tokens_mask",
    }
)


def render_chat(
    bundle: ModelBundle,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    continue_final: bool = False,
    generation_prompt: bool = True,
) -> tuple[list[int], str]:
    """Render the conversation with the model's template and tokenize it (the template already
    writes any BOS token, so no special tokens are added, as in ``apply_chat_template``).
    ``continue_final`` leaves the last message open for the reply to continue. Returns the token
    ids and the rendered text."""
    if bundle.chat_template is None:
        raise InvalidRequest(
            f"The model `{bundle.id}` has no chat template; use /v1/completions.", param="model"
        )
    clash = _RESERVED_TEMPLATE_ARGS & set(template_kwargs or {})
    if clash:
        raise InvalidRequest(
            f"chat_template_kwargs may not set {', '.join(sorted(clash))}.", param="chat_template_kwargs"
        )
    kwargs: dict[str, Any] = {**bundle.special_tokens, **(template_kwargs or {})}
    render: Any = render_jinja_template  # annotated as returning str; returns (texts, indices)
    try:
        rendered, _ = render(
            [[_image_parts(m) for m in messages]],
            tools=tools,
            chat_template=bundle.chat_template,
            add_generation_prompt=generation_prompt and not continue_final,
            continue_final_message=continue_final,
            **kwargs,
        )
    except Exception as exc:  # jinja raise_exception(), undefined names, bad message shapes
        raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
    ids = bundle.encode(rendered[0])
    if not ids:  # nothing for the model to read: a forward pass over no tokens cannot run
        raise InvalidRequest("The messages render to an empty prompt.", param="messages")
    return ids, rendered[0]


def _image_parts(message: dict[str, Any]) -> dict[str, Any]:
    """Chat's ``image_url`` parts as HF chat templates take an image (``{"type": "image"}``): the
    template writes the image's placeholder there, which the host's processor expands."""
    content = message.get("content")
    if not isinstance(content, list) or not any(
        isinstance(p, dict) and p.get("type") == "image_url" for p in content
    ):
        return message
    parts = [dict(IMAGE_PART) if isinstance(p, dict) and p.get("type") == "image_url" else p for p in content]
    return {**message, "content": parts}


def reasoning_controls(bundle: ModelBundle, effort: str) -> dict[str, Any]:
    """Chat template variables for ``reasoning_effort``: templates that read ``reasoning_effort``
    themselves (gpt-oss) get it as is; templates with an ``enable_thinking`` switch (Qwen3,
    and others since) think unless the effort is ``none``. A template with neither cannot honour
    it: a 400, not silence."""
    template = bundle.chat_template or ""
    if "reasoning_effort" in template:
        return {"reasoning_effort": effort}
    if "enable_thinking" in template:
        return {"enable_thinking": effort != "none"}
    raise InvalidRequest(
        f"The model `{bundle.id}` has no reasoning control in its chat template.",
        param="reasoning_effort",
    )


@dataclass(frozen=True)
class ChatPrompt:
    """What a chat request's model reads: its token ids and text, and how tools are used."""

    ids: list[int]
    text: str
    use: ToolUse


def render_request(bundle: ModelBundle, req: ChatCompletionRequest) -> ChatPrompt:
    """The one rendering of a chat request: the chat route generates from these ids, and
    ``/tokenize`` answers them, so the two cannot drift apart."""
    choice_none = req.tool_choice == "none" and bool(req.tools)
    # offered_tools() leaves the tools out under tool_choice "none"; tool_use decides here.
    every = [t.model_dump(exclude_none=True) for t in req.tools or []]
    use = tool_use(bundle, every if choice_none else req.offered_tools(), choice_none)
    template_kwargs = reasoning_controls(bundle, req.reasoning_effort) if req.reasoning_effort else {}
    template_kwargs.update(req.chat_template_kwargs or {})  # explicit variables win
    ids, text = render_chat(
        bundle,
        [m.for_template() for m in req.messages],
        use.rendered,
        template_kwargs,
        continue_final=req.continue_final_message,
        generation_prompt=req.add_generation_prompt,
    )
    return ChatPrompt(ids, text, use)

"""Input items -> the conversation a chat template renders.

Every item type the server emits is accepted back as input, since clients replay their history
verbatim: messages (with or without ``type``; ``input_text``, ``output_text`` replays),
``function_call``, ``function_call_output`` (a string or an array of parts), ``reasoning``,
``mcp_list_tools``, ``mcp_call``, ``mcp_approval_request``, ``mcp_approval_response`` and
``item_reference`` (looked up in the store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PreparedContext:
    """What a response is generated from. ``items``: the whole context, oldest first (the stored
    chain's input and output items, then this request's); ``input_items``: this request's own
    items, each with an ``id``, as the store keeps them; ``instructions``: this request's only."""

    items: list[dict[str, Any]] = field(default_factory=list)
    input_items: list[dict[str, Any]] = field(default_factory=list)
    instructions: str | None = None

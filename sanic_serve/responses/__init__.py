"""``/v1/responses``: OpenAI's Responses API.

- ``request``: the ``CreateResponse`` body and its validation;
- ``items``: input items (and a stored chain) -> the conversation the chat template renders;
- ``events``: output items and the ``ResponseStreamEvent`` sequence;
- ``run``: the turn loop (``response_events``), with the seam for server-side tools (``ServerTools``);
- ``route``: ``POST /v1/responses``;
- ``store`` / ``background``: stored responses, retrieval and background runs;
- ``mcp_gateway``: server-side MCP tools.
"""

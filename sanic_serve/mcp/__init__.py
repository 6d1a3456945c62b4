"""The server as an MCP client: the Responses API's ``{"type": "mcp"}`` tools run here.

- ``settings``: what the operator set (``--mcp-config`` servers, the outbound policy, the timeout).
- ``policy``: which URLs the server may reach (no loopback or private addresses unless allowed), checked
  again at connect time on the address actually dialled.
- ``tool_spec``: one request's ``mcp`` tool, validated (400s name ``tools[i].field``), its filters
  (``allowed_tools``, ``require_approval``) and its secrets (``authorization``, ``headers``) kept out of
  anything echoed or stored.
- ``gateway``: list and call tools over streamable HTTP (SSE as the fallback) or stdio; every failure
  is an ``MCPFailure`` with a message safe to show, never an exception that reaches the client.

Torch-free, like all of ``sanic_serve``.
"""

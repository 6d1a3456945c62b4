"""An MCP server for the Responses tests that records every tool call it runs.

The demo model's two tools (``get_weather``, read-only, and ``add``) plus ``slow`` (sleeps), so a test
can tell whether a call reached the server, with which arguments and which ``Authorization`` header.
Each call is appended as one JSON line to the file named by ``MCP_CALL_LOG``.

python tests/mcp_counting_server.py stdio
python tests/mcp_counting_server.py http PORT      (streamable HTTP at /mcp)
python tests/mcp_counting_server.py sse PORT       (the older SSE transport at /sse)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

WEATHER = {"Paris": "sunny, 22 C", "London": "rainy, 14 C", "Tokyo": "cloudy, 18 C", "Berlin": "windy, 10 C"}

server = MCPServer("counting-tools")


def _record(tool: str, args: dict[str, Any], ctx: Context) -> None:
    path = os.environ.get("MCP_CALL_LOG")
    if not path:
        return
    headers = ctx.headers or {}
    line = {
        "tool": tool,
        "args": args,
        "authorization": headers.get("authorization"),
        "x_test": headers.get("x-test"),
    }
    with Path(path).open("a") as out:
        out.write(json.dumps(line) + "\n")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def get_weather(city: str, ctx: Context) -> str:
    """Get the current weather in a city"""
    _record("get_weather", {"city": city}, ctx)
    return json.dumps({"weather": WEATHER.get(city, "unknown")})


@server.tool()
def add(a: int, b: int, ctx: Context) -> str:
    """Add two integers"""
    _record("add", {"a": a, "b": b}, ctx)
    if a == b == 1:
        raise ValueError("the tool failed")
    if a == b == 2:  # a server whose error quotes a header it was sent: redaction must catch it
        raise ToolError(f"refused for X-Test {(ctx.headers or {}).get('x-test')}")  # its text is shown
    return str(a + b)


@server.tool()
async def slow(seconds: float, ctx: Context) -> str:
    """Wait, then answer"""
    _record("slow", {"seconds": seconds}, ctx)
    await anyio.sleep(seconds)
    return "done"


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run(transport="stdio")
    elif sys.argv[1] == "sse":
        server.run(transport="sse", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[2]))

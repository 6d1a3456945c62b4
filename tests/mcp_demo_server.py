"""An MCP server for the chat tests: the two tools the demo model was trained to call.

python tests/mcp_demo_server.py stdio
python tests/mcp_demo_server.py http PORT
"""

from __future__ import annotations

import json
import sys

from mcp.server.mcpserver import MCPServer

WEATHER = {"Paris": "sunny, 22 C", "London": "rainy, 14 C", "Tokyo": "cloudy, 18 C", "Berlin": "windy, 10 C"}

server = MCPServer("demo-tools")


@server.tool()
def get_weather(city: str) -> str:
    """Get the current weather in a city"""
    return json.dumps({"weather": WEATHER.get(city, "unknown")})


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers"""
    if a == b == 1:
        raise ValueError("the tool failed")  # the failing tool of the tests
    return str(a + b)


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run(transport="stdio")
    else:
        server.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[2]))

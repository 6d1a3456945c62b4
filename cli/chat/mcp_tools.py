"""MCP servers as tools for the chat: start them, list their tools, call them, shut them down.

The MCP SDK is async; the chat loop is not. The servers live in one event loop on a background
thread, each in its own long-lived task (its transports are entered and left in that task, as anyio
requires). A failing tool or a dead server becomes an ``Error: ...`` tool result, never a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from concurrent.futures import Future
from contextlib import AsyncExitStack
from typing import Any

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 60.0


def _field(obj: Any, snake: str, camel: str) -> Any:
    # mcp 2.x uses snake_case attributes; 1.x used camelCase.
    return getattr(obj, snake, None) if hasattr(obj, snake) else getattr(obj, camel, None)


class _Server:
    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = spec
        self.session: Any = None
        self.tools: list[dict[str, Any]] = []
        self.error: str | None = None
        self.stop = asyncio.Event()

    async def run(self, ready: asyncio.Future[None]) -> None:
        try:
            async with AsyncExitStack() as stack:
                self.session = await asyncio.wait_for(self._connect(stack), CONNECT_TIMEOUT_S)
                listed = await self.session.list_tools()
                for tool in listed.tools:
                    self.tools.append(
                        {
                            "name": tool.name,
                            "description": tool.description or "",
                            "parameters": _field(tool, "input_schema", "inputSchema") or {"type": "object"},
                        }
                    )
                ready.set_result(None)
                await self.stop.wait()
        except BaseException as exc:  # noqa: BLE001 - a server that fails to start is reported, not fatal
            self.error = f"{type(exc).__name__}: {exc}"
            self.session = None
            if not ready.done():
                ready.set_result(None)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _connect(self, stack: AsyncExitStack) -> Any:
        from mcp import ClientSession

        if "command" in self.spec:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            params = StdioServerParameters(
                command=self.spec["command"],
                args=[str(a) for a in self.spec.get("args", [])],
                env={**os.environ, **{k: str(v) for k, v in (self.spec.get("env") or {}).items()}},
            )
            read, write = await stack.enter_async_context(stdio_client(params))
        else:
            from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client

            http = await stack.enter_async_context(
                create_mcp_http_client(
                    headers={str(k): str(v) for k, v in (self.spec.get("headers") or {}).items()}
                )
            )
            read, write, *_ = await stack.enter_async_context(
                streamable_http_client(self.spec["url"], http_client=http)
            )
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        return session


class MCPTools:
    def __init__(self, servers: dict[str, dict[str, Any]]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp", daemon=True)
        self._thread.start()
        self._servers = [_Server(name, spec) for name, spec in servers.items()]
        self._tasks: list[Future[None]] = []
        readies = [self._submit(self._start(s)) for s in self._servers]
        for ready in readies:
            ready.result(CONNECT_TIMEOUT_S + 5)
        self._by_tool: dict[str, _Server] = {}
        for server in self._servers:
            if server.error:
                log.warning("MCP server %s failed: %s", server.name, server.error)
            for tool in server.tools:
                self._by_tool.setdefault(tool["name"], server)

    def _submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self, server: _Server) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._tasks.append(asyncio.ensure_future(server.run(ready)))  # type: ignore[arg-type]
        await ready

    @property
    def failures(self) -> dict[str, str]:
        return {s.name: s.error for s in self._servers if s.error}

    def listing(self) -> list[tuple[str, dict[str, Any]]]:
        return [(s.name, t) for s in self._servers for t in s.tools]

    def openai_tools(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t["description"],
                    "parameters": t["parameters"],
                },
            }
            for name, t in self.listing()
            if self._by_tool.get(t["name"]) is not None and self._by_tool[t["name"]].name == name
        ]

    def call(self, name: str, arguments: str) -> str:
        """Run a tool; any failure comes back as an ``Error: ...`` result for the model."""
        server = self._by_tool.get(name)
        if server is None:
            return f"Error: no tool named {name!r}"
        try:
            args = json.loads(arguments or "{}")
        except ValueError as exc:
            return f"Error: the arguments are not valid JSON: {exc}"
        if server.session is None:
            return f"Error: MCP server {server.name!r} is not running ({server.error})"
        try:
            coro = asyncio.wait_for(server.session.call_tool(name, args), CALL_TIMEOUT_S)
            result = self._submit(coro).result(CALL_TIMEOUT_S + 5)
        except Exception as exc:  # noqa: BLE001 - a dead server or a transport error
            return f"Error: {type(exc).__name__}: {exc}"
        text = "\n".join(getattr(c, "text", "") or json.dumps(getattr(c, "data", "")) for c in result.content)
        if _field(result, "is_error", "isError"):
            return f"Error: {text}"
        return text

    def close(self) -> None:
        for server in self._servers:
            self._loop.call_soon_threadsafe(server.stop.set)
        for task in self._tasks:
            try:
                self._submit(asyncio.wait_for(asyncio.shield(task), 10)).result(15)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

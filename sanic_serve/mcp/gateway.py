"""List and call the tools of MCP servers, for one HTTP worker.

A request's server (``server_url``) is reached afresh for each operation, over streamable HTTP, or
over the older SSE transport when the server answers streamable HTTP's first POST with a 4xx (the
MCP spec's backwards-compatibility rule). A server of ``--mcp-config`` started by command (stdio)
runs once per worker, started on first use and restarted after it fails; one by URL is reached like
a request's, with its configured headers under the request's and without the outbound policy (the
operator chose it).

Every operation is bounded by ``--mcp-timeout-s`` and every failure is an ``MCPFailure``: a message
safe for the client (no exception text of ours, remote text with every header value sent redacted) and
the ``MCPToolCallError`` object OpenAI's ``mcp_call.error`` carries. Nothing here logs a header.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2
from mcp import ClientSession
from mcp.shared.exceptions import MCPError

from sanic_serve.mcp.policy import OutboundPolicy, PolicyRefused, http_client
from sanic_serve.mcp.settings import MCPSettings
from sanic_serve.mcp.tool_spec import MCPToolSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[ClientSession], Awaitable[T]]

_MAX_LIST_PAGES = 20  # a server whose cursor never ends cannot keep a response waiting
_MAX_REMOTE_TEXT = 500  # characters of a server's error message shown to the client
_FALLBACK_STATUSES = (400, 404, 405)  # streamable HTTP refused: try SSE
_STOP_WAIT_S = 5.0


class MCPFailure(Exception):
    """An MCP operation that failed; ``message`` is safe to show, ``error`` is the call item's."""

    def __init__(self, message: str, error: dict[str, Any]) -> None:
        super().__init__(message)
        self.message = message
        self.error = error


@dataclass(frozen=True)
class CallOutcome:
    output: str | None  # the tool's text result
    error: dict[str, Any] | None  # or why it failed (an ``MCPToolCallError`` object)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def error_text(self) -> str:
        """The failure in words, for the model's context."""
        if self.error is None:
            return ""
        if self.error.get("type") == "mcp_tool_execution_error":
            return _content_text(self.error.get("content"))
        return str(self.error.get("message", "the tool call failed"))


def protocol_error(code: int, message: str) -> dict[str, Any]:
    return {"type": "mcp_protocol_error", "code": code, "message": message}


def http_error(code: int, message: str) -> dict[str, Any]:
    return {"type": "http_error", "code": code, "message": message}


class MCPGateway:
    """One per HTTP worker (``app.ctx.mcp``)."""

    def __init__(self, settings: MCPSettings) -> None:
        self.settings = settings
        self._policy = OutboundPolicy(settings.allow_private, settings.allow_hosts)
        self._stdio: dict[str, _StdioServer] = {}
        # httpx logs every request line at INFO: one per MCP message is noise in the server's log.
        for name in ("httpx2", "httpcore2", "httpx", "httpcore"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))

    async def list_tools(self, spec: MCPToolSpec) -> list[dict[str, Any]]:
        """The server's tools as ``MCPListToolsTool`` dicts, all of them (``allowed_tools`` is the
        caller's to apply). Raises ``MCPFailure``."""

        async def op(session: ClientSession) -> list[dict[str, Any]]:
            import mcp_types

            tools: list[dict[str, Any]] = []
            cursor: str | None = None
            for _ in range(_MAX_LIST_PAGES):
                params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
                listed = await session.list_tools(params=params)
                tools += [_tool_dict(t) for t in listed.tools]
                cursor = listed.next_cursor
                if not cursor:
                    break
            return tools

        return await self._bounded(spec, "list tools", op)

    async def call_tool(self, spec: MCPToolSpec, name: str, arguments: dict[str, Any]) -> CallOutcome:
        """Run one tool; its failure (or the server's) is in the outcome, never raised."""

        async def op(session: ClientSession) -> CallOutcome:
            result = await session.call_tool(name, arguments)
            text = spec.redact(_result_text(result))
            if getattr(result, "is_error", False):
                content = [{"type": "text", "text": text}]
                return CallOutcome(None, {"type": "mcp_tool_execution_error", "content": content})
            return CallOutcome(text, None)

        try:
            return await self._bounded(spec, f"call {name!r}", op)
        except MCPFailure as failure:
            return CallOutcome(None, failure.error)

    async def close(self) -> None:
        await asyncio.gather(*(s.stop() for s in self._stdio.values()), return_exceptions=True)
        self._stdio.clear()

    # -- running one operation -----------------------------------------------------------------
    async def _bounded(self, spec: MCPToolSpec, what: str, op: Op[T]) -> T:
        """``op`` within the timeout, in a task of its own: a server that stops answering, or a
        transport's clean-up that waits on one, never holds the response past the timeout."""
        timeout_s = self.settings.timeout_s
        task = asyncio.ensure_future(self._with_session(spec, op))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
        except asyncio.CancelledError:  # the response itself was stopped (client gone, cancel)
            task.cancel()
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            self._forget_stdio(spec)
            failure = MCPFailure(
                f"The MCP server {spec.label!r} did not answer within {timeout_s:g} s.",
                http_error(504, f"No answer within {timeout_s:g} s."),
            )
            log.warning("MCP %s on %r: no answer within %g s", what, spec.label, timeout_s)
            raise failure
        try:
            return task.result()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an item, not a 5xx
            failure = self._failure(spec, exc)
            log.warning("MCP %s on %r failed: %s", what, spec.label, failure.message)
            log.debug("MCP failure detail: %s", spec.redact(repr(exc)))
            if not isinstance(_leaf(exc), MCPError):
                self._forget_stdio(spec)
            raise failure from None

    async def _with_session(self, spec: MCPToolSpec, op: Op[T]) -> T:
        configured = spec.configured
        if configured is not None and "command" in configured:
            server = self._stdio.get(spec.label)
            if server is None:
                server = self._stdio[spec.label] = _StdioServer(spec.label, configured)
            return await op(await server.session())
        if configured is not None:  # its headers: the configured ones merged with the request's
            return await self._over_http(str(configured["url"]), spec.headers, None, op)
        assert spec.url is not None
        return await self._over_http(spec.url, spec.headers, self._policy, op)

    async def _over_http(
        self, url: str, headers: dict[str, str], policy: OutboundPolicy | None, op: Op[T]
    ) -> T:
        statuses: list[int] = []

        async def record(response: httpx2.Response) -> None:
            statuses.append(response.status_code)

        timeout = httpx2.Timeout(self.settings.timeout_s)
        hooks = {"response": [record]}
        initialized = False
        try:
            from mcp.client.streamable_http import streamable_http_client

            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(
                    http_client(policy=policy, headers=headers, timeout=timeout, event_hooks=hooks)
                )
                read, write = await stack.enter_async_context(streamable_http_client(url, http_client=client))
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                initialized = True
                return await op(session)
        except Exception as exc:
            if initialized or not statuses or statuses[0] not in _FALLBACK_STATUSES:
                raise _with_status(exc, statuses) from exc
        return await self._over_sse(url, headers, policy, op)

    async def _over_sse(
        self, url: str, headers: dict[str, str], policy: OutboundPolicy | None, op: Op[T]
    ) -> T:
        from mcp.client.sse import sse_client

        def factory(
            headers: dict[str, str] | None = None,
            timeout: httpx2.Timeout | None = None,
            auth: httpx2.Auth | None = None,
        ) -> httpx2.AsyncClient:
            return http_client(policy=policy, headers=headers, timeout=timeout, auth=auth)

        timeout_s = self.settings.timeout_s
        async with AsyncExitStack() as stack:
            read, write = await stack.enter_async_context(
                sse_client(
                    url,
                    headers=headers,
                    timeout=timeout_s,
                    sse_read_timeout=timeout_s,
                    httpx_client_factory=factory,
                )
            )
            session = await stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            return await op(session)

    def _forget_stdio(self, spec: MCPToolSpec) -> None:
        """A stdio server that timed out or broke is restarted on its next use."""
        server = self._stdio.pop(spec.label, None) if spec.configured is not None else None
        if server is not None:
            task = asyncio.ensure_future(server.stop())
            task.add_done_callback(_consume)

    def _failure(self, spec: MCPToolSpec, exc: BaseException) -> MCPFailure:
        leaf = _leaf(exc)
        label = spec.label
        status = getattr(exc, "http_status", None)
        if isinstance(leaf, MCPError) and status is None:
            remote = spec.redact(leaf.message)[:_MAX_REMOTE_TEXT]
            return MCPFailure(
                f"The MCP server {label!r} answered with an error: {remote}",
                protocol_error(leaf.code, remote),
            )
        refused = _find(exc, PolicyRefused)
        if refused is not None:
            return MCPFailure(str(refused), http_error(403, str(refused)))
        if status is not None:
            return MCPFailure(
                f"The MCP server {label!r} answered HTTP {status}.", http_error(status, f"HTTP {status}")
            )
        if isinstance(leaf, httpx2.HTTPStatusError):
            code = leaf.response.status_code
            return MCPFailure(
                f"The MCP server {label!r} answered HTTP {code}.", http_error(code, f"HTTP {code}")
            )
        if isinstance(leaf, httpx2.TimeoutException | TimeoutError):
            return MCPFailure(
                f"The MCP server {label!r} did not answer in time.", http_error(504, "The server timed out.")
            )
        if isinstance(leaf, httpx2.TransportError):
            return MCPFailure(
                f"Could not connect to the MCP server {label!r}.", http_error(502, "Could not connect.")
            )
        if isinstance(leaf, OSError) and spec.configured is not None:
            return MCPFailure(
                f"The MCP server {label!r} could not be started.", protocol_error(-32000, "Could not start.")
            )
        return MCPFailure(
            f"The MCP server {label!r} failed or closed the connection.",
            protocol_error(-32603, "The connection to the server failed."),
        )


class _StdioServer:
    """A ``--mcp-config`` server run by command: one process per worker, kept between requests.
    Its transports live in one task of their own (anyio wants them entered and left in the same
    task); requests use the session from theirs."""

    def __init__(self, label: str, config: dict[str, Any]) -> None:
        self.label = label
        self.config = config
        self._ready: asyncio.Future[ClientSession] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def session(self) -> ClientSession:
        if self._task is None or self._task.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(self._ready), name=f"mcp-stdio-{self.label}")
        assert self._ready is not None
        return await asyncio.shield(self._ready)

    async def _run(self, ready: asyncio.Future[ClientSession]) -> None:
        from mcp.client.stdio import StdioServerParameters, stdio_client

        # The server's own environment is not handed on (it may hold keys): the SDK's safe
        # defaults (PATH, HOME, ...) and what the config gives.
        params = StdioServerParameters(
            command=self.config["command"],
            args=[str(a) for a in self.config.get("args") or []],
            env={str(k): str(v) for k, v in (self.config.get("env") or {}).items()},
            cwd=self.config.get("cwd"),
        )
        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(stdio_client(params))
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                log.info("MCP server %r started (stdio)", self.label)
                ready.set_result(session)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError("stopped"))
                ready.add_done_callback(_consume)
            if not isinstance(exc, Exception):
                raise

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), _STOP_WAIT_S)
            except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 - going anyway
                self._task.cancel()


# -- helpers ---------------------------------------------------------------------------------------
class _HTTPStatusFailure(Exception):
    """A streamable-HTTP failure whose cause is an HTTP status the transport did not pass on."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.http_status = status


def _with_status(exc: Exception, statuses: list[int]) -> Exception:
    errors = [s for s in statuses if s >= 400]
    return _HTTPStatusFailure(errors[0]) if errors and isinstance(_leaf(exc), MCPError) else exc


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as anyio's task groups raise them."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _find(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        else:
            exc = exc.__cause__ or exc.__context__
    return None


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _tool_dict(tool: Any) -> dict[str, Any]:
    annotations = getattr(tool, "annotations", None)
    return {
        "name": tool.name,
        "description": getattr(tool, "description", None),
        "input_schema": getattr(tool, "input_schema", None) or {"type": "object", "properties": {}},
        "annotations": annotations.model_dump(by_alias=True, exclude_none=True) if annotations else None,
    }


def _result_text(result: Any) -> str:
    """A tool result as the string ``mcp_call.output`` carries: its text parts joined, other parts
    (images, resources) as JSON, structured content as JSON when there is nothing else."""
    parts = []
    for content in getattr(result, "content", None) or []:
        text = getattr(content, "text", None)
        parts.append(
            text if isinstance(text, str) else json.dumps(content.model_dump(mode="json", exclude_none=True))
        )
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(str(c.get("text", "")) if isinstance(c, dict) else str(c) for c in content)
    return str(content or "")

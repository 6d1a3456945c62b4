"""One request's ``{"type": "mcp", ...}`` tool: validated, its filters, and its secrets kept in.

``authorization`` and ``headers`` are sent to the MCP server and to nothing else (the response's echo
of the tools leaves them out, ``responses.events.echoed_tools``); for a URL server of ``--mcp-config``
they are merged over its configured headers. ``redact`` scrubs every value sent (the request's and the
configured ones) out of any text that came back from the server (an error message that quotes a
header) before it is shown, stored or logged.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from sanic_serve.errors import InvalidRequest
from sanic_serve.mcp.policy import IPAddress, OutboundPolicy, PolicyRefused, split_url
from sanic_serve.mcp.settings import MCPSettings

_REDACTED = "[redacted]"
_MAX_HEADER_CHARS = 8192
_MAX_LABEL_CHARS = 64


@dataclass(frozen=True)
class ToolFilter:
    """OpenAI's ``MCPToolFilter``: tool names and/or the read-only hint; both must hold when both
    are given. ``None`` fields do not constrain."""

    tool_names: frozenset[str] | None = None
    read_only: bool | None = None

    @property
    def empty(self) -> bool:
        return self.tool_names is None and self.read_only is None

    def matches(self, name: str, annotations: dict[str, Any] | None) -> bool:
        if self.empty:
            return False
        if self.tool_names is not None and name not in self.tool_names:
            return False
        if self.read_only is not None:
            hint = (annotations or {}).get("readOnlyHint", (annotations or {}).get("read_only_hint"))
            if bool(hint) is not self.read_only:
                return False
        return True


@dataclass(frozen=True)
class MCPToolSpec:
    label: str
    url: str | None  # None: a server of --mcp-config, by label
    configured: dict[str, Any] | None  # that server's --mcp-config entry
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # sent to the server only
    description: str | None = None
    allowed: ToolFilter | None = None  # None: every tool of the server
    approval_default: bool = True  # "always" unless "never"
    approval_always: ToolFilter = ToolFilter()
    approval_never: ToolFilter = ToolFilter()

    def __repr__(self) -> str:  # never the headers
        return f"MCPToolSpec(label={self.label!r}, url={self.url!r})"

    def allows(self, name: str, annotations: dict[str, Any] | None) -> bool:
        return self.allowed is None or self.allowed.empty or self.allowed.matches(name, annotations)

    def needs_approval(self, name: str, annotations: dict[str, Any] | None) -> bool:
        if self.approval_always.matches(name, annotations):
            return True
        if self.approval_never.matches(name, annotations):
            return False
        return self.approval_default

    def redact(self, text: str) -> str:
        """``text`` with every secret this tool carries replaced (longest first, so a bearer value
        inside its ``Authorization`` header goes as a whole)."""
        secrets: set[str] = set()
        for value in self.headers.values():
            secrets |= {value, value.split(" ", 1)[-1]}  # "Bearer TOKEN" and TOKEN
        secrets = {s for s in secrets if len(s) >= 4}  # shorter would mangle ordinary text
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, _REDACTED)
        return text


def parse_mcp_tool(tool: dict[str, Any], param: str, settings: MCPSettings) -> MCPToolSpec:
    """Validate one ``mcp`` tool; ``param`` is its place in the request (``tools[2]``). The URL
    checks that need no name lookup happen here; names are checked as they are dialled
    (``policy.GuardedBackend``)."""
    label = tool.get("server_label")
    if not isinstance(label, str) or not label.strip():
        raise InvalidRequest("An mcp tool needs a server_label.", param=f"{param}.server_label")
    if len(label) > _MAX_LABEL_CHARS:
        raise InvalidRequest(
            f"server_label is at most {_MAX_LABEL_CHARS} characters long.", param=f"{param}.server_label"
        )
    for name in ("connector_id", "tunnel_id"):
        if tool.get(name) is not None:
            raise InvalidRequest(
                f"{name} is not available on this server: give server_url, or a server_label that names "
                "a server of its --mcp-config.",
                param=f"{param}.{name}",
                code="unsupported_parameter",
            )
    url = tool.get("server_url")
    configured = None
    if url is None:
        configured = settings.servers.get(label)
        if configured is None:
            raise InvalidRequest(
                f"server_url is required: no MCP server labelled {label!r} is configured on this server.",
                param=f"{param}.server_url",
            )
    elif not isinstance(url, str):
        raise InvalidRequest("server_url must be a string.", param=f"{param}.server_url")
    else:
        try:
            host, _ = split_url(url)
            policy = OutboundPolicy(settings.allow_private, settings.allow_hosts)
            policy.check_host_name(host)
            literal = _literal_address(host)
            if literal is not None:  # no name to look up: refused now, as a 400
                policy.check_address(literal)
        except PolicyRefused as exc:
            raise InvalidRequest(str(exc), param=f"{param}.server_url", code="mcp_server_refused") from exc
    description = tool.get("server_description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequest("server_description must be a string.", param=f"{param}.server_description")
    default, always, never = _approval(tool.get("require_approval"), f"{param}.require_approval")
    headers = _headers(tool, param)
    if configured is not None and "url" in configured:
        # A configured URL server gets its configured headers and the request's, the request's
        # winning; both sets are secrets that redaction must know.
        headers = merge_headers(configured.get("headers") or {}, headers)
    return MCPToolSpec(
        label=label,
        url=url,
        configured=configured,
        headers=headers,
        description=description,
        allowed=_allowed(tool.get("allowed_tools"), f"{param}.allowed_tools"),
        approval_default=default,
        approval_always=always,
        approval_never=never,
    )


def _literal_address(host: str) -> IPAddress | None:
    """The address a host names without a lookup: an IP literal, or loopback for ``localhost``
    (RFC 6761 reserves it and its subdomains for loopback)."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return ipaddress.ip_address("127.0.0.1")
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _headers(tool: dict[str, Any], param: str) -> dict[str, str]:
    headers = tool.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "\n" not in k + v and "\r" not in k + v
        for k, v in headers.items()
    ):
        raise InvalidRequest("headers must be an object of string values.", param=f"{param}.headers")
    if sum(len(k) + len(v) for k, v in headers.items()) > _MAX_HEADER_CHARS:
        raise InvalidRequest("headers are too large.", param=f"{param}.headers")
    out = dict(headers)
    authorization = tool.get("authorization")
    if authorization is not None:
        if not isinstance(authorization, str) or "\n" in authorization or "\r" in authorization:
            raise InvalidRequest("authorization must be a string.", param=f"{param}.authorization")
        # OpenAI sends the token as a bearer token; one given with its scheme is sent as is.
        scheme = authorization.split(" ", 1)[0].lower()
        out["Authorization"] = authorization if scheme in ("bearer", "basic") else f"Bearer {authorization}"
    return out


def merge_headers(configured: dict[str, Any], requested: dict[str, str]) -> dict[str, str]:
    """``configured`` overlaid by ``requested``; header names compare case-insensitively, so a
    request's ``Authorization`` replaces a configured ``authorization`` instead of joining it."""
    overridden = {name.lower() for name in requested}
    merged = {str(k): str(v) for k, v in configured.items() if str(k).lower() not in overridden}
    return {**merged, **requested}


def _filter(value: Any, param: str) -> ToolFilter:
    if isinstance(value, list):
        if not all(isinstance(n, str) for n in value):
            raise InvalidRequest("Tool names must be strings.", param=param)
        return ToolFilter(tool_names=frozenset(value))
    if isinstance(value, dict):
        unknown = set(value) - {"tool_names", "read_only"}
        if unknown:
            raise InvalidRequest(f"Unknown filter field {sorted(unknown)[0]!r}.", param=param)
        names = value.get("tool_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise InvalidRequest("tool_names must be a list of strings.", param=f"{param}.tool_names")
        read_only = value.get("read_only")
        if read_only is not None and not isinstance(read_only, bool):
            raise InvalidRequest("read_only must be a boolean.", param=f"{param}.read_only")
        return ToolFilter(frozenset(names) if names is not None else None, read_only)
    raise InvalidRequest("Expected a list of tool names or a filter object.", param=param)


def _allowed(value: Any, param: str) -> ToolFilter | None:
    return None if value is None else _filter(value, param)


def _approval(value: Any, param: str) -> tuple[bool, ToolFilter, ToolFilter]:
    """``require_approval``: ``"always"`` (the default, as OpenAI's), ``"never"``, or
    ``{"always": filter, "never": filter}``, where a tool that neither filter names needs approval."""
    if value is None or value == "always":
        return True, ToolFilter(), ToolFilter()
    if value == "never":
        return False, ToolFilter(), ToolFilter()
    if isinstance(value, dict):
        unknown = set(value) - {"always", "never"}
        if unknown:
            raise InvalidRequest(f"Unknown require_approval field {sorted(unknown)[0]!r}.", param=param)
        always = (
            _filter(value["always"], f"{param}.always") if value.get("always") is not None else ToolFilter()
        )
        never = _filter(value["never"], f"{param}.never") if value.get("never") is not None else ToolFilter()
        return True, always, never
    raise InvalidRequest("require_approval must be 'always', 'never' or a filter object.", param=param)

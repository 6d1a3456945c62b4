"""What the operator configures for server-side MCP: picklable, shared by every HTTP worker."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MCP_TIMEOUT_S = 30.0


class MCPConfigError(ValueError):
    """An ``--mcp-config`` file that cannot be used: one line saying what is wrong."""


@dataclass(frozen=True)
class MCPSettings:
    # Servers named in ``--mcp-config`` by label: ``{"command", "args", "env", "cwd"}`` (stdio) or
    # ``{"url", "headers"}``. The operator chose them, so the outbound policy does not apply to them.
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    allow_private: bool = False  # loopback, private, link-local... addresses for request URLs
    # When not empty, request URLs must name one of these hosts (``*.example.com`` for subdomains).
    allow_hosts: tuple[str, ...] = ()
    # One MCP operation (connect + initialize + list or call) may take this long.
    timeout_s: float = DEFAULT_MCP_TIMEOUT_S


def load_config(path: Path) -> dict[str, dict[str, Any]]:
    """The ``{"mcpServers": {name: {command, args, env} | {url, headers}}}`` format MCP clients
    share (Claude Desktop, Cursor, ``hfserve chat``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MCPConfigError(f"cannot read MCP config {path}: {exc}") from exc
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise MCPConfigError(f"{path}: expected an object with an 'mcpServers' object")
    for name, spec in servers.items():
        if not isinstance(spec, dict) or not ("command" in spec or "url" in spec):
            raise MCPConfigError(f"{path}: server {name!r} needs a 'command' or a 'url'")
        if "command" in spec and not isinstance(spec["command"], str):
            raise MCPConfigError(f"{path}: server {name!r}: 'command' must be a string")
        if "url" in spec and not (
            isinstance(spec["url"], str) and spec["url"].startswith(("http://", "https://"))
        ):
            raise MCPConfigError(f"{path}: server {name!r}: 'url' must be an http or https URL")
        for key in ("args",):
            if key in spec and not isinstance(spec[key], list):
                raise MCPConfigError(f"{path}: server {name!r}: {key!r} must be a list")
        for key in ("env", "headers"):
            if key in spec and not isinstance(spec[key], dict):
                raise MCPConfigError(f"{path}: server {name!r}: {key!r} must be an object")
    return servers


def settings_from_options(
    config_path: Path | None, allow_private: bool, allow_hosts: str | None, timeout_s: float
) -> MCPSettings:
    """``hfserve start``'s ``--mcp-*`` options; a config that cannot be used is an ``MCPConfigError``
    at start, not a failure on the first request."""
    servers = load_config(config_path) if config_path is not None else {}
    hosts = tuple(h.strip() for h in (allow_hosts or "").split(",") if h.strip())
    return MCPSettings(servers=servers, allow_private=allow_private, allow_hosts=hosts, timeout_s=timeout_s)

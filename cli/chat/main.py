"""Entry points of `hfserve chat`: the interactive loop and the one-shot mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from cli.chat.mcp_tools import MCPTools
from cli.chat.session import ChatError, ChatSession
from sanic_serve.mcp.settings import MCPConfigError, load_config  # the format --mcp-config shares


def _tools(mcp_config: Path | None, console: Console) -> MCPTools | None:
    if mcp_config is None:
        return None
    tools = MCPTools(load_config(mcp_config))
    for name, error in tools.failures.items():
        console.print(f"[yellow]MCP server {name} is unavailable: {error}[/yellow]")
    return tools


def run_one_shot(
    session: ChatSession, prompt: str, as_json: bool, mcp_config: Path | None, max_tool_rounds: int
) -> int:
    """Answer one question on stdout (the final response object with ``as_json``); errors are one
    line on stderr and exit code 1. Tools run without asking: there is nobody to ask."""
    err = Console(stderr=True)
    tools = None
    try:
        tools = _tools(mcp_config, err)
        session.tools = tools.openai_tools() if tools else []
        session.messages.append({"role": "user", "content": prompt})
        response: dict[str, Any] = {}
        for _ in range(max_tool_rounds + 1):
            response = session.complete_once()
            message = response["choices"][0]["message"]
            session.messages.append(
                {k: v for k, v in message.items() if k in ("role", "content", "tool_calls")}
            )
            if not message.get("tool_calls") or tools is None:
                break
            for call in message["tool_calls"]:
                result = tools.call(call["function"]["name"], call["function"]["arguments"])
                session.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        if as_json:
            print(json.dumps(response, indent=2))
        else:
            print(response["choices"][0]["message"].get("content") or "")
        return 0
    except (ChatError, MCPConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if tools is not None:
            tools.close()


def run_interactive(
    session: ChatSession,
    save_dir: Path,
    mcp_config: Path | None,
    confirm_tools: bool,
    max_tool_rounds: int,
) -> int:
    from cli.chat.repl import Repl

    console = Console(highlight=False)
    tools = None
    try:
        tools = _tools(mcp_config, console)
        session.tools = tools.openai_tools() if tools else []
        session.resolve_model()
        Repl(session, console, save_dir, tools, confirm_tools, max_tool_rounds).run()
        return 0
    except (ChatError, MCPConfigError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        if tools is not None:
            tools.close()

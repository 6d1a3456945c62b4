"""The interactive loop of `hfserve chat`: line editing, history, !-commands, streaming, tools."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from cli.chat.mcp_tools import MCPTools
from cli.chat.session import ChatError, ChatSession, Reply
from cli.chat.settings import SETTINGS, SettingError, parse_assignments

HELP = """Commands:
  !help                 this help
  !new, !clear          start a new conversation
  !save [NAME]          save the conversation (JSON) in the save folder
  !load NAME            load a saved conversation
  !set key=value ...    change settings: {keys}
  !system TEXT          set the system prompt (empty clears it)
  !status               server, model, settings
  !model NAME           switch model
  !tools                the MCP tools on offer
  !exit                 leave (Ctrl-D too)
End a line with \\ to continue on the next; Alt-Enter also inserts a newline.
Ctrl-C stops a reply and keeps the conversation."""


class Repl:
    def __init__(
        self,
        session: ChatSession,
        console: Console,
        save_dir: Path,
        tools: MCPTools | None,
        confirm_tools: bool,
        max_tool_rounds: int,
    ) -> None:
        self.session = session
        self.console = console
        self.save_dir = save_dir
        self.tools = tools
        self.confirm_tools = confirm_tools
        self.max_tool_rounds = max_tool_rounds
        self._ask: Callable[[str], str] = self._make_prompt()
        self.commands: dict[str, Callable[[str], bool]] = {
            "help": self._help,
            "new": self._new,
            "clear": self._new,
            "save": self._save,
            "load": self._load,
            "set": self._set,
            "system": self._system,
            "status": self._status,
            "model": self._model,
            "tools": self._tools,
            "exit": lambda _: False,
            "quit": lambda _: False,
        }

    def _make_prompt(self) -> Callable[[str], str]:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings

        self.save_dir.mkdir(parents=True, exist_ok=True)
        keys = KeyBindings()

        @keys.add("escape", "enter")
        def _newline(event: Any) -> None:
            event.current_buffer.insert_text("\n")

        prompt: PromptSession[str] = PromptSession(
            history=FileHistory(str(self.save_dir / "history")), key_bindings=keys
        )
        return lambda text: str(prompt.prompt(text))

    def read_input(self) -> str:
        lines = [self._ask(">>> ")]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self._ask("... "))
        return "\n".join(lines)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        # Ctrl-C stops a reply: a process started with SIGINT ignored (Python keeps an inherited
        # SIG_IGN) would never see it, so the default handler is put back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.console.print(
            f"hfserve chat: {escape(self.session.base_url)}, model "
            f"{escape(self.session.resolve_model())}. !help for commands."
        )
        while True:
            try:
                text = self.read_input()
            except (KeyboardInterrupt, EOFError):
                self.console.print("bye")
                return
            if not text.strip():
                continue
            if text.startswith("!"):
                name, _, rest = text[1:].partition(" ")
                handler = self.commands.get(name.strip())
                if handler is None:
                    self.console.print(f"[red]unknown command !{escape(name)}[/red]; !help lists them")
                elif not handler(rest.strip()):
                    self.console.print("bye")
                    return
                continue
            self.turn(text)

    def turn(self, text: str) -> None:
        """One user message and the replies it leads to, tool rounds included."""
        mark = len(self.session.messages)
        self.session.messages.append({"role": "user", "content": text})
        try:
            for _ in range(self.max_tool_rounds + 1):
                reply = self._stream()
                self.session.messages.append(reply.message())
                if not reply.tool_calls or self.tools is None:
                    return
                for call in reply.tool_calls:
                    self.session.messages.append(self._run_tool(call))
            self.console.print(f"[yellow]stopped after {self.max_tool_rounds} tool rounds[/yellow]")
        except KeyboardInterrupt:
            del self.session.messages[mark:]  # the interrupted turn leaves no trace
            self.console.print("\n[yellow]interrupted[/yellow]")
        except ChatError as exc:
            del self.session.messages[mark:]
            self.console.print(f"[red]error:[/red] {escape(str(exc))}")

    def _stream(self) -> Reply:
        state = {"reasoning": False}

        def content(text: str) -> None:
            if state["reasoning"]:
                self.console.print()
                state["reasoning"] = False
            self.console.print(escape(text), end="", highlight=False, soft_wrap=True)

        def reasoning(text: str) -> None:
            state["reasoning"] = True
            self.console.print(f"[dim italic]{escape(text)}[/dim italic]", end="", soft_wrap=True)

        reply = self.session.stream_reply(content, reasoning)
        self.console.print()
        for call in reply.tool_calls:
            fn = call["function"]
            self.console.print(f"[cyan]→ tool call {escape(fn['name'])}({escape(fn['arguments'])})[/cyan]")
        tokens = (reply.usage or {}).get("completion_tokens", 0)
        self.console.print(
            f"[dim][{tokens} tokens, {reply.elapsed_s:.2f} s, {reply.tokens_per_s():.1f} tok/s][/dim]"
        )
        return reply

    def _run_tool(self, call: dict[str, Any]) -> dict[str, Any]:
        assert self.tools is not None
        fn = call["function"]
        if self.confirm_tools:
            answer = self._ask(f"run {fn['name']}({fn['arguments']})? [Y/n] ").strip().lower()
            if answer not in ("", "y", "yes"):
                result = "Error: the user declined to run this tool"
                self.console.print(f"[yellow]← {escape(result)}[/yellow]")
                return {"role": "tool", "tool_call_id": call["id"], "content": result}
        started = time.monotonic()
        result = self.tools.call(fn["name"], fn["arguments"])
        self.console.print(
            f"[green]← {escape(result)}[/green] [dim]({time.monotonic() - started:.2f} s)[/dim]"
        )
        return {"role": "tool", "tool_call_id": call["id"], "content": result}

    # -- commands (each returns False to leave) --------------------------------------------------
    def _help(self, _: str) -> bool:
        self.console.print(escape(HELP.format(keys=", ".join(SETTINGS))))
        return True

    def _new(self, _: str) -> bool:
        self.session.reset()
        self.console.print("new conversation")
        return True

    def _save(self, name: str) -> bool:
        name = name or time.strftime("chat-%Y%m%d-%H%M%S")
        path = self.session.save(self.save_dir / f"{Path(name).stem}.json")
        self.console.print(f"saved {len(self.session.messages)} messages to {escape(str(path))}")
        return True

    def _load(self, name: str) -> bool:
        if not name:
            saved = sorted(p.stem for p in self.save_dir.glob("*.json"))
            self.console.print("usage: !load NAME; saved: " + (", ".join(saved) or "none"))
            return True
        try:
            self.session.load(self.save_dir / f"{Path(name).stem}.json")
        except ChatError as exc:
            self.console.print(f"[red]error:[/red] {escape(str(exc))}")
            return True
        self.console.print(f"loaded {len(self.session.messages)} messages from {escape(name)}")
        return True

    def _set(self, args: str) -> bool:
        try:
            changes = parse_assignments(args.split())
        except SettingError as exc:
            self.console.print(f"[red]bad setting:[/red] {escape(str(exc))}")
            return True
        self.session.settings.update(changes)
        self.console.print("set " + ", ".join(f"{k}={v}" for k, v in changes.items()))
        return True

    def _system(self, text: str) -> bool:
        self.session.system = text or None
        self.console.print("system prompt " + ("set" if text else "cleared"))
        return True

    def _status(self, _: str) -> bool:
        s = self.session
        tools = len(self.tools.openai_tools()) if self.tools else 0
        self.console.print(
            f"server: {escape(s.base_url)}\nmodel: {escape(str(s.model))}\n"
            f"settings: {escape(json.dumps(s.settings))}\nsystem: {escape(str(s.system))}\n"
            f"messages: {len(s.messages)}\ntools: {tools}"
        )
        return True

    def _model(self, name: str) -> bool:
        if not name:
            self.console.print(f"model: {escape(str(self.session.model))}")
        else:
            self.session.model = name
            self.console.print(f"model set to {escape(name)}")
        return True

    def _tools(self, _: str) -> bool:
        if self.tools is None or not self.tools.openai_tools():
            self.console.print("no MCP tools (use --mcp-config FILE)")
            return True
        for server, tool in self.tools.listing():
            self.console.print(
                f"{escape(server)}: {escape(tool['name'])} - {escape(tool.get('description') or '')}"
            )
        return True

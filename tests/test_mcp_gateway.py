"""The server-side MCP client on its own (no hfserve server): parsing a request's ``mcp`` tool, the
outbound policy, and the gateway against real MCP servers over streamable HTTP, SSE and stdio, and
against servers that are down or hang."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanic_serve.errors import InvalidRequest
from sanic_serve.mcp.gateway import MCPFailure, MCPGateway
from sanic_serve.mcp.policy import OutboundPolicy, PolicyRefused, is_public
from sanic_serve.mcp.settings import MCPConfigError, MCPSettings, load_config, settings_from_options
from sanic_serve.mcp.tool_spec import parse_mcp_tool
from tests.mcp_servers import closed_port_url, counting_server, read_calls, silent_server, stdio_spec

LOCAL = MCPSettings(allow_private=True, timeout_s=20.0)
SECRET = "tok-4f1c9a77e2"


def spec_of(tool: dict[str, Any], settings: MCPSettings = LOCAL) -> Any:
    return parse_mcp_tool({"type": "mcp", "server_label": "t", **tool}, "tools[0]", settings)


def bad(tool: dict[str, Any], settings: MCPSettings = LOCAL) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        spec_of(tool, settings)
    return info.value


# -- the tool's fields -----------------------------------------------------------------------------
def test_fields_that_cannot_work_are_400s_naming_them() -> None:
    assert bad({"connector_id": "connector_gmail"}).param == "tools[0].connector_id"
    assert bad({"tunnel_id": "tunnel_" + "a" * 32}).param == "tools[0].tunnel_id"
    assert bad({}).param == "tools[0].server_url"  # no URL and no configured server of that label
    assert bad({"server_url": 5}).param == "tools[0].server_url"
    assert bad({"server_url": "ftp://example.com/x"}).param == "tools[0].server_url"
    assert bad({"server_url": "http://x.example/mcp", "headers": {"a": 1}}).param == "tools[0].headers"
    assert (
        bad({"server_url": "http://x.example/mcp", "authorization": "a\nb"}).param == "tools[0].authorization"
    )
    assert bad({"server_url": "http://x.example/mcp", "require_approval": "sometimes"}).param == (
        "tools[0].require_approval"
    )
    assert bad({"server_url": "http://x.example/mcp", "allowed_tools": {"names": ["a"]}}).param == (
        "tools[0].allowed_tools"
    )
    with pytest.raises(InvalidRequest) as info:
        parse_mcp_tool({"type": "mcp", "server_url": "http://x.example/mcp"}, "tools[3]", LOCAL)
    assert info.value.param == "tools[3].server_label"


def test_a_configured_label_needs_no_url() -> None:
    settings = MCPSettings(servers={"files": {"command": "true"}})
    spec = spec_of({"server_label": "files"}, settings)
    assert spec.url is None and spec.configured == {"command": "true"}


def test_allowed_tools_and_require_approval_filters() -> None:
    read_only = {"readOnlyHint": True}
    spec = spec_of({"server_url": "http://x.example/mcp", "allowed_tools": ["add"]})
    assert spec.allows("add", None) and not spec.allows("get_weather", read_only)
    spec = spec_of({"server_url": "http://x.example/mcp", "allowed_tools": {"read_only": True}})
    assert spec.allows("get_weather", read_only) and not spec.allows("add", None)

    default = spec_of({"server_url": "http://x.example/mcp"})
    assert default.needs_approval("add", None)  # "always" unless told otherwise, as OpenAI
    never = spec_of({"server_url": "http://x.example/mcp", "require_approval": "never"})
    assert not never.needs_approval("add", None)
    mixed = spec_of(
        {"server_url": "http://x.example/mcp", "require_approval": {"never": {"tool_names": ["get_weather"]}}}
    )
    assert not mixed.needs_approval("get_weather", None) and mixed.needs_approval("add", None)
    by_hint = spec_of(
        {"server_url": "http://x.example/mcp", "require_approval": {"never": {"read_only": True}}}
    )
    assert not by_hint.needs_approval("get_weather", read_only) and by_hint.needs_approval("add", None)


def test_secrets_are_sent_but_never_shown() -> None:
    tool = {
        "type": "mcp",
        "server_label": "t",
        "server_url": "http://x.example/mcp",
        "authorization": SECRET,
        "headers": {"X-Key": "hdr-secret-991"},
    }
    spec = parse_mcp_tool(tool, "tools[0]", LOCAL)
    assert spec.headers == {"X-Key": "hdr-secret-991", "Authorization": f"Bearer {SECRET}"}
    assert SECRET not in repr(spec) and "hdr-secret-991" not in repr(spec)
    assert (
        spec.redact(f"denied for Bearer {SECRET} and hdr-secret-991")
        == "denied for [redacted] and [redacted]"
    )


# -- the outbound policy ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(PolicyRefused):
        OutboundPolicy().check_address(ipaddress.ip_address(address))
    OutboundPolicy(allow_private=True).check_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_allowed_hosts_narrow_the_reachable_names() -> None:
    policy = OutboundPolicy(allow_hosts=("mcp.example.com", "*.tools.example.org"))
    policy.check_host_name("MCP.example.com")
    policy.check_host_name("a.tools.example.org")
    for host in ("tools.example.org", "evil.com", "mcp.example.com.evil.com"):
        with pytest.raises(PolicyRefused):
            policy.check_host_name(host)
    assert bad(
        {"server_url": "https://evil.com/mcp"}, MCPSettings(allow_hosts=("mcp.example.com",))
    ).param == ("tools[0].server_url")


def test_urls_to_local_addresses_are_refused() -> None:
    strict = MCPSettings()
    for url in (
        "http://127.0.0.1:9/mcp",
        "http://[::1]:9/mcp",
        "http://localhost:9/mcp",
        "http://10.0.0.7/mcp",
    ):
        # No name to look up: a 400 naming the field, before anything runs.
        assert bad({"server_url": url}, strict).param == "tools[0].server_url"
    for url in ("http://0x7f.1/mcp", "http://127.1/mcp", "http://nowhere.invalid/mcp"):
        # Names are checked as they are dialled (or fail to resolve): a failed item, not a 400.
        with pytest.raises(MCPFailure) as info:
            asyncio.run(MCPGateway(strict).list_tools(spec_of({"server_url": url}, strict)))
        if "invalid" in url:
            assert info.value.error == {"type": "http_error", "code": 502, "message": "Could not connect."}
        else:
            assert "private" in info.value.message and info.value.error["code"] == 403


def test_urls_the_http_client_cannot_take_are_400s() -> None:
    # Control characters or a host name that is not valid IDNA: the client's fault, named, not a 500.
    for url in ("http://exa\x00mple.com/mcp", "http://a..b/mcp", "http://" + "a" * 70 + ".com/mcp"):
        assert bad({"server_url": url}, MCPSettings()).param == "tools[0].server_url"


# -- the config file -------------------------------------------------------------------------------
def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps({"mcpServers": {"a": {"command": "x", "args": ["1"]}, "b": {"url": "https://h/mcp"}}})
    )
    settings = settings_from_options(path, False, " h.example , *.corp.example ", 3.0)
    assert set(settings.servers) == {"a", "b"}
    assert settings.allow_hosts == ("h.example", "*.corp.example") and settings.timeout_s == 3.0
    for text in (
        "{",
        '{"servers": {}}',
        '{"mcpServers": {"a": {}}}',
        '{"mcpServers": {"a": {"url": "file:///x"}}}',
    ):
        path.write_text(text)
        with pytest.raises(MCPConfigError):
            load_config(path)


# -- the gateway against real servers --------------------------------------------------------------
@pytest.fixture(scope="module")
def call_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcp") / "calls.jsonl"


@pytest.fixture(scope="module")
def http_url(call_log: Path) -> Iterator[str]:
    with counting_server(call_log, "http") as url:
        yield url


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_streamable_http_lists_and_calls_with_the_authorization(http_url: str, call_log: Path) -> None:
    gateway = MCPGateway(LOCAL)
    spec = spec_of({"server_url": http_url, "authorization": SECRET, "headers": {"X-Test": "yes"}})
    tools = run(gateway.list_tools(spec))
    by_name = {t["name"]: t for t in tools}
    assert set(by_name) == {"get_weather", "add", "slow"}
    assert by_name["get_weather"]["annotations"]["readOnlyHint"] is True
    assert by_name["add"]["input_schema"]["required"] == ["a", "b"]
    before = len(read_calls(call_log))
    outcome = run(gateway.call_tool(spec, "add", {"a": 2, "b": 3}))
    assert outcome.output == "5" and outcome.error is None
    call = read_calls(call_log)[before]
    assert call == {
        "tool": "add",
        "args": {"a": 2, "b": 3},
        "authorization": f"Bearer {SECRET}",
        "x_test": "yes",
    }
    failed = run(gateway.call_tool(spec, "add", {"a": 1, "b": 1}))  # the tool raises
    assert failed.output is None and failed.error is not None
    assert failed.error["type"] == "mcp_tool_execution_error" and failed.error_text()


def test_a_configured_url_server_merges_both_header_sets_and_redacts_both(
    http_url: str, call_log: Path
) -> None:
    configured = "cfg-hdr-secret-7c2e"
    server = {"url": http_url, "headers": {"X-Test": configured, "authorization": "Bearer cfg-tok-90ab"}}
    settings = MCPSettings(servers={"cfg": server}, timeout_s=20.0)
    gateway = MCPGateway(settings)
    # The request's authorization replaces the configured one (names compare case-insensitively);
    # the configured header the request does not set is still sent.
    spec = spec_of({"server_label": "cfg", "authorization": SECRET}, settings)
    assert spec.headers == {"X-Test": configured, "Authorization": f"Bearer {SECRET}"}
    before = len(read_calls(call_log))
    refused = run(gateway.call_tool(spec, "add", {"a": 2, "b": 2}))  # its error quotes X-Test
    call = read_calls(call_log)[before]
    assert (call["authorization"], call["x_test"]) == (f"Bearer {SECRET}", configured)
    assert refused.error is not None and "refused for X-Test [redacted]" in refused.error_text()
    assert configured not in json.dumps(refused.error)
    # Without the request's own: the configured ones alone.
    plain = spec_of({"server_label": "cfg"}, settings)
    assert run(gateway.call_tool(plain, "add", {"a": 3, "b": 4})).output == "7"
    assert read_calls(call_log)[-1]["authorization"] == "Bearer cfg-tok-90ab"
    assert plain.redact("cfg-tok-90ab and cfg-hdr-secret-7c2e") == "[redacted] and [redacted]"


def test_sse_servers_are_reached_through_the_fallback(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    with counting_server(log, "sse") as url:
        gateway = MCPGateway(LOCAL)
        spec = spec_of({"server_url": url, "authorization": SECRET})
        assert {t["name"] for t in run(gateway.list_tools(spec))} == {"get_weather", "add", "slow"}
        outcome = run(gateway.call_tool(spec, "get_weather", {"city": "Tokyo"}))
    assert json.loads(outcome.output or "") == {"weather": "cloudy, 18 C"}
    assert read_calls(log) == [
        {
            "tool": "get_weather",
            "args": {"city": "Tokyo"},
            "authorization": f"Bearer {SECRET}",
            "x_test": None,
        }
    ]


def test_stdio_server_from_the_config_is_started_once_and_reused(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    settings = MCPSettings(servers={"local": stdio_spec(log)}, timeout_s=60.0)
    spec = spec_of({"server_label": "local"}, settings)

    async def scenario() -> tuple[Any, ...]:
        gateway = MCPGateway(settings)
        try:
            tools = await gateway.list_tools(spec)
            first = await gateway.call_tool(spec, "add", {"a": 4, "b": 5})
            started = time.monotonic()
            second = await gateway.call_tool(spec, "add", {"a": 10, "b": 7})
            return tools, first, second, time.monotonic() - started
        finally:
            await gateway.close()

    tools, first, second, second_s = run(scenario())
    assert {t["name"] for t in tools} == {"get_weather", "add", "slow"}
    assert (first.output, second.output) == ("9", "17")
    assert second_s < 5.0  # the running process answered; a new one would take seconds to start
    assert [c["args"] for c in read_calls(log)] == [{"a": 4, "b": 5}, {"a": 10, "b": 7}]


def test_a_stdio_server_that_cannot_start_is_a_failure() -> None:
    settings = MCPSettings(
        servers={"dead": {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"]}}
    )
    spec = spec_of({"server_label": "dead"}, settings)
    with pytest.raises(MCPFailure) as info:
        run(MCPGateway(settings).list_tools(spec))
    assert "'dead'" in info.value.message


def test_a_down_server_fails_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(MCPFailure) as info:
        run(MCPGateway(LOCAL).list_tools(spec_of({"server_url": closed_port_url()})))
    assert time.monotonic() - started < 10
    assert info.value.message == "Could not connect to the MCP server 't'."
    assert info.value.error == {"type": "http_error", "code": 502, "message": "Could not connect."}


def test_a_server_that_hangs_fails_within_the_timeout() -> None:
    settings = MCPSettings(allow_private=True, timeout_s=1.5)
    with silent_server() as url:
        started = time.monotonic()
        with pytest.raises(MCPFailure) as info:
            run(MCPGateway(settings).list_tools(spec_of({"server_url": url}, settings)))
        elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 6.0
    assert "did not answer within 1.5 s" in info.value.message


def test_a_slow_tool_call_fails_within_the_timeout(http_url: str) -> None:
    settings = MCPSettings(allow_private=True, timeout_s=2.0)
    started = time.monotonic()
    outcome = run(
        MCPGateway(settings).call_tool(spec_of({"server_url": http_url}, settings), "slow", {"seconds": 30})
    )
    assert time.monotonic() - started < 8.0
    assert outcome.error == {"type": "http_error", "code": 504, "message": "No answer within 2 s."}


def test_the_policy_holds_at_connect_time(http_url: str, call_log: Path) -> None:
    """Without --mcp-allow-private nothing reaches a loopback server, even when the request got past
    the URL check (a name that resolved elsewhere first): the address dialled is checked again."""
    before = len(read_calls(call_log))
    strict = MCPSettings(timeout_s=10.0)
    spec = spec_of({"server_url": http_url.replace("127.0.0.1", "0x7f.1")}, strict)
    with pytest.raises(MCPFailure) as info:
        run(MCPGateway(strict).list_tools(spec))
    outcome = run(MCPGateway(strict).call_tool(spec, "add", {"a": 2, "b": 3}))
    assert "private" in info.value.message and outcome.error is not None and outcome.error["code"] == 403
    assert len(read_calls(call_log)) == before


def test_an_http_error_answer_is_a_failure_naming_its_status(http_url: str) -> None:
    """A path the server does not serve: 404 over streamable HTTP, and over the SSE fallback."""
    spec = spec_of({"server_url": http_url.rsplit("/", 1)[0] + "/nothere"})
    with pytest.raises(MCPFailure) as info:
        run(MCPGateway(LOCAL).list_tools(spec))
    assert info.value.message == "The MCP server 't' answered HTTP 404."
    assert info.value.error == {"type": "http_error", "code": 404, "message": "HTTP 404"}

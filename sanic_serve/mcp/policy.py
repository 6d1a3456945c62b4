"""Which MCP servers a request may make this server reach.

A request's ``server_url`` is chosen by whoever can send requests, and the server then connects from
inside its own network: without a policy that is a server-side request forgery. Loopback, private,
link-local and every other non-global address is refused unless ``--mcp-allow-private``;
``--mcp-allow-hosts`` narrows the reachable hosts further. What a URL shows without a lookup (its host
name, an address in it) is checked when the request is parsed, a 400; every name is checked again on
the addresses it resolves to, by ``GuardedBackend`` as it dials, and the connection goes to a checked
address, so a name that resolves to a public address once and to 127.0.0.1 the next time (DNS
rebinding) gets nowhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore2
import httpx2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyRefused(Exception):
    """The URL may not be reached; the message is safe to show to the client."""


@dataclass(frozen=True)
class OutboundPolicy:
    """Where an outbound connection may go. The same rules serve MCP servers and fetched media
    (``sanic_serve.media``): ``subject`` and ``private_option`` only change what a refusal says."""

    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()
    subject: str = "The MCP server"
    private_option: str = "--mcp-allow-private"

    def check_host_name(self, host: str) -> None:
        """The ``--mcp-allow-hosts`` rule, on the name as written in the URL."""
        if not self.allow_hosts:
            return
        name = host.lower().rstrip(".")
        for pattern in self.allow_hosts:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]) and name != pattern[2:]:
                    return
            elif name == pattern:
                return
        raise PolicyRefused(f"{self.subject} host {host!r} is not among the hosts this server may reach.")

    def check_address(self, address: IPAddress) -> None:
        if self.allow_private or is_public(address):
            return
        raise PolicyRefused(
            f"{self.subject} URL points to a private, loopback or otherwise non-public address, "
            f"which this server does not reach (the operator can allow it with {self.private_option})."
        )


def split_url(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PolicyRefused("The MCP server URL is not a valid URL.") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PolicyRefused("The MCP server URL must be an http or https URL with a host.")
    try:
        # What the HTTP client and the resolver would refuse later (control characters, a host
        # name that is not valid IDNA), refused now as the client's fault rather than a failure.
        httpx2.URL(url)
        parts.hostname.encode("idna")
    except (httpx2.InvalidURL, UnicodeError, ValueError) as exc:
        raise PolicyRefused("The MCP server URL is not a valid URL.") from exc
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def is_public(address: IPAddress) -> bool:
    """Globally routable: not loopback, private, link-local, shared (CGNAT), multicast, reserved or
    unspecified; an IPv4 address mapped or embedded in IPv6 is judged as that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return is_public(embedded)
    return bool(address.is_global) and not address.is_multicast


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` names; ``OSError`` when it names none."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    if not out:
        raise OSError(f"no address for {host!r}")
    return out


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class GuardedBackend(httpcore2.AsyncNetworkBackend):
    """httpcore's network backend with the policy applied to the address actually dialled: the name
    is resolved once here, every address is checked, and the connection goes to a checked one.
    ``resolver`` and ``inner`` (the backend that dials) are replaceable so tests can stand in for
    DNS and the Internet."""

    def __init__(
        self,
        policy: OutboundPolicy,
        resolver: Resolver | None = None,
        inner: httpcore2.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolve = resolver or resolve
        self._inner = inner or httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            addresses = await self._resolve(host, port)
        except OSError as exc:
            raise httpcore2.ConnectError("the name could not be resolved") from exc
        try:
            for address in addresses:
                self._policy.check_address(address)
        except PolicyRefused as exc:
            # httpcore's own connect error: the transports report it as a failed connection,
            # and the gateway finds the refusal (its cause) to say why.
            raise httpcore2.ConnectError(str(exc)) from exc
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError(f"Unix sockets are not reachable ({self._policy.subject}).")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def http_client(
    *,
    policy: OutboundPolicy | None,
    headers: dict[str, str] | None = None,
    timeout: httpx2.Timeout | None = None,
    auth: httpx2.Auth | None = None,
    event_hooks: dict[str, list[Any]] | None = None,
    backend: httpcore2.AsyncNetworkBackend | None = None,
) -> httpx2.AsyncClient:
    """The HTTP client the MCP transports use (the SDK's ``McpHttpClientFactory`` shape, plus the
    policy): proxies from the environment are not used (they would dial for us, past the check),
    and with a policy every connection goes through ``GuardedBackend``. ``policy=None`` is for
    servers the operator configured; ``backend`` replaces the guarded backend (a test's, built on
    ``GuardedBackend`` with a stand-in resolver)."""
    transport = httpx2.AsyncHTTPTransport(trust_env=False)
    if policy is not None or backend is not None:
        pool = getattr(transport, "_pool", None)
        if not hasattr(pool, "_network_backend"):  # an httpx2 whose layout we do not know: fail closed
            raise RuntimeError("cannot apply the outbound policy to this httpx2 version")
        if backend is None:
            assert policy is not None
            backend = GuardedBackend(policy)
        pool._network_backend = backend  # type: ignore[union-attr]
    return httpx2.AsyncClient(
        headers=headers,
        timeout=timeout if timeout is not None else httpx2.Timeout(30.0, read=300.0),
        auth=auth,
        transport=transport,
        trust_env=False,
        follow_redirects=False,
        event_hooks=event_hooks,
    )

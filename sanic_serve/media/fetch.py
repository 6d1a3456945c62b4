"""Fetching an image by http(s) URL, when the operator allows remote media at all.

Peers' record is why each rule is here (docs/design.md, "Media"): only http and https; every hop's
name is resolved once, by the guarded network backend the MCP gateway uses too
(``sanic_serve.mcp.policy.GuardedBackend``), every address it names is checked, and the connection
goes to a checked address, so no second lookup can be rebound to 127.0.0.1; redirects are followed
here, each hop checked again (scheme, host allow-list, addresses), at most ``MAX_REDIRECTS``; one
deadline covers the whole fetch; the body is read raw (no gzip to inflate) and reading stops at the
byte cap; nothing is written to disk; no proxy from the environment dials for us.
"""

from __future__ import annotations

import asyncio
import ipaddress
from urllib.parse import urljoin, urlsplit

import httpcore2
import httpx2

from sanic_serve.mcp.policy import OutboundPolicy, PolicyRefused, http_client
from sanic_serve.media.errors import BytesOverLimit, FetchFailed, SourceRefused
from sanic_serve.media.policy import MAX_REDIRECTS, MediaPolicy

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_INVALID_URL = "The image URL is not a valid URL."
_HEADERS = {
    "Accept": "image/png, image/jpeg, image/webp, image/gif",
    "Accept-Encoding": "identity",
    "User-Agent": "hfserve (image fetch)",
}


def check_hop(url: str, policy: OutboundPolicy) -> None:
    """What a URL shows without a lookup: an http(s) URL with a host, the host allowed, and an
    address written in it public (unless private ones are allowed)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise SourceRefused(_INVALID_URL) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceRefused("The image URL must be an http or https URL with a host.")
    try:
        # What the client and the resolver will refuse later, refused here as the client's fault:
        # control characters, a host name that is not valid IDNA (an empty or over-long label).
        httpx2.URL(url)
        parts.hostname.encode("idna")
    except (httpx2.InvalidURL, UnicodeError, ValueError):
        raise SourceRefused(_INVALID_URL) from None
    if parts.username is not None or parts.password is not None:
        raise SourceRefused("The image URL must not carry a user name or password.")
    try:
        policy.check_host_name(parts.hostname)
        try:
            literal = ipaddress.ip_address(parts.hostname)
        except ValueError:
            return
        policy.check_address(literal)
    except PolicyRefused as exc:
        raise SourceRefused(str(exc)) from None


def _refusal(exc: BaseException) -> PolicyRefused | None:
    """The policy's refusal behind a failed connection, if that is why it failed."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, PolicyRefused):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


async def fetch_image_bytes(
    url: str, policy: MediaPolicy, backend: httpcore2.AsyncNetworkBackend | None = None
) -> bytes:
    """The body of ``url`` (after at most ``MAX_REDIRECTS`` checked redirects), at most
    ``policy.max_image_bytes`` long. ``backend`` stands in for the guarded network (tests)."""
    if not policy.allow_remote:
        raise SourceRefused(
            "This server does not fetch image URLs (the operator can allow it with --allow-remote-media); "
            "send the image inline as a data URL."
        )
    outbound = policy.outbound()
    try:
        async with asyncio.timeout(policy.fetch_timeout_s):
            timeout = httpx2.Timeout(policy.fetch_timeout_s)
            async with http_client(
                policy=outbound, headers=_HEADERS, timeout=timeout, backend=backend
            ) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    check_hop(url, outbound)
                    body, location = await _get(client, url, policy.max_image_bytes)
                    if location is None:
                        assert body is not None
                        return body
                    url = location
    except TimeoutError:
        raise FetchFailed(f"The image URL did not answer within {policy.fetch_timeout_s:g} s.") from None
    except (httpx2.InvalidURL, UnicodeError):  # a URL check_hop let through, refused by the client
        raise SourceRefused(_INVALID_URL) from None
    except httpx2.HTTPError as exc:
        refused = _refusal(exc)
        if refused is not None:
            raise SourceRefused(str(refused)) from None
        raise FetchFailed("The image could not be fetched from its URL.") from None
    raise SourceRefused(f"The image URL redirects more than {MAX_REDIRECTS} times.")


async def _get(client: httpx2.AsyncClient, url: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(body, None), or (None, the next URL) for a redirect."""
    async with client.stream("GET", url) as response:
        status = response.status_code
        if status in _REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise FetchFailed(f"The image URL answered a redirect ({status}) without a Location.")
            return None, urljoin(url, location)
        if status != 200:
            raise FetchFailed(f"The image URL answered HTTP {status}.")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchFailed("The image URL answered with a compressed body, which is not read.")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise BytesOverLimit(max_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > max_bytes:  # stop reading: the rest is never received
                raise BytesOverLimit(max_bytes)
            chunks.append(chunk)
        return b"".join(chunks), None

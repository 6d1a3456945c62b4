"""The HTTP protocol of the workers: the head deadline (``sanic_serve.head_timeout``) plus a count of
the requests in flight, which the drain waits for.

Every request of every route passes through the protocol's request handler, and the ``finally``
runs however the request ends (a client gone mid-stream included), so the count cannot drift.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sanic_serve.head_timeout import HeadDeadlineProtocol

Handler = Callable[[Any], Awaitable[Any]]


class RequestCounter:
    def __init__(self, add: Callable[[int], None]) -> None:
        self._add = add

    def wrap(self, handle: Handler) -> Handler:
        async def counted(request: Any) -> Any:
            self._add(1)
            try:
                return await handle(request)
            finally:
                self._add(-1)

        return counted


class ServerProtocol(HeadDeadlineProtocol):
    def _setup(self) -> None:
        super()._setup()  # type: ignore[no-untyped-call]
        counter: RequestCounter | None = getattr(self.app.ctx, "request_counter", None)
        if counter is not None:
            self.request_handler = counter.wrap(self.request_handler)

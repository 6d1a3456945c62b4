"""A request-head deadline that a slow client cannot stretch.

Sanic's ``REQUEST_TIMEOUT`` restarts whenever a byte arrives, so a client that sends its request
head one byte at a time (slowloris) keeps its connection, and a worker's socket, for as long as it
likes. Here the clock of a request's head runs from its first byte: the whole head must arrive
within ``--request-timeout-s``, and a client that is still dribbling then gets a 408. (The body has
its own deadline, :mod:`sanic_serve.body`.)
"""

from __future__ import annotations

from sanic.http import Stage
from sanic.server.protocols.http_protocol import HttpProtocol


class HeadDeadlineProtocol(HttpProtocol):
    def data_received(self, data: bytes) -> None:
        http = getattr(self, "_http", None)
        # REQUEST is the stage of the head only: Sanic moves to HANDLER once the head is parsed.
        reading_head = http is not None and http.stage is Stage.REQUEST
        started = self._time
        super().data_received(data)
        if reading_head:
            self._time = started

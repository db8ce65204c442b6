"""Client connections at the edge: a deadline for every request head.

Role: uvicorn's HTTP protocol (httptools), with one thing added. A client that
has not sent a complete request head within ``header_timeout`` seconds of
connecting (or of the first byte of its next request on a kept-alive
connection) is cut off. Without it a slowloris client that dribbles header
bytes holds a connection forever: uvicorn's own keep-alive timer only runs
between requests and is cancelled by the first byte.

Invariants:
- A connection idle after a response is closed by uvicorn's keep-alive timeout
  (``server.keep_alive_timeout``); between connecting and a complete head, by this
  deadline; a request whose head is complete is never cut by it.
- Beyond ``server.max_connections`` connections or requests in flight, uvicorn
  answers 503 (its ``limit_concurrency``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HeadDeadlineProtocol", "protocol_with_head_deadline"]

log = logging.getLogger("roost.edge.connections")


class HeadDeadlineProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes a connection whose request head is late."""

    #: set per server by ``protocol_with_head_deadline``.
    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_late)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_late(self) -> None:
        self._head_deadline = None
        if self.transport is not None and not self.transport.is_closing():
            log.debug(
                "%s: no complete request head within %gs; closing", self.client, self.header_timeout
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_head_deadline()
        super().on_headers_complete()


def protocol_with_head_deadline(header_timeout: float) -> type[HeadDeadlineProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with this deadline."""
    return type(
        "HeadDeadlineProtocol",
        (HeadDeadlineProtocol,),
        {"header_timeout": header_timeout},
    )

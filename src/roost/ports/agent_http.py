"""The agent HTTP port: every way Roost talks HTTP to an agent's container.

One client object serves all of it (``Engine.agent_client``):

- ``probe``: readiness and liveness. Readiness is an HTTP GET of the health path
  that answers 200 — never a TCP connect: Docker's port proxy accepts
  connections before the app listens.
- ``request``: one whole exchange, bytes in and bytes out (message delivery).
- ``stream``: a request whose body may be a stream and whose answer is read as
  it arrives (the reverse proxy), used as ``async with client.stream(...) as r``.
- ``websocket``: a WebSocket to the agent (the proxy's upgrades).

Invariants every implementation keeps:
- Headers are raw ``(name, value)`` byte pairs; response header names are
  lower-case. Callers never pass ``Host`` (the client sets the agent's) nor the
  body's framing (``Content-Length`` / ``Transfer-Encoding``) except that a
  streamed body may come with the client's ``Content-Length``.
- Failures are ``roost.errors.AgentHTTPError`` (refused, reset, cut or invalid
  answer) or its subclass ``AgentTimeout`` (no answer in time); an exception
  raised by the caller's body stream reaches the caller unchanged.
- A request that may have reached the agent is sent again only when its method
  is idempotent and its body is in memory (``bytes``), never a streamed one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

__all__ = [
    "AgentClient",
    "AgentResponse",
    "AgentStream",
    "AgentWebSocket",
    "Headers",
    "ProbeResult",
    "RequestBody",
]

#: Raw header pairs, in order.
Headers = Sequence[tuple[bytes, bytes]]
#: A request body: none, whole, or a stream of chunks sent as they come.
RequestBody = bytes | AsyncIterable[bytes] | None


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    #: HTTP status, or None when no HTTP answer came (refused, reset, timed out).
    status: int | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class AgentResponse:
    """A whole answer: status, raw headers (lower-case names) and the body's bytes."""

    status: int
    body: bytes = b""
    headers: Headers = ()

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class AgentStream(Protocol):
    """An answer being received: its head is here, its body arrives via ``read``."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Headers:
        """Raw header pairs as the agent sent them, names lower-case."""
        ...

    @property
    def complete(self) -> bool:
        """The end of the body has arrived: ``read`` returns the rest at once."""
        ...

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some when
        none have); ``b""`` once the body has ended."""
        ...


class AgentWebSocket(Protocol):
    """An open WebSocket to an agent."""

    @property
    def subprotocol(self) -> str | None: ...

    @property
    def close_code(self) -> int | None:
        """The agent's close code once it closed, else None."""
        ...

    async def send(self, data: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) message."""
        ...

    async def receive(self) -> str | bytes | None:
        """The next message; None once the WebSocket closed (see ``close_code``)."""
        ...

    async def close(self, code: int = 1000) -> None: ...


class AgentClient(Protocol):
    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        """GET ``url``; ok when it answers 200 within ``timeout`` seconds. Never raises
        for the agent's failures: they are a result that is not ok."""
        ...

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Headers = (),
        timeout: float,
    ) -> AgentResponse:
        """Send one request and read its whole answer within ``timeout`` seconds.
        Raises ``AgentHTTPError`` / ``AgentTimeout`` when no whole answer came."""
        ...

    def stream(
        self,
        method: str,
        origin: str,
        target: bytes,
        *,
        headers: Headers = (),
        body: RequestBody = None,
        answer_timeout: float,
    ) -> AbstractAsyncContextManager[AgentStream]:
        """Send ``method target`` to ``origin`` (``http://host:port``) and, on entry,
        give the answer once its head arrived (within ``answer_timeout`` seconds of
        the call). A streamed body goes up while the answer comes down; with
        ``Expect: 100-continue`` among ``headers`` it is read only once the agent
        asks for it (or after a short wait without an answer), and not at all when
        the agent answers first. On exit the connection is kept for another request
        when the exchange ended cleanly, else closed."""
        ...

    async def websocket(
        self,
        origin: str,
        target: bytes,
        *,
        headers: Headers = (),
        protocols: Sequence[str] = (),
        max_message_size: int,
    ) -> AgentWebSocket:
        """Open a WebSocket to ``origin`` + ``target``. Raises ``AgentHTTPError``
        (with ``status`` when the agent answered the handshake with a refusal)."""
        ...

    async def close(self) -> None: ...

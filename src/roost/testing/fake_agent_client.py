"""``FakeAgentClient``: an in-memory ``AgentClient`` that answers for a ``FakeRuntime``.

Role: lets the reactor and the API run whole agent lifecycles on ``FakeRuntime``
without any network. A URL is "served" when a running (not paused) container of
the runtime publishes the URL's port, which is what a healthy agent looks like.
The served "agent" behaves like the mimic agent in echo mode.

Invariants (tests/contract/test_agent_client_contract.py holds ``HttpAgentClient``
against a real echo server to the same ones):
- A URL is served through a container's published port, or at its own address
  on its container port (``FakeRuntime.answering``); ports in ``unhealthy_ports``
  are published ports, whichever way the container is reached.
- ``probe`` is ok (HTTP 200) exactly when such a container exists; otherwise it
  answers like a refused connection (``status`` None). Ports listed in
  ``unhealthy_ports`` answer HTTP 503 instead, to model an app that is up but
  not ready.
- ``request`` and ``stream`` to a served URL echo a JSON body: 200 with
  ``{"echo": <the body>}`` (a body that is not JSON gets 400); to an unserved one
  they raise ``AgentHTTPError`` like a real client. A streamed body is read whole
  first (an exception from it propagates unchanged).
- ``websocket`` to a served URL echoes every message back until closed.
- What is served is what ``FakeRuntime.answering`` says (running, unpaused, the
  port published), whether or not the fake engine's API answers.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from roost import errors
from roost.ports.agent_http import AgentResponse, Headers, ProbeResult, RequestBody
from roost.testing.fake_runtime import FakeRuntime

__all__ = ["FakeAgentClient"]

_JSON = ((b"content-type", b"application/json"),)


class FakeAgentClient:
    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.unhealthy_ports: set[int] = set()
        #: every ``request`` and ``stream`` as (method, url, body), in call order.
        self.requests: list[tuple[str, str, bytes | None]] = []
        self.closed = False

    async def _serves(self, url: str) -> int | None:
        """The published port of the running container the URL reaches (through that
        port, or at the container's own address), else None."""
        parts = urllib.parse.urlsplit(url)
        if parts.port is None:
            return None
        await asyncio.sleep(0)  # a real request yields to the loop
        return self.runtime.answering(parts.hostname, parts.port)

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        port = await self._serves(url)
        if port is None:
            return ProbeResult(False, None, "connection refused")
        if port in self.unhealthy_ports:
            return ProbeResult(False, 503, "HTTP 503")
        return ProbeResult(True, 200, "HTTP 200")

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Headers = (),
        timeout: float,
    ) -> AgentResponse:
        self.requests.append((method, url, body))
        if await self._serves(url) is None:
            raise errors.AgentHTTPError(f"cannot connect to {url}: connection refused")
        return _echo(body)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        origin: str,
        target: bytes,
        *,
        headers: Headers = (),
        body: RequestBody = None,
        answer_timeout: float,
    ) -> AsyncIterator[_FakeStream]:
        url = origin + target.decode("latin-1")
        whole: bytes | None
        if body is None or isinstance(body, bytes):
            whole = body
        else:
            whole = b"".join([chunk async for chunk in body])
        self.requests.append((method, url, whole))
        if await self._serves(url) is None:
            raise errors.AgentHTTPError(f"cannot connect to {origin}: connection refused")
        yield _FakeStream(_echo(whole))

    async def websocket(
        self,
        origin: str,
        target: bytes,
        *,
        headers: Headers = (),
        protocols: Sequence[str] = (),
        max_message_size: int,
    ) -> _FakeWebSocket:
        if await self._serves(origin) is None:
            raise errors.AgentHTTPError(f"cannot connect to {origin}: connection refused")
        return _FakeWebSocket(protocols[0] if protocols else None)

    async def close(self) -> None:
        self.closed = True


def _echo(body: bytes | None) -> AgentResponse:
    try:
        decoded: Any = json.loads(body) if body else None
    except ValueError:
        return AgentResponse(400, b'{"error": "the body is not JSON"}', _JSON)
    return AgentResponse(200, json.dumps({"echo": decoded}).encode(), _JSON)


class _FakeStream:
    """``AgentStream`` over an answer that is whole from the start."""

    def __init__(self, response: AgentResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.complete = True
        self._body = response.body

    async def read(self) -> bytes:
        body, self._body = self._body, b""
        return body


class _FakeWebSocket:
    """``AgentWebSocket`` that echoes each message back."""

    def __init__(self, subprotocol: str | None) -> None:
        self.subprotocol = subprotocol
        self.close_code: int | None = None
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()

    async def send(self, data: str | bytes) -> None:
        if self.close_code is not None:
            raise errors.AgentHTTPError("the WebSocket is closed")
        await self._inbox.put(data)

    async def receive(self) -> str | bytes | None:
        if self.close_code is not None:
            return None
        return await self._inbox.get()

    async def close(self, code: int = 1000) -> None:
        if self.close_code is None:
            self.close_code = code
            await self._inbox.put(None)

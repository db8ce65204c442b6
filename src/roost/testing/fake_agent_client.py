"""``FakeAgentClient``: an in-memory ``AgentClient`` that answers for a ``ContainerRuntime``.

Role: lets the reactor and the API run whole agent lifecycles on ``FakeRuntime``
without any network. A URL is "served" when a running (not paused) container of
the runtime publishes the URL's port, which is what a healthy agent looks like.

Invariants:
- ``probe`` is ok (HTTP 200) exactly when such a container exists; otherwise it
  answers like a refused connection (``status`` None). Ports listed in
  ``unhealthy_ports`` answer HTTP 503 instead, to model an app that is up but
  not ready.
- ``post_json`` to a served URL echoes: ``{"echo": body}`` with status 200; to an
  unserved one it raises ``ConnectionError`` like a real client.
- Only the runtime's public methods are used (``list``, ``inspect``).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Mapping
from typing import Any

from roost.ports.agent_http import AgentResponse, ProbeResult
from roost.testing.fake_runtime import FakeRuntime

__all__ = ["FakeAgentClient"]


class FakeAgentClient:
    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.unhealthy_ports: set[int] = set()
        #: every ``post_json`` as (url, body), in call order.
        self.posts: list[tuple[str, Any]] = []
        self.closed = False

    async def _serves(self, url: str) -> int | None:
        """The URL's port when a running container publishes it, else None."""
        port = urllib.parse.urlsplit(url).port
        if port is None:
            return None
        await asyncio.sleep(0)  # a real request yields to the loop
        return port if self.runtime.serves(port) else None

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        port = await self._serves(url)
        if port is None:
            return ProbeResult(False, None, "connection refused")
        if port in self.unhealthy_ports:
            return ProbeResult(False, 503, "HTTP 503")
        return ProbeResult(True, 200, "HTTP 200")

    async def post_json(
        self, url: str, body: Any, *, headers: Mapping[str, str], timeout: float
    ) -> AgentResponse:
        self.posts.append((url, body))
        if await self._serves(url) is None:
            raise ConnectionError(f"connection refused: {url}")
        return AgentResponse(200, {"echo": body}, {"content-type": "application/json"})

    async def close(self) -> None:
        self.closed = True

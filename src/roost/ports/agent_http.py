"""The agent HTTP port: how Roost talks to an agent's container over HTTP
(readiness and liveness probes; later message delivery).

Readiness is an HTTP GET of the health path that answers 200 — never a TCP
connect: Docker's port proxy accepts connections before the app listens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["AgentClient", "AgentResponse", "ProbeResult"]


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    #: HTTP status, or None when no HTTP answer came (refused, reset, timed out).
    status: int | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class AgentResponse:
    status: int
    body: Any
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


class AgentClient(Protocol):
    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        """GET ``url``; ok when it answers 200 within ``timeout`` seconds."""
        ...

    async def post_json(
        self, url: str, body: Any, *, headers: Mapping[str, str], timeout: float
    ) -> AgentResponse:
        """POST JSON, return the decoded answer. Raises ``ConnectionError`` or
        ``TimeoutError`` when no HTTP answer came."""
        ...

    async def close(self) -> None: ...

"""An engine on fakes, with Roost's whole HTTP surface in process: for tests.

``async with EngineHarness.running(settings) as h:`` starts an :class:`Engine` on a
:class:`FakeRuntime` (images given are "present"), a :class:`FakeAgentClient` (or
the client you pass) and, optionally, a :class:`FakeClock`; builds the edge app
(``roost.edge.create_app``) and an ``httpx.AsyncClient`` that talks to it over
``ASGITransport`` — no sockets, no Docker. Everything is stopped on exit.

Invariants: the harness uses exactly the engine and app that ``roost up`` serves;
only the ports are faked.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from roost.config import Settings
from roost.edge import Edge, create_app
from roost.engine import Engine
from roost.ports.agent_http import AgentClient
from roost.ports.clock import Clock
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime

__all__ = ["EngineHarness"]


class EngineHarness:
    """A started engine on fakes, its edge app and an HTTP client for it."""

    def __init__(
        self,
        engine: Engine,
        runtime: FakeRuntime,
        app: Edge,
        client: httpx.AsyncClient,
    ) -> None:
        self.engine = engine
        self.runtime = runtime
        self.app = app
        self.client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        settings: Settings,
        *,
        images: Sequence[str] = ("roost-mimic:latest",),
        runtime: FakeRuntime | None = None,
        agent_client: AgentClient | None = None,
        clock: Clock | None = None,
        token: str | None = None,
    ) -> AsyncIterator[EngineHarness]:
        """Start it all; stop it all on exit."""
        if runtime is None:
            runtime = (
                FakeRuntime(images=list(images), clock=clock.now)
                if clock is not None
                else FakeRuntime(images=list(images))
            )
        engine = Engine(
            settings,
            runtime=runtime,
            agent_client=agent_client or FakeAgentClient(runtime),
            clock=clock,
        )
        async with engine:
            app = create_app(engine, token=token)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://roost") as client:
                yield cls(engine, runtime, app, client)

    async def agent(self, name: str) -> dict[str, Any]:
        """``GET /api/agents/{name}``, which must answer 200."""
        response = await self.client.get(f"/api/agents/{name}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

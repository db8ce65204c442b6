"""An engine on fakes, with Roost's whole HTTP surface in process: for tests.

``async with EngineHarness.running(settings) as h:`` starts an :class:`Engine` on a
:class:`FakeRuntime` (images given are "present"), a :class:`FakeAgentClient` (or
the client you pass) and, optionally, a :class:`FakeClock`; builds the edge app
(``roost.edge.create_app``) and an ``httpx.AsyncClient`` that talks to it over
``ASGITransport`` — no sockets, no Docker. Everything is stopped on exit.

``EngineHarness.served(settings)`` does the same behind ``roost.serving.serve`` on
a real loopback socket (``h.url``), with the agent listener on another one
(``h.agent_url``): the daemon as ``roost up`` runs it, on fakes.

``h.agent_client(token)`` talks to the agent listener's app (in process, or over
its socket when served) as an agent container holding ``token`` would;
``h.agent_token(name)`` reads that token from the agent's (fake) container.

Invariants: the harness uses exactly the engine and app that ``roost up`` serves;
only the ports are faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from roost import serving
from roost.config import Settings
from roost.edge import AgentEdge, Edge, create_agent_app, create_app
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
        app: Edge | None,
        client: httpx.AsyncClient,
        agent_app: AgentEdge | None = None,
    ) -> None:
        self.engine = engine
        self.runtime = runtime
        #: the edge app (``running``); None when ``served`` (``serve`` owns its own).
        self.app = app
        self.client = client
        #: the agent listener's app (``running``); None when ``served``.
        self.agent_app = agent_app
        #: the served daemon's base URL and its agent listener's (``served`` only).
        self.url = ""
        self.agent_url = ""

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
                yield cls(engine, runtime, app, client, create_agent_app(engine))

    @classmethod
    @contextlib.asynccontextmanager
    async def served(
        cls,
        settings: Settings,
        *,
        images: Sequence[str] = ("roost-mimic:latest",),
        runtime: FakeRuntime | None = None,
        agent_client: AgentClient | None = None,
        start_timeout: float = 30.0,
    ) -> AsyncIterator[EngineHarness]:
        """``roost.serving.serve`` on fakes, on a free loopback port; stopped on exit
        (and its exit code checked: 0)."""
        runtime = runtime or FakeRuntime(images=list(images))
        engine = Engine(
            settings, runtime=runtime, agent_client=agent_client or FakeAgentClient(runtime)
        )
        sock = await serving.bind_listen_socket("127.0.0.1", 0)
        agent_sock = await serving.bind_listen_socket("127.0.0.1", 0)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        shutdown = asyncio.Event()
        task = asyncio.create_task(
            serving.serve(
                settings,
                engine=engine,
                listen_socket=sock,
                agent_socket=agent_sock,
                shutdown=shutdown,
                handle_signals=False,
            ),
            name="roost.testing.served",
        )
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                deadline = time.monotonic() + start_timeout
                while True:
                    if task.done():
                        raise RuntimeError(f"serve ended before answering: exit {task.result()}")
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the daemon did not answer {url}/healthz")
                    await asyncio.sleep(0.02)
                harness = cls(engine, runtime, None, client)  # serve built the app
                harness.url = url
                harness.agent_url = f"http://127.0.0.1:{agent_sock.getsockname()[1]}"
                yield harness
        finally:
            shutdown.set()
            code = await asyncio.wait_for(task, timeout=30)
            if code != 0:
                raise RuntimeError(f"serve exited with {code}")

    def agent_token(self, name: str) -> str:
        """The ROOST_AGENT_TOKEN in the environment of the agent's current container."""
        container_id = self.engine.agents.get(name).container_id
        if container_id is None:
            raise LookupError(f"agent {name!r} has no container")
        return self.runtime.container_spec(container_id).env["ROOST_AGENT_TOKEN"]

    def agent_client(self, token: str | None) -> httpx.AsyncClient:
        """A client of the agent listener sending ``token`` (None: no token), as an
        agent container would; close it (``async with``)."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if self.agent_app is not None:
            transport = httpx.ASGITransport(app=self.agent_app)
            return httpx.AsyncClient(
                transport=transport, base_url="http://roost-agents", headers=headers
            )
        return httpx.AsyncClient(base_url=self.agent_url, headers=headers, timeout=30)

    async def agent(self, name: str) -> dict[str, Any]:
        """``GET /api/agents/{name}``, which must answer 200."""
        response = await self.client.get(f"/api/agents/{name}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

"""The conformance rig: a whole Roost (engine, gateway, real agent HTTP client) in
front of one agent served by a real server nobody here wrote.

Every test names the path it exercises:
- ``proxy``: a client request through ``ANY /agents/{name}/{path}``;
- ``delivery``: a durable message through ``POST /api/agents/{name}/messages``;
- ``probe``: the readiness probe (the agent wakes only once it answers) and the
  agent client's ``probe`` as liveness uses it.

Two ways to run the agent:
- ``docker_rig``: a real container on the real Docker Engine (busybox httpd,
  Python's http.server, nginx: images built locally);
- ``host_rig``: a server running in this process (uvicorn, aiohttp, the scripted
  raw server) behind ``FakeRuntime``, whose container publishes that server's
  port (``FakeRuntime.endpoints``). The HTTP hops are real either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from roost.adapters.http_agent_client import HttpAgentClient
from roost.core.backoff import Backoff
from roost.core.records import AgentRecord
from roost.edge import Edge, create_app
from roost.engine import Engine
from roost.ports.agent_http import ProbeResult
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until
from tests.support import served

NAME = "agent"
HOST_IMAGE = "roost-conformance-host:latest"


@dataclasses.dataclass
class Rig:
    engine: Engine
    app: Edge
    url: str
    http: aiohttp.ClientSession
    spec: dict[str, Any]

    @property
    def client(self) -> HttpAgentClient:
        client = self.engine.agent_client
        assert isinstance(client, HttpAgentClient)
        return client

    async def running(self) -> AgentRecord:
        """Wake the agent: it gets there only once its readiness probe answered 200."""
        return await self.engine.agents.wake(NAME, reason="conformance test", timeout=60)

    async def proxy(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """Status, headers and whole body of a request through the proxy."""
        async with self.http.request(
            method, f"{self.url}/agents/{NAME}{path}", auto_decompress=False, **kwargs
        ) as response:
            return response.status, response.headers, await response.read()

    async def deliver(self, body: Any, *, timeout: float = 30) -> dict[str, Any]:
        """A durable message, waited for: the API's final answer (status, reply/error)."""
        async with self.http.post(
            f"{self.url}/api/agents/{NAME}/messages",
            params={"wait": "true", "timeout": str(timeout)},
            json=body,
        ) as response:
            assert response.status in (200, 202), await response.text()
            result: dict[str, Any] = await response.json()
            return result

    async def deliver_failing(self, body: Any) -> dict[str, Any]:
        """A durable message the agent cannot take: its stored state after a failed attempt."""
        async with self.http.post(f"{self.url}/api/agents/{NAME}/messages", json=body) as sent:
            assert sent.status == 202, await sent.text()
            message_id = (await sent.json())["id"]
        found: dict[str, Any] = {}

        async def attempted() -> bool:
            async with self.http.get(
                f"{self.url}/api/agents/{NAME}/messages/{message_id}"
            ) as response:
                found.update(await response.json())
            return bool(found.get("attempts")) and bool(found.get("error"))

        await wait_until(attempted, timeout=30, what=f"a failed delivery of {message_id}")
        return found

    async def probe(self, path: str | None = None, *, timeout: float = 5) -> ProbeResult:
        """The agent client's probe of ``path`` (default: the health path) on the agent."""
        record = await self.running()
        assert record.url is not None
        return await self.engine.agent_client.probe(
            record.url + (path or self.spec.get("health_path", "/health")), timeout=timeout
        )


@contextlib.asynccontextmanager
async def _rig(engine: Engine, spec: dict[str, Any]) -> AsyncIterator[Rig]:
    async with engine:
        engine.dispatcher.retry = Backoff((0.05,), repeat=True)
        app = create_app(engine, token=None)
        async with served(app) as url, aiohttp.ClientSession() as http:
            yield Rig(engine, app, url, http, spec)


@contextlib.asynccontextmanager
async def host_rig(
    tmp_path: Path, port: int, *, client: HttpAgentClient | None = None, **spec: Any
) -> AsyncIterator[Rig]:
    """Roost on FakeRuntime; the agent's container publishes host ``port``."""
    runtime = FakeRuntime(images=[HOST_IMAGE])
    runtime.endpoints[HOST_IMAGE] = port
    agent = {"image": HOST_IMAGE, **spec}
    settings = make_settings(
        tmp_path,
        "conformance",
        agents={NAME: agent},
        defaults={"liveness_interval": 3600, "idle_timeout": 0},
    )
    engine = Engine(settings, runtime=runtime, agent_client=client or HttpAgentClient())
    async with _rig(engine, agent) as rig:
        yield rig


@contextlib.asynccontextmanager
async def docker_rig(
    tmp_path: Path, instance: str, *, client: HttpAgentClient | None = None, **spec: Any
) -> AsyncIterator[Rig]:
    """Roost on the real Docker Engine; the agent is a container of ``spec["image"]``."""
    settings = make_settings(
        tmp_path,
        instance,
        agents={NAME: spec},
        defaults={"liveness_interval": 3600, "idle_timeout": 0, "memory": "64m"},
    )
    engine = Engine(settings, agent_client=client or HttpAgentClient())
    async with _rig(engine, spec) as rig:
        yield rig


class ManualClock:
    """A monotonic clock a test moves by hand (the agent client's pool timing)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

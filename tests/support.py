"""Helpers shared by several test modules (not tests themselves)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from roost import errors, serving
from roost.config import Settings
from roost.core.records import AgentRecord, StateChange
from roost.core.states import AgentState
from roost.engine import Engine
from roost.ports.agent_http import AgentResponse, Headers, ProbeResult
from roost.ports.backend import AgentBackend
from roost.reactor.supervising import AgentActor, Supervisor
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_clock import FakeClock
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until

__all__ = [
    "ACT_TIMEOUT",
    "BASE_DEFAULTS",
    "IMAGE",
    "RecordingNotifier",
    "Rig",
    "ScriptedAgent",
    "SwitchableAgentClient",
    "advance_until",
    "open_rig",
    "roost_daemon",
    "served",
]


class ScriptedAgent(FakeAgentClient):
    """Answers deliveries like an agent told what to do by the message body:
    ``{"status": N}`` answers N; ``{"fail_first": N}`` answers 503 N times first;
    ``{"answer": "TEXT"}`` answers 200 with TEXT's UTF-8 bytes as the body. While
    ``down`` every delivery finds no connection. ``bodies``: every body received,
    as bytes."""

    def __init__(self, runtime: FakeRuntime) -> None:
        super().__init__(runtime)
        self.deliveries: list[tuple[str, Any]] = []
        self.bodies: list[bytes] = []
        self.down = False
        self.in_flight = 0
        self.most_in_flight = 0
        self.hold: asyncio.Event | None = None
        self._failures: dict[str, int] = {}

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Headers = (),
        timeout: float,
    ) -> AgentResponse:
        if self.down or await self._serves(url) is None:
            raise errors.AgentHTTPError(f"connection refused: {url}")
        message_id = dict(headers)[b"roost-message-id"].decode()
        decoded: Any = json.loads(body or b"null")
        self.deliveries.append((message_id, decoded))
        self.bodies.append(body or b"")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            fields = decoded if isinstance(decoded, dict) else {}
            if "status" in fields:
                return AgentResponse(fields["status"], b'{"error": "scripted"}')
            if "answer" in fields:
                return AgentResponse(200, str(fields["answer"]).encode())
            if self._failures.get(message_id, 0) < fields.get("fail_first", 0):
                self._failures[message_id] = self._failures.get(message_id, 0) + 1
                return AgentResponse(503, b'"busy"')
            return AgentResponse(
                200, json.dumps({"echo": decoded, "message_id": message_id}).encode()
            )
        finally:
            self.in_flight -= 1


async def advance_until(
    clock: FakeClock,
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    step: float = 0.01,
    limit: float = 600.0,
    what: str = "condition",
) -> float:
    """Advance fake time by ``step`` until ``predicate`` holds; return the fake seconds
    it took. Fails naming ``what`` after ``limit`` fake seconds. Real time passes only
    for the loop to run ready tasks (and threads such as the database writer), which
    a bounded number of real yields allows between steps."""
    started = clock.now()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return clock.now() - started
        if clock.now() - started > limit:
            raise AssertionError(f"{what} did not happen within {limit} fake seconds")
        await clock.advance(step)
        await asyncio.sleep(0.001)  # let threads (SQLite writer) finish what they began


# -- an engine on fakes with the supervisor's helpers (test_supervisor, test_engine_fake)

IMAGE = "roost-mimic:latest"
#: Real seconds allowed for the actor to act on what fake time triggered.
ACT_TIMEOUT = 5.0
#: Baseline policy: no idling and a liveness period far beyond any test, so each
#: test turns on only the timers it is about.
BASE_DEFAULTS: dict[str, Any] = {
    "idle_timeout": 0,
    "liveness_interval": 4096,
    "restart_backoff": 8,
    "restart_backoff_max": 20,
    "max_restarts": 3,
    "restart_reset_after": 600,
    "startup_timeout": 32,
    "stop_timeout": 2,
}


class SwitchableAgentClient(FakeAgentClient):
    """``FakeAgentClient`` that can refuse every probe (an app that never gets
    ready) and counts probes (to tell whether a readiness loop is still alive)."""

    def __init__(self, runtime: FakeRuntime) -> None:
        super().__init__(runtime)
        self.refusing = False
        self.probes = 0

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        self.probes += 1
        if self.refusing:
            return ProbeResult(False, 503, "HTTP 503")
        return await super().probe(url, timeout=timeout)


class RecordingNotifier:
    """The admin's notifier: records every notification in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.arrived = asyncio.Event()

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        self.sent.append((kind, payload))
        self.arrived.set()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [payload for sent_kind, payload in self.sent if sent_kind == kind]


class Rig:
    """An ``Engine`` on fakes, plus helpers that wait for the actor to act."""

    def __init__(
        self,
        engine: Engine,
        runtime: FakeRuntime,
        client: SwitchableAgentClient,
        clock: FakeClock,
        notifier: RecordingNotifier,
    ) -> None:
        self.engine = engine
        self.runtime = runtime
        self.client = client
        self.clock = clock
        self.notifier = notifier

    @property
    def sup(self) -> Supervisor:
        return self.engine.supervisor

    def actor(self, name: str) -> AgentActor:
        return self.sup.actor(name)

    def record(self, name: str) -> AgentRecord:
        return self.sup.get(name)

    async def until(
        self, name: str, predicate: Callable[[AgentRecord], bool], what: str
    ) -> AgentRecord:
        """Wait (real-time deadline) until the agent's record satisfies ``predicate``."""
        if not await self.actor(name).wait_for(predicate, ACT_TIMEOUT):
            raise AssertionError(f"agent {name}: timed out waiting for {what}: {self.record(name)}")
        return self.record(name)

    async def reaches(self, name: str, state: AgentState) -> AgentRecord:
        return await self.until(name, lambda r: r.state is state, f"state {state.value}")

    async def start(self, name: str) -> AgentRecord:
        return await self.sup.ensure_running(name, timeout=ACT_TIMEOUT, fail_fast=True)

    async def history(self, name: str) -> list[StateChange]:
        return [h.change for h in await self.engine.store.history(name, limit=1000)]

    async def to_states(self, name: str) -> list[str]:
        return [c.to_state.value for c in await self.history(name)]

    async def container_running(self, container_id: str) -> bool:
        state = await self.runtime.inspect(container_id)
        return state.running and not state.paused

    def calls(self, method: str) -> list[str]:
        return [target for called, target in self.runtime.calls if called == method]


@contextlib.asynccontextmanager
async def open_rig(
    tmp_path: Path,
    *,
    agents: dict[str, dict[str, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    docker: dict[str, Any] | None = None,
    runtime: FakeRuntime | None = None,
    clock: FakeClock | None = None,
    instance: str = "unit",
    stop_on_exit: bool = True,
    backend: Callable[[FakeRuntime], AgentBackend] | None = None,
) -> AsyncIterator[Rig]:
    """Start an Engine on fakes (state under ``tmp_path``); stop it on exit.
    ``backend``: the agent backend to run on the fake runtime (default: the engine's)."""
    clock = clock or FakeClock()
    runtime = runtime or FakeRuntime(images=[IMAGE], clock=clock.now)
    client = SwitchableAgentClient(runtime)
    notifier = RecordingNotifier()
    settings = make_settings(
        tmp_path,
        instance,
        agents=agents if agents is not None else {"echo": {"image": IMAGE}},
        defaults={**BASE_DEFAULTS, **(defaults or {})},
        docker=docker or {},
    )
    engine = Engine(
        settings,
        runtime=runtime,
        agent_client=client,
        notifier=notifier,
        clock=clock,
        lock=True,
        backend=None if backend is None else backend(runtime),
    )
    await engine.start()
    try:
        yield Rig(engine, runtime, client, clock, notifier)
    finally:
        if stop_on_exit:
            await engine.stop()


# -- an ASGI app, or a whole daemon (serving.serve), in this process on a free port ----


class _QuietServer(uvicorn.Server):
    """uvicorn without signal capture (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yields its base URL."""
    sock = await serving.bind_listen_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, proxy_headers=False
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="test.uvicorn")
    try:
        await wait_until(lambda: server.started or task.done(), timeout=10, what="uvicorn")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)
        sock.close()


@contextlib.asynccontextmanager
async def roost_daemon(
    settings: Settings, *, engine: Engine | None = None
) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """Run ``roost up``'s ``serving.serve`` in process on a free loopback port (on
    ``engine`` when given, e.g. one on fakes); yield its base URL and the event that
    stops it (set it to stop it early: the test can watch what a client sees when
    Roost goes away). On exit it is stopped and must have exited 0."""
    sock = await serving.bind_listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    daemon = asyncio.create_task(
        serving.serve(
            settings, engine=engine, listen_socket=sock, shutdown=shutdown, handle_signals=False
        ),
        name="test.roost-daemon",
    )
    url = f"http://127.0.0.1:{port}"

    async def answers() -> bool:
        if daemon.done():
            raise AssertionError(f"the daemon exited with {daemon.result()}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url + "/healthz")).is_success
        except httpx.HTTPError:
            return False

    try:
        await wait_until(answers, what="the daemon answering /healthz")
        yield url, shutdown
    finally:
        shutdown.set()
        assert await daemon == serving.EXIT_OK

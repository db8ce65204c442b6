"""The AgentBackend contract, run against every backend with the same assertions.

``backend`` is parametrized over ``EngineBackend(FakeRuntime)`` (the default
run), ``EngineBackend(DockerRuntime)`` (marker ``docker``, the default run) and
``SwarmBackend`` on the three-node fixture swarm (marker ``swarm``: ``make
swarm-test``). What only some backends can do is gated on their declared
``capabilities`` (pause, the OOM flag), never on which backend it is: a backend
that claims a capability is held to it.

Units run the mimic test agent (HTTP on port 8000); the fake "serves" the ports
it publishes. Every unit a test makes carries a fresh ``roost.instance``; the
harness removes every unit with it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from roost import errors
from roost.adapters.docker_runtime import DockerRuntime
from roost.adapters.engine_backend import EngineBackend
from roost.adapters.swarm_backend import SwarmBackend
from roost.ports.backend import AgentBackend, Endpoint
from roost.ports.runtime import ContainerSpec, RuntimeEvent
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import wait_until
from tests.swarm.conftest import Swarm, swarm  # noqa: F401  (the session fixture, re-used)

MIMIC_PORT = 8000
#: A unit starting (a swarm task being scheduled on a loaded machine included).
UNIT_TIMEOUT = 60.0
#: An exit reaching the event stream: ~55 ms on an engine, a poll or two on a swarm.
EVENT_TIMEOUT = 30.0
SWARM_MIMIC_IMAGE = "roost-mimic:latest"  # what scripts/swarm-fixture loads on every node


class BackendHarness:
    """Drives one backend; subclasses do what only their backend's world can."""

    def __init__(self, backend: AgentBackend, image: str) -> None:
        self.backend = backend
        self.image = image
        self.instance = f"contract-{secrets.token_hex(5)}"
        self.labels = {"roost.managed": "true", "roost.instance": self.instance}

    def spec(self, agent: str = "a", **overrides: Any) -> ContainerSpec:
        fields: dict[str, Any] = {
            "image": self.image,
            "labels": {**self.labels, "roost.agent": agent, "roost.config-hash": "h1"},
            "name": f"roost-{self.instance}-{agent}-{secrets.token_hex(3)}",
            "env": {"MODE": "echo", "ROOST_AGENT_TOKEN": "secret-token-value"},
            "port": MIMIC_PORT,
            "memory": 128 * 1024 * 1024,
            "cap_drop": ("ALL",),
            "cap_add": ("CHOWN", "SETUID", "SETGID", "KILL", "NET_BIND_SERVICE"),
        }
        fields.update(overrides)
        return ContainerSpec(**fields)

    async def running(self, agent: str = "a", **overrides: Any) -> str:
        unit = await self.backend.ensure(self.spec(agent, **overrides))
        await self.backend.wake(unit, timeout=UNIT_TIMEOUT)
        return unit

    async def answers(self, endpoint: Endpoint) -> bool:
        """The unit's agent answers GET /health at ``endpoint``."""
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    endpoint.url + "/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def crash(self, unit: str, code: int) -> None:
        """Make the unit's process exit with ``code`` now."""
        endpoint = await self.backend.endpoint(unit)
        assert endpoint is not None
        await wait_until(lambda: self.answers(endpoint), timeout=UNIT_TIMEOUT, what="GET /health")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    endpoint.url + "/messages",
                    data=json.dumps({"cmd": "exit", "code": code}),
                    timeout=aiohttp.ClientTimeout(total=5),
                ),
            ):
                pass

    async def out_of_memory(self) -> str:
        """A unit whose process the OOM killer ends once it answers (not at its very
        start: dockerd 20.10 misses some OOM kills within ms of a start)."""
        unit = await self.running(memory=64 * 1024 * 1024)
        endpoint = await self.backend.endpoint(unit)
        assert endpoint is not None
        await wait_until(lambda: self.answers(endpoint), timeout=UNIT_TIMEOUT, what="GET /health")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    endpoint.url + "/messages",
                    data=json.dumps({"cmd": "oom"}),
                    timeout=aiohttp.ClientTimeout(total=30),
                ),
            ):
                pass
        return unit

    async def clean_up(self) -> None:
        for unit in await self.backend.list(self.labels):
            await self.backend.remove(unit.id)


class FakeEngineHarness(BackendHarness):
    def __init__(self, runtime: FakeRuntime, image: str) -> None:
        super().__init__(EngineBackend(runtime), image)
        self.runtime = runtime

    async def answers(self, endpoint: Endpoint) -> bool:
        return self.runtime.serves(endpoint.port)

    async def crash(self, unit: str, code: int) -> None:
        self.runtime.crash(unit, exit_code=code)

    async def out_of_memory(self) -> str:
        unit = await self.running()
        self.runtime.crash(unit, exit_code=137, oom=True)
        return unit


@pytest.fixture(
    params=[
        "engine-fake",
        pytest.param("engine-docker", marks=pytest.mark.docker),
        pytest.param("swarm", marks=pytest.mark.swarm),
    ]
)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[BackendHarness]:
    built: BackendHarness
    if request.param == "engine-fake":
        image = "roost-mimic:latest"
        fake = FakeRuntime(images={image})
        built = FakeEngineHarness(fake, image)
        closers: list[Callable[[], Any]] = [fake.close]
    elif request.param == "engine-docker":
        images: dict[str, str] = request.getfixturevalue("docker_images")
        runtime = DockerRuntime()
        built = BackendHarness(EngineBackend(runtime), images["mimic"])
        closers = [runtime.close]
    else:
        fixture: Swarm = request.getfixturevalue("swarm")
        backend = SwarmBackend(
            fixture.manager_url,
            node_hosts={node.node_id: node.docker_url for node in fixture.nodes},
        )
        built = BackendHarness(backend, SWARM_MIMIC_IMAGE)
        closers = [backend.close]
    try:
        yield built
    finally:
        try:
            await built.clean_up()
        finally:
            for close in closers:
                await close()


@contextlib.asynccontextmanager
async def observing(harness: BackendHarness) -> AsyncIterator[list[RuntimeEvent]]:
    """Collect the backend's events about the harness's units while the block runs."""
    seen: list[RuntimeEvent] = []
    stream = harness.backend.observe(harness.labels)

    async def read() -> None:
        async for event in stream:
            seen.append(event)

    reader = asyncio.create_task(read(), name="contract.observe")
    # Let the subscription take its first look before the test acts.
    await asyncio.sleep(0)
    try:
        yield seen
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()


def _about(unit: str, kind: str) -> Callable[[list[RuntimeEvent]], bool]:
    return lambda seen: any(e.kind == kind and e.container_id == unit for e in seen)


# -- the engine -----------------------------------------------------------------------


async def test_ping_returns_api_version_when_engine_answers(harness: BackendHarness) -> None:
    assert re.fullmatch(r"\d+\.\d+", await harness.backend.ping())


async def test_capabilities_name_what_the_backend_offers_when_asked(
    harness: BackendHarness,
) -> None:
    capabilities = harness.backend.capabilities
    assert harness.backend.kind in ("engine", "swarm")
    # One host shares volumes and never moves units; several nodes do neither.
    assert capabilities.shared_volumes is not capabilities.spans_nodes


# -- a unit's life ----------------------------------------------------------------------


async def test_wake_returns_a_running_unit_that_answers_when_ensured(
    harness: BackendHarness,
) -> None:
    unit = await harness.running()

    state = await harness.backend.status(unit)
    assert state.id == unit
    assert state.running
    assert state.status == "running"
    assert state.labels["roost.agent"] == "a"
    assert state.labels["roost.instance"] == harness.instance
    assert "ROOST_AGENT_TOKEN=secret-token-value" in state.env
    assert not any("secret-token-value" in value for value in state.labels.values())
    endpoint = await harness.backend.endpoint(unit)
    assert endpoint is not None
    assert (state.host_ip, state.host_port) == (endpoint.host, endpoint.port)
    await wait_until(lambda: harness.answers(endpoint), timeout=UNIT_TIMEOUT, what="GET /health")


async def test_ensure_refuses_an_absent_image_when_units_run_on_one_engine(
    harness: BackendHarness,
) -> None:
    absent = "roost-absent-image:never-built"
    if harness.backend.capabilities.spans_nodes:
        # Nodes pull for themselves: the unit is made (its task fails later, on a node).
        assert await harness.backend.ensure(harness.spec(image=absent))
        return
    # An engine never pulls in ensure: the supervisor pulls and ensures again.
    with pytest.raises(errors.ImageUnavailable, match=re.escape(absent)):
        await harness.backend.ensure(harness.spec(image=absent))
    assert await harness.backend.list(harness.labels) == []


async def test_list_shows_only_units_carrying_the_labels_when_asked(
    harness: BackendHarness,
) -> None:
    unit = await harness.running("a")

    found = await harness.backend.list(harness.labels)
    other = await harness.backend.list({**harness.labels, "roost.instance": "someone-else"})

    assert [(u.id, u.status, u.labels["roost.agent"]) for u in found] == [(unit, "running", "a")]
    assert other == []


async def test_sleep_stops_and_wake_runs_it_again_when_asked(harness: BackendHarness) -> None:
    unit = await harness.running()

    await harness.backend.sleep(unit, mode="stop", grace=1.0)

    asleep = await harness.backend.status(unit)
    assert not asleep.running
    assert asleep.status == "exited"
    assert [u.status for u in await harness.backend.list(harness.labels)] == ["exited"]

    await harness.backend.wake(unit, timeout=UNIT_TIMEOUT)

    awake = await harness.backend.status(unit)
    assert awake.running
    endpoint = await harness.backend.endpoint(unit)
    assert endpoint is not None
    await wait_until(lambda: harness.answers(endpoint), timeout=UNIT_TIMEOUT, what="GET /health")


async def test_pause_freezes_and_wake_thaws_when_the_backend_can_pause(
    harness: BackendHarness,
) -> None:
    unit = await harness.running()
    if not harness.backend.capabilities.can_pause:
        with pytest.raises(errors.ContainerError):
            await harness.backend.sleep(unit, mode="pause")
        assert (await harness.backend.status(unit)).running
        return

    await harness.backend.sleep(unit, mode="pause")
    assert (await harness.backend.status(unit)).paused

    await harness.backend.wake(unit, paused=True)
    state = await harness.backend.status(unit)
    assert state.running
    assert not state.paused


async def test_remove_makes_the_unit_gone_when_running(harness: BackendHarness) -> None:
    unit = await harness.running()

    await harness.backend.remove(unit)

    with pytest.raises(errors.ContainerNotFound):
        await harness.backend.status(unit)
    assert await harness.backend.list(harness.labels) == []
    # Gone already: no-ops.
    await harness.backend.remove(unit)
    await harness.backend.sleep(unit, mode="stop", grace=0.0)


async def test_logs_tail_has_the_agent_output_when_it_printed(harness: BackendHarness) -> None:
    if isinstance(harness, FakeEngineHarness):
        unit = await harness.backend.ensure(harness.spec())
        harness.runtime.log_lines[unit] = ["mimic: listening on 0.0.0.0:8000"]
        await harness.backend.wake(unit)
    else:
        unit = await harness.running()

    async def printed() -> bool:
        return "listening on" in await harness.backend.logs_tail(unit, lines=20)

    await wait_until(printed, timeout=UNIT_TIMEOUT, interval=0.2, what="the mimic's first line")


# -- exits and events ---------------------------------------------------------------------


async def test_exit_is_observed_with_its_code_when_the_process_crashes(
    harness: BackendHarness,
) -> None:
    async with observing(harness) as seen:
        unit = await harness.running()

        await harness.crash(unit, 3)

        await wait_until(lambda: _about(unit, "die")(seen), timeout=EVENT_TIMEOUT, what="die")
    die = next(e for e in seen if e.kind == "die" and e.container_id == unit)
    assert die.exit_code == 3
    assert die.labels["roost.agent"] == "a"
    state = await harness.backend.status(unit)
    assert not state.running
    assert state.status == "exited"
    assert state.exit is not None
    assert state.exit.exit_code == 3
    assert not state.exit.oom_killed


async def test_oom_kill_is_reported_when_the_backend_can_know(harness: BackendHarness) -> None:
    async with observing(harness) as seen:
        unit = await harness.out_of_memory()

        await wait_until(lambda: _about(unit, "die")(seen), timeout=EVENT_TIMEOUT, what="die")

    state = await harness.backend.status(unit)
    assert state.exit is not None
    assert state.exit.exit_code == 137
    # Reported by the engine itself, or (swarm) read from the node's own API,
    # which this harness reaches (node_hosts).
    assert state.exit.oom_killed, state.exit


async def test_removal_is_observed_when_a_unit_is_removed(harness: BackendHarness) -> None:
    async with observing(harness) as seen:
        unit = await harness.running()

        await harness.backend.remove(unit)

        await wait_until(
            lambda: _about(unit, "destroy")(seen), timeout=EVENT_TIMEOUT, what="destroy"
        )


async def test_wake_fails_naming_the_problem_when_the_unit_cannot_run(
    harness: BackendHarness,
) -> None:
    if isinstance(harness, FakeEngineHarness):
        unit = await harness.backend.ensure(harness.spec(host_port=40111))
        other = await harness.backend.ensure(harness.spec("b", host_port=40111))
        await harness.backend.wake(unit)
    else:
        # The image's own command does not exist: the process cannot start.
        other = await harness.backend.ensure(harness.spec(command=("/no/such/program",)))

    with pytest.raises(errors.ContainerError):
        await harness.backend.wake(other, timeout=UNIT_TIMEOUT)

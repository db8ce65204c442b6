"""The engine chooses from its agent backend's capabilities, on fakes.

- ``[docker] backend`` picks the backend: ``engine`` (containers, over the runtime)
  or ``swarm`` (services; built without touching Docker);
- on a backend without pause the idle ladder stops instead of pausing, a pause
  request is refused and the API does not offer it;
- an agent whose node is lost (a ``node_lost`` event) starts again at once on a new
  unit without using up a restart, says why (``agent.moved``), and a message sent
  meanwhile is delivered after.

``NodeLosingBackend`` is the engine backend over ``FakeRuntime`` with two test
hooks: a declared ``can_pause`` and a way to inject ``node_lost`` into its events
(what ``SwarmBackend`` reports; the real thing is tested on a real swarm, tests/swarm).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from roost import errors
from roost.adapters.engine_backend import ENGINE_CAPABILITIES, EngineBackend
from roost.adapters.swarm_backend import SwarmBackend
from roost.core.states import AgentState
from roost.engine import Engine
from roost.ports.runtime import RuntimeEvent
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until
from tests.support import ACT_TIMEOUT, IMAGE, open_rig

S = AgentState


class NodeLosingBackend(EngineBackend):
    """The engine backend with a declared ``can_pause`` and injectable node loss."""

    def __init__(self, runtime: FakeRuntime, *, can_pause: bool = True) -> None:
        super().__init__(runtime)
        self.capabilities = dataclasses.replace(ENGINE_CAPABILITIES, can_pause=can_pause)
        self._injected: asyncio.Queue[RuntimeEvent] = asyncio.Queue()

    def lose_node(self, unit: str, node: str, labels: Mapping[str, str]) -> None:
        self._injected.put_nowait(
            RuntimeEvent("node_lost", container_id=unit, labels=dict(labels), node=node)
        )

    def observe(self, labels: Mapping[str, str]) -> AsyncIterator[RuntimeEvent]:
        return self._merged(super().observe(labels))

    async def _merged(self, events: AsyncIterator[RuntimeEvent]) -> AsyncIterator[RuntimeEvent]:
        engine_events = asyncio.ensure_future(anext(events))
        injected = asyncio.ensure_future(self._injected.get())
        try:
            while True:
                done, _ = await asyncio.wait(
                    (engine_events, injected), return_when=asyncio.FIRST_COMPLETED
                )
                if engine_events in done:
                    yield engine_events.result()
                    engine_events = asyncio.ensure_future(anext(events))
                if injected in done:
                    yield injected.result()
                    injected = asyncio.ensure_future(self._injected.get())
        finally:
            for waiting in (engine_events, injected):
                waiting.cancel()
            await asyncio.gather(engine_events, injected, return_exceptions=True)


def test_backend_is_the_one_configured_when_the_engine_is_built(tmp_path: Path) -> None:
    engine_settings = make_settings(tmp_path, "b-engine")
    engine = Engine(engine_settings, runtime=FakeRuntime(images=[IMAGE]), lock=False)
    assert isinstance(engine.backend, EngineBackend)
    assert engine.backend.capabilities.can_pause
    assert engine.agents_network == "roost-agents"

    swarm_settings = make_settings(
        tmp_path,
        "b-swarm",
        docker={"backend": "swarm", "host": "unix:///nowhere/docker.sock"},
        agents={"a": {"image": IMAGE, "placement": ["node.labels.gpu==true"]}},
    )
    swarm = Engine(swarm_settings, runtime=FakeRuntime(images=[IMAGE]), lock=False)
    assert isinstance(swarm.backend, SwarmBackend)
    assert swarm.backend.kind == "swarm"
    assert not swarm.backend.capabilities.can_pause
    assert not swarm.backend.capabilities.can_commit
    # Services join no bridge of the manager's: no agents' network unless docker.network.
    assert swarm.agents_network is None


async def test_idle_agent_is_stopped_not_paused_when_the_backend_cannot_pause(
    tmp_path: Path,
) -> None:
    async with open_rig(
        tmp_path,
        defaults={"idle_timeout": 64, "idle_action": "pause", "pause_after": 16},
        backend=lambda runtime: NodeLosingBackend(runtime, can_pause=False),
    ) as rig:
        record = await rig.start("echo")
        assert "pause" not in rig.engine.agents.allowed_actions("echo")
        with pytest.raises(errors.StateError, match="cannot be paused"):
            await rig.engine.agents.act("echo", "pause")

        await rig.clock.advance(32)  # past pause_after: no pause step on this backend
        assert rig.record("echo").state in (S.RUNNING, S.IDLE)
        await rig.clock.advance(32)  # idle_timeout: stopped instead of paused
        stopped = await rig.reaches("echo", S.STOPPED)

        assert stopped.container_id == record.container_id
        assert rig.calls("pause") == []
        assert rig.calls("stop") == [record.container_id]


async def test_idle_agent_pauses_when_the_backend_can(tmp_path: Path) -> None:
    async with open_rig(
        tmp_path,
        defaults={"idle_timeout": 64, "idle_action": "pause"},
        backend=lambda runtime: NodeLosingBackend(runtime, can_pause=True),
    ) as rig:
        record = await rig.start("echo")
        assert "pause" in rig.engine.agents.allowed_actions("echo")
        await rig.clock.advance(64)
        await rig.reaches("echo", S.PAUSED)
        # The state is written before the pause is carried out (intent first).
        await wait_until(lambda: bool(rig.calls("pause")), timeout=ACT_TIMEOUT, what="the pause")
        assert rig.calls("pause") == [record.container_id]


async def test_agent_starts_again_uncounted_when_its_node_is_lost(tmp_path: Path) -> None:
    backend: NodeLosingBackend | None = None

    def make(runtime: FakeRuntime) -> NodeLosingBackend:
        nonlocal backend
        backend = NodeLosingBackend(runtime, can_pause=False)
        return backend

    async with open_rig(tmp_path, backend=make) as rig:
        assert backend is not None
        before = await rig.start("echo")
        assert before.container_id is not None
        labels = (await rig.runtime.inspect(before.container_id)).labels
        rig.client.refusing = True  # the new unit is not ready yet: the message waits

        backend.lose_node(before.container_id, "198.19.0.12", labels)

        moving = await rig.until(
            "echo", lambda r: r.container_id not in (None, before.container_id), "a new unit"
        )
        assert moving.state is S.STARTING
        message, _ = await rig.engine.dispatcher.submit("echo", b'{"hello": "after the move"}')
        rig.client.refusing = False
        await rig.clock.advance(0.0078125)
        after = await rig.reaches("echo", S.RUNNING)

        final = await rig.engine.dispatcher.wait_final("echo", message.id, 5)
        assert final is not None
        assert final.status.value == "delivered"
        assert after.restart_count == 0
        assert before.container_id in rig.calls("remove")
        history = await rig.history("echo")
        assert [(c.from_state.value, c.to_state.value) for c in history[-2:]] == [
            ("running", "starting"),
            ("starting", "running"),
        ]
        assert history[-2].reason == "node 198.19.0.12 went down; starting again on another node"
        moved = [e for e in rig.engine.events.recent(100) if e.kind == "agent.moved"]
        assert [e.data["node"] for e in moved] == ["198.19.0.12"]
        assert rig.notifier.of_kind("agent.moved") == [
            {
                "agent": "echo",
                "node": "198.19.0.12",
                "reason": "node 198.19.0.12 went down; starting again on another node",
            }
        ]

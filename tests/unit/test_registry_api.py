"""``POST /api/agents`` and ``DELETE /api/agents/{name}`` on a FakeRuntime engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from roost import errors
from roost.config import Settings, SpawnedAgent
from roost.testing import EngineHarness
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"
OTHER_IMAGE = "roost-other:1"
INSTANCE = "registry-test"
TOKEN = "s3cret-token"


class Harness:
    def __init__(self, settings: Settings, harness: EngineHarness) -> None:
        self.settings = settings
        self.engine = harness.engine
        self.runtime = harness.runtime
        self.client = harness.client

    async def register(self, body: dict[str, Any], **params: str) -> dict[str, Any]:
        response = await self.client.post("/api/agents", json=body, params=params)
        assert response.status_code == 201, response.text
        agent: dict[str, Any] = response.json()
        return agent


def _settings(tmp_path: Path, **swarm: Any) -> Settings:
    return make_settings(
        tmp_path,
        INSTANCE,
        agents={"configured": {"image": IMAGE}},
        server={"public_url": "http://roost.test:7075"},
        swarm=swarm,
    )


@contextlib.asynccontextmanager
async def _harness(
    settings: Settings, runtime: FakeRuntime, *, token: str | None = None
) -> AsyncIterator[Harness]:
    async with EngineHarness.running(settings, runtime=runtime, token=token) as harness:
        yield Harness(settings, harness)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    async with _harness(_settings(tmp_path), FakeRuntime(images=[IMAGE, OTHER_IMAGE])) as harness:
        yield harness


# -- registering --------------------------------------------------------------------------


async def test_register_answers_201_with_swarm_identity_when_body_valid(api: Harness) -> None:
    agent = await api.register(
        {"name": "worker-1", "agent_id": "w-0001", "capabilities": "code, review"}
    )

    assert agent["name"] == "worker-1"
    assert agent["state"] == "created"
    assert agent["container_id"] is None
    assert agent["agent_id"] == "w-0001"
    assert agent["capabilities"] == ["code", "review"]
    assert agent["image"] == IMAGE
    listed = (await api.client.get("/api/agents")).json()["agents"]
    assert [a["name"] for a in listed] == ["configured", "worker-1"]
    stored = await api.engine.store.get_agent("worker-1")
    assert stored is not None
    assert stored.source == "api"
    assert stored.spec["agent_id"] == "w-0001"


async def test_register_creates_labelled_network_and_volume_when_absent(api: Harness) -> None:
    assert "roost-swarm" not in api.runtime.networks

    await api.register({"name": "worker-1"})

    owned = {"roost.managed": "true", "roost.instance": INSTANCE}
    assert api.runtime.networks["roost-swarm"][1] == owned
    assert api.runtime.volumes["roost-swarm-data"] == owned


async def test_started_container_carries_swarm_env_and_wiring_when_registered_with_start(
    api: Harness,
) -> None:
    agent = await api.register(
        {
            "name": "worker-1",
            "agent_id": "w-0001",
            "capabilities": ["code", "review"],
            "image": OTHER_IMAGE,
            "env": {"EXTRA": "yes"},
            "port": 9000,
        },
        start="true",
    )

    assert agent["state"] == "running"
    assert agent["url"].startswith("http://127.0.0.1:")
    spec = api.runtime.container_spec(agent["container_id"])
    assert spec.image == OTHER_IMAGE
    assert spec.port == 9000
    assert spec.publish_host == "127.0.0.1"  # Roost still reaches it on the host
    assert spec.network == "roost-swarm"
    assert spec.binds == ("roost-swarm-data:/data",)
    assert "host.docker.internal:host-gateway" in spec.extra_hosts
    env = dict(spec.env)
    assert env["COORDINATOR_URL"] == "http://roost.test:7075"
    assert env["AGENT_NAME"] == "worker-1"
    assert env["AGENT_ID"] == "w-0001"
    assert env["AGENT_CAPABILITIES"] == "code,review"
    assert env["EXTRA"] == "yes"
    assert env["ROOST_AGENT"] == "worker-1"
    assert env["ROOST_AGENT_ID"] == "w-0001"


async def test_register_uses_swarm_settings_when_configured(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        network="team-net",
        volume="team-data",
        volume_path="/shared",
        coordinator_url="http://coordinator:9000",
        image=OTHER_IMAGE,
    )
    async with _harness(settings, FakeRuntime(images=[OTHER_IMAGE])) as api:
        agent = await api.register({"name": "worker-1"}, start="true")

        spec = api.runtime.container_spec(agent["container_id"])
        assert spec.image == OTHER_IMAGE
        assert spec.network == "team-net"
        assert spec.binds == ("team-data:/shared",)
        assert dict(spec.env)["COORDINATOR_URL"] == "http://coordinator:9000"
        assert dict(spec.env)["AGENT_ID"] == "worker-1"  # defaults to the name
        assert "team-net" in api.runtime.networks
        assert "team-data" in api.runtime.volumes


async def test_register_joins_no_network_or_volume_when_swarm_disables_them(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, network="", volume="")
    async with _harness(settings, FakeRuntime(images=[IMAGE])) as api:
        agent = await api.register({"name": "worker-1"}, start="true")

        spec = api.runtime.container_spec(agent["container_id"])
        assert spec.network == "roost-agents"  # the agents' network, as configured agents
        assert spec.binds == ()
        assert set(api.runtime.networks) == {"bridge", "host", "none", "roost-agents"}
        # (only the instance owner marker: reactor.owning)
        assert [v for v in api.runtime.volumes if not v.startswith("roost-owner-")] == []


@pytest.mark.parametrize("name", ["configured", "worker-1"])
async def test_register_answers_409_when_name_exists(api: Harness, name: str) -> None:
    await api.register({"name": "worker-1"})

    response = await api.client.post("/api/agents", json={"name": name})

    assert response.status_code == 409
    assert name in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Bad_Name"}, "name"),
        ({"name": "-x"}, "name"),
        ({"name": "w", "capabilities": ["has space"]}, "capabilities"),
        ({"name": "w", "env": {"AGENT_ID": "mine"}}, "env.AGENT_ID"),
        ({"name": "w", "env": {"COORDINATOR_URL": "http://x"}}, "env.COORDINATOR_URL"),
        ({"name": "w", "port": 70000}, "port"),
        ({"name": "w", "image": "  "}, "image"),
        ({"name": "w", "agent_id": " "}, "agent_id"),
    ],
)
async def test_register_answers_400_naming_the_field_when_value_invalid(
    api: Harness, body: dict[str, Any], field: str
) -> None:
    response = await api.client.post("/api/agents", json=body)

    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}: ")
    assert "w" not in api.engine.supervisor.actors


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"agent_id": "x"}, "body.name"),
        ({"name": "w", "port": "eighty"}, "body.port"),
        ({"name": "w", "env": {"A": 1}}, "body.env.A"),
        ({"name": "w", "memory": "1g"}, "body.memory"),
    ],
)
async def test_register_answers_422_naming_the_field_when_json_shape_wrong(
    api: Harness, body: dict[str, Any], field: str
) -> None:
    response = await api.client.post("/api/agents", json=body)

    assert response.status_code == 422, response.text
    assert field in response.json()["error"]


async def test_register_needs_token_when_api_is_secured(tmp_path: Path) -> None:
    async with _harness(_settings(tmp_path), FakeRuntime(images=[IMAGE]), token=TOKEN) as api:
        refused = await api.client.post("/api/agents", json={"name": "w"})
        accepted = await api.client.post(
            "/api/agents", json={"name": "w"}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        refused_delete = await api.client.delete("/api/agents/w")

        assert refused.status_code == 401
        assert accepted.status_code == 201
        assert refused_delete.status_code == 401


async def test_register_announces_agent_registered_when_created(api: Harness) -> None:
    await api.register({"name": "worker-1", "capabilities": "code"})

    [event] = [e for e in api.engine.events.recent(100) if e.kind == "agent.registered"]
    assert event.data == {"agent": "worker-1", "agent_id": "worker-1", "capabilities": ["code"]}


# -- behaving like a configured agent -----------------------------------------------------


async def test_registered_agent_restarts_when_its_container_crashes(api: Harness) -> None:
    first = await api.register({"name": "worker-1"}, start="true")

    api.runtime.crash(first["container_id"], exit_code=1)

    def restarted() -> bool:
        record = api.engine.supervisor.get("worker-1")
        return record.state.value == "running" and record.container_id != first["container_id"]

    await wait_until(restarted, timeout=10, what="worker-1 restarted")
    record = api.engine.supervisor.get("worker-1")
    assert record.restart_count == 1
    assert record.container_id is not None
    assert api.runtime.container_spec(record.container_id).network == "roost-swarm"


async def test_registered_agent_survives_engine_restart_when_state_dir_kept(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    runtime = FakeRuntime(images=[IMAGE])
    async with _harness(settings, runtime) as api:
        await api.register({"name": "worker-1", "agent_id": "w-7", "capabilities": "code"})

    async with _harness(settings, runtime) as api:
        actor = api.engine.supervisor.actor("worker-1")
        assert isinstance(actor.spec, SpawnedAgent)
        assert actor.spec.agent_id == "w-7"
        assert actor.agent_id == "w-7"
        response = await api.client.post("/api/agents/worker-1/wake")
        assert response.status_code == 200, response.text
        cid = response.json()["container_id"]
        spec = runtime.container_spec(cid)
        assert spec.network == "roost-swarm"
        assert spec.binds == ("roost-swarm-data:/data",)
        assert dict(spec.env)["AGENT_ID"] == "w-7"
        assert dict(spec.env)["ROOST_AGENT_ID"] == "w-7"
        assert dict(spec.env)["AGENT_CAPABILITIES"] == "code"


async def test_registered_agent_is_adopted_when_engine_restarts_leaving_it_running(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    runtime = FakeRuntime(images=[IMAGE])
    async with _harness(settings, runtime) as api:
        agent = await api.register({"name": "worker-1"}, start="true")
        await api.engine.stop(leave_running=True)

    async with _harness(settings, runtime) as api:
        await wait_until(
            lambda: api.engine.supervisor.get("worker-1").state.value == "running",
            timeout=10,
            what="worker-1 adopted",
        )
        assert api.engine.supervisor.get("worker-1").container_id == agent["container_id"]


# -- deleting -------------------------------------------------------------------------------


async def test_delete_answers_204_and_removes_container_when_agent_registered(
    api: Harness,
) -> None:
    agent = await api.register({"name": "worker-1"}, start="true")

    response = await api.client.delete("/api/agents/worker-1")

    assert response.status_code == 204
    with pytest.raises(errors.ContainerNotFound):
        await api.runtime.inspect(agent["container_id"])
    assert (await api.client.get("/api/agents/worker-1")).status_code == 404
    assert await api.engine.store.get_agent("worker-1") is None
    calls = [method for method, target in api.runtime.calls if target == agent["container_id"]]
    assert calls.index("stop") < calls.index("remove")  # SIGTERM first, then removal
    again = await api.register({"name": "worker-1"})
    assert again["state"] == "created"


async def test_delete_forgets_agent_when_it_never_had_a_container(api: Harness) -> None:
    await api.register({"name": "worker-1"})

    response = await api.client.delete("/api/agents/worker-1")

    assert response.status_code == 204
    assert "worker-1" not in api.engine.supervisor.actors


async def test_delete_answers_404_when_agent_unknown(api: Harness) -> None:
    response = await api.client.delete("/api/agents/nobody")

    assert response.status_code == 404
    assert response.json()["agent"] == "nobody"


async def test_delete_answers_409_when_agent_is_configured(api: Harness) -> None:
    response = await api.client.delete("/api/agents/configured")

    assert response.status_code == 409
    assert "config" in response.json()["error"]
    assert "configured" in api.engine.supervisor.actors

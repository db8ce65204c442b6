"""The agent listener on a FakeRuntime engine: each container's ROOST_AGENT_TOKEN
opens its own agent's endpoints and nothing else (401 without it, 403 elsewhere:
another agent, the admin API, the proxy), routing only with ``may_route``; tokens
are per container, stored as hashes only, revoked when the container is replaced
or the agent deleted, and never found in labels, the database or the logs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from roost.testing import EngineHarness
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"
ADMIN_TOKEN = "admin-secret"


@pytest.fixture
async def roost(tmp_path: Path) -> AsyncIterator[EngineHarness]:
    settings = make_settings(
        tmp_path,
        "listener-test",
        agents={
            "alice": {"image": IMAGE, "delivery": "pull"},
            "bob": {"image": IMAGE, "delivery": "pull"},
            "router": {"image": IMAGE, "delivery": "pull", "may_route": True},
            "echo": {"image": IMAGE},
        },
    )
    async with EngineHarness.running(settings, token=ADMIN_TOKEN) as harness:
        for name in ("alice", "bob", "router"):
            await harness.engine.agents.wake(name, reason="test", timeout=5)
        yield harness


async def test_own_queue_answers_when_token_is_the_agents_own(roost: EngineHarness) -> None:
    async with roost.agent_client(roost.agent_token("alice")) as alice:
        response = await alice.post("/api/agents/alice/queue/next")
        assert response.status_code == 204


@pytest.mark.parametrize("token", [None, "", "not-a-token", ADMIN_TOKEN])
async def test_agent_listener_answers_401_when_token_is_missing_or_unknown(
    roost: EngineHarness, token: str | None
) -> None:
    async with roost.agent_client(token) as client:
        response = await client.post("/api/agents/alice/queue/next")
        assert response.status_code == 401
        assert "agent token" in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/agents/bob/queue/next"),
        ("POST", "/api/agents/bob/queue/0123/complete"),
        ("POST", "/api/agents/bob/queue/0123/heartbeat"),
        ("GET", "/api/agents/bob/ws"),
    ],
)
async def test_agent_cannot_act_on_another_agent_when_using_its_own_token(
    roost: EngineHarness, method: str, path: str
) -> None:
    async with roost.agent_client(roost.agent_token("alice")) as alice:
        response = await alice.request(method, path, json={"reply": 1})
        assert response.status_code == 403
        body = response.json()
        assert "'alice'" in body["error"]
        assert "'bob'" in body["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/agents"),
        ("GET", "/api/agents/alice"),
        ("POST", "/api/agents/alice/stop"),
        ("POST", "/api/agents/bob/messages"),
        ("POST", "/api/agents/alice/messages"),
        ("GET", "/api/agents/alice/logs"),
        ("POST", "/api/agents"),
        ("DELETE", "/api/agents/bob"),
        ("GET", "/agents/echo/health"),
        ("POST", "/api/jobs"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/"),
        ("GET", "/docs"),
    ],
)
async def test_agent_token_opens_nothing_of_the_admin_api_or_proxy(
    roost: EngineHarness, method: str, path: str
) -> None:
    async with roost.agent_client(roost.agent_token("alice")) as alice:
        response = await alice.request(method, path, json={})
        assert response.status_code == 403
        assert "serves only agent endpoints" in response.json()["error"]


async def test_agent_token_is_refused_by_the_admin_listener(roost: EngineHarness) -> None:
    token = roost.agent_token("alice")
    response = await roost.client.post(
        "/api/agents/alice/queue/next", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    admin = await roost.client.post(
        "/api/agents/alice/queue/next", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert admin.status_code == 204


async def test_route_needs_may_route_when_called_by_an_agent(roost: EngineHarness) -> None:
    async with roost.agent_client(roost.agent_token("alice")) as alice:
        refused = await alice.post("/api/route/echo.x", json={})
        assert refused.status_code == 403
        assert "may_route" in refused.json()["error"]
    async with roost.agent_client(roost.agent_token("router")) as router:
        accepted = await router.post("/api/route/echo.x", json={"from": "router"})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["agent"] == "echo"


async def test_old_token_is_refused_when_container_is_replaced(roost: EngineHarness) -> None:
    old = roost.agent_token("alice")
    await roost.engine.agents.act("alice", "restart")
    await roost.engine.agents.wake("alice", reason="test", timeout=5)
    new = roost.agent_token("alice")
    assert new != old
    async with roost.agent_client(old) as stale:
        assert (await stale.post("/api/agents/alice/queue/next")).status_code == 401
    async with roost.agent_client(new) as fresh:
        assert (await fresh.post("/api/agents/alice/queue/next")).status_code == 204


async def test_token_is_refused_when_agent_is_deleted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "listener-delete", agents={})
    async with EngineHarness.running(settings) as roost:
        registered = await roost.client.post(
            "/api/agents", json={"name": "w1", "capabilities": "x"}
        )
        assert registered.status_code in (200, 201), registered.text
        await roost.engine.agents.wake("w1", reason="test", timeout=5)
        token = roost.agent_token("w1")
        assert (await roost.client.delete("/api/agents/w1")).status_code in (200, 204)
        async with roost.agent_client(token) as gone:
            assert (await gone.post("/api/agents/w1/queue/next")).status_code == 401


async def test_tokens_stay_out_of_labels_database_and_logs(
    roost: EngineHarness, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    token = roost.agent_token("bob")
    await roost.engine.agents.act("bob", "restart")
    await roost.engine.agents.wake("bob", reason="test", timeout=5)
    tokens = [token, roost.agent_token("bob"), roost.agent_token("alice")]
    container_id = roost.engine.agents.get("bob").container_id
    assert container_id is not None
    spec: Any = roost.runtime.container_spec(container_id)
    assert all(t not in str(spec.labels) and t not in str(spec.name) for t in tokens)
    assert all(t not in caplog.text for t in tokens)
    assert roost.engine.database is not None
    await roost.engine.database.flush()
    state = b"".join(p.read_bytes() for p in (tmp_path / "state").glob("roost.db*"))
    assert all(t.encode() not in state for t in tokens)
    events = (await roost.client.get("/api/agents/bob")).text
    assert all(t not in events for t in tokens)


async def test_stopped_container_is_recreated_when_its_token_is_no_longer_valid(
    roost: EngineHarness,
) -> None:
    agents = roost.engine.agents
    first = agents.get("alice").container_id
    await agents.act("alice", "stop")
    await wait_until(lambda: not agents.get("alice").expected_exit, what="the exit seen")
    await roost.engine.credentials.issue("alice")  # e.g. a create that failed since
    await agents.wake("alice", reason="test", timeout=5)
    assert agents.get("alice").container_id != first  # not started again as it was
    async with roost.agent_client(roost.agent_token("alice")) as alice:
        assert (await alice.post("/api/agents/alice/queue/next")).status_code == 204


async def test_stopped_container_is_started_as_it_is_when_its_token_is_valid(
    roost: EngineHarness,
) -> None:
    agents = roost.engine.agents
    first = agents.get("alice").container_id
    await agents.act("alice", "stop")
    await wait_until(lambda: not agents.get("alice").expected_exit, what="the exit seen")
    await agents.wake("alice", reason="test", timeout=5)
    assert agents.get("alice").container_id == first

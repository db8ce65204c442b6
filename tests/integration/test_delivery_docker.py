"""Delivery retries, 4xx failures, concurrent delivery and leases against a real Docker
Engine and the mimic agent, through the HTTP API (the fake-runtime twins are in
tests/unit/test_delivering.py and tests/unit/test_leases.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from roost.core.backoff import Backoff
from roost.core.states import AgentState
from roost.edge import create_app
from roost.engine import Engine
from tests.conftest import make_settings, wait_until

pytestmark = pytest.mark.docker

S = AgentState


@asynccontextmanager
async def running_api(settings: Any) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    async with Engine(settings) as engine:
        # Short retry pauses: these tests are about what happens, not how long it waits.
        engine.dispatcher.retry = Backoff((0.05,), repeat=True)
        transport = httpx.ASGITransport(app=create_app(engine, token=None))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://roost", timeout=60
        ) as client:
            yield engine, client


async def seen_by(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/seen") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def send(client: httpx.AsyncClient, body: Any, **params: str) -> httpx.Response:
    return await client.post("/api/agents/echo/messages", json=body, params=params)


async def test_server_errors_are_retried_until_delivered_when_real_agent_answers_503(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(tmp_path, instance, agents={"echo": {"image": docker_images["mimic"]}})
    async with running_api(settings) as (engine, client):
        flaky = await send(client, {"cmd": "flaky", "failures": 2, "status": 503})
        after = await send(client, {"after": True}, wait="true")
        assert after.status_code == 200, after.text
        shown = (await client.get(f"/api/agents/echo/messages/{flaky.json()['id']}")).json()
        assert shown["status"] == "delivered"
        assert shown["attempts"] == 3
        url = engine.agents.get("echo").url
        assert url is not None
        seen = await seen_by(url)
        # the flaky one three times (same Roost-Message-Id), then the later one: in order
        assert seen["ids"] == [flaky.json()["id"]] * 3 + [after.json()["id"]]


async def test_client_error_fails_the_message_and_the_next_is_delivered_when_agent_answers_4xx(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(tmp_path, instance, agents={"echo": {"image": docker_images["mimic"]}})
    async with running_api(settings) as (_engine, client):
        refused = await send(client, {"cmd": "fail", "status": 422}, wait="true")
        assert refused.status_code == 200, refused.text
        assert refused.json()["status"] == "failed"
        assert refused.json()["attempts"] == 1
        assert refused.json()["error"].startswith("HTTP 422")
        after = await send(client, {"after": True}, wait="true")
        assert after.json()["status"] == "delivered"


async def test_messages_are_delivered_concurrently_when_max_concurrent_messages_is_three(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": docker_images["mimic"], "max_concurrent_messages": 3}},
    )
    async with running_api(settings) as (engine, client):
        # Each "gather" answers once three messages are in the agent at once: only
        # concurrent delivery can satisfy all three.
        sent = [(await send(client, {"cmd": "gather", "count": 3})).json()["id"] for _ in range(3)]
        for message_id in sent:

            async def delivered(message_id: str = message_id) -> bool:
                shown = await client.get(f"/api/agents/echo/messages/{message_id}")
                return bool(shown.json()["status"] == "delivered")

            await wait_until(delivered, timeout=30, what=f"message {message_id} delivered")
            shown = (await client.get(f"/api/agents/echo/messages/{message_id}")).json()
            assert shown["reply"]["gathered"] is True, shown
        url = engine.agents.get("echo").url
        assert url is not None
        seen = await seen_by(url)
        assert seen["max_in_flight"] == 3
        assert sorted(seen["ids"]) == sorted(sent)  # each once (arrival order may interleave)


async def test_lease_keeps_real_agent_awake_past_idle_timeout_then_it_stops_when_released(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": docker_images["mimic"]}},
        defaults={"idle_timeout": 0.5, "idle_mark_after": 0.1},
    )
    async with running_api(settings) as (engine, client):
        taken = await client.post("/api/agents/echo/leases", json={"ttl": 600, "holder": "t"})
        assert taken.status_code == 201, taken.text
        assert engine.agents.get("echo").state is S.RUNNING
        lease_id = taken.json()["id"]
        # Held: the idle timer finds the agent busy every time it fires.
        await wait_until(
            lambda: (
                engine.agents.get("echo").last_activity_at is not None
                and engine.clock.now() - engine.agents.get("echo").state_since > 1.5
            ),
            timeout=10,
            what="three idle timeouts' worth of time held",
        )
        assert engine.agents.get("echo").state is S.RUNNING
        released = await client.delete(f"/api/agents/echo/leases/{lease_id}")
        assert released.status_code == 204
        await wait_until(
            lambda: engine.agents.get("echo").state is S.STOPPED,
            timeout=15,
            what="stopped after the lease was released",
        )


async def test_messages_go_to_the_containers_own_address_when_the_host_reaches_it(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    # Roost runs on the engine's host here: the container's address on its bridge
    # network answers, so deliveries skip the published port's proxy.
    settings = make_settings(tmp_path, instance, agents={"echo": {"image": docker_images["mimic"]}})
    async with running_api(settings) as (engine, client):
        first = await send(client, {"n": 1}, wait="true")
        assert first.json()["status"] == "delivered", first.text
        agents = engine.agents
        await wait_until(
            lambda: agents.address(agents.get("echo")) != agents.get("echo").url,
            what="the container's own address answered",
        )
        record = agents.get("echo")
        assert record.container_id is not None
        state = await engine.runtime.inspect(record.container_id)
        own = f"http://{state.ip_address}:8000"
        assert agents.address(record) == own
        assert (await client.get("/api/agents/echo")).json()["url"] == record.url  # unchanged
        await agents.act("echo", "pause")
        second = await send(client, {"n": 2}, wait="true")  # wakes it from paused
        assert second.json()["status"] == "delivered", second.text
        assert agents.address(agents.get("echo")) == own
        seen = await seen_by(own)
        assert seen["ids"] == [first.json()["id"], second.json()["id"]]

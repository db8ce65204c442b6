"""The durable inbox against a real Docker Engine and the mimic agent, through the HTTP API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from roost.core import events as ev
from roost.core.states import AgentState
from roost.edge import create_app
from roost.engine import Engine
from tests.conftest import WebhookReceiver, make_settings, wait_until

pytestmark = pytest.mark.docker

S = AgentState


@asynccontextmanager
async def running_api(settings: Any) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    async with Engine(settings) as engine:
        transport = httpx.ASGITransport(app=create_app(engine, token=None))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://roost", timeout=60
        ) as client:
            yield engine, client


async def seen_by(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/seen") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def send(client: httpx.AsyncClient, name: str, body: Any, **params: str) -> httpx.Response:
    return await client.post(f"/api/agents/{name}/messages", json=body, params=params)


async def test_message_wakes_stopped_agent_and_gets_reply_when_sent_with_wait(
    tmp_path: Path, instance: str, docker_images: dict[str, str], webhook: WebhookReceiver
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": docker_images["mimic"], "waking_notice_after": 0.05}},
        notify={"webhook": webhook.url},
    )
    async with running_api(settings) as (engine, client):
        sup = engine.supervisor
        await sup.ensure_running("echo", timeout=30)
        await sup.request("echo", ev.StopRequested())
        assert sup.get("echo").state is S.STOPPED

        response = await send(client, "echo", {"hello": "stopped"}, wait="true")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "delivered"
        assert body["reply"]["echo"] == {"hello": "stopped"}
        assert body["reply"]["message_id"] == body["id"]
        assert sup.get("echo").state is S.RUNNING
        await wait_until(
            lambda: bool(webhook.of_kind("agent.waking")), timeout=10, what="waking webhook"
        )
        notice = webhook.of_kind("agent.waking")[0]
        assert notice["agent"] == "echo"
        assert notice["state"] == "stopped"
        assert notice["waited_ms"] >= 50
        assert len(webhook.of_kind("agent.waking")) == 1


async def test_message_unpauses_paused_agent_and_gets_reply_when_sent_with_wait(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(tmp_path, instance, agents={"echo": {"image": docker_images["mimic"]}})
    async with running_api(settings) as (engine, client):
        sup = engine.supervisor
        first = await sup.ensure_running("echo", timeout=30)
        await sup.request("echo", ev.PauseRequested())
        assert sup.get("echo").state is S.PAUSED

        response = await send(client, "echo", {"hello": "paused"}, wait="true")
        assert response.status_code == 200, response.text
        assert response.json()["reply"]["echo"] == {"hello": "paused"}
        record = sup.get("echo")
        assert record.state is S.RUNNING
        assert record.container_id == first.container_id  # unpaused, not recreated
        assert record.url is not None
        seen = await seen_by(record.url)
        assert seen["ids"] == [response.json()["id"]]


async def test_messages_sent_during_crash_loop_arrive_in_order_when_agent_recovers(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": docker_images["mimic"]}},
        defaults={"max_restarts": 5, "restart_backoff": 0.3},
    )
    async with running_api(settings) as (engine, client):
        sup = engine.supervisor
        first = await sup.ensure_running("echo", timeout=30)
        assert first.container_id is not None
        await engine.runtime.kill(first.container_id)  # behind Roost's back: a crash
        # Noticed: in backoff now, or already past it (a loaded machine may poll late).
        await wait_until(
            lambda: (
                sup.get("echo").state in (S.CRASHED, S.RESTARTING)
                or sup.get("echo").restart_count >= 1
            ),
            timeout=10,
            what="crash noticed",
        )
        ids = []
        for i in range(10):
            response = await send(client, "echo", {"i": i})
            assert response.status_code == 202
            ids.append(response.json()["id"])

        async def all_delivered() -> bool:
            listing = (await client.get("/api/agents/echo/messages")).json()
            return all(m["status"] == "delivered" for m in listing["messages"])

        await wait_until(all_delivered, timeout=60, what="all delivered after recovery")
        record = sup.get("echo")
        assert record.container_id != first.container_id
        assert record.restart_count >= 1
        assert record.url is not None
        seen = await seen_by(record.url)
        assert seen["ids"] == ids  # in order, each once, all to the recovered container
        listing = (await client.get("/api/agents/echo/messages")).json()["messages"]
        assert [m["reply"]["echo"]["i"] for m in listing] == list(range(10))


async def test_failed_agent_leaves_messages_dead_and_reset_delivers_them_when_reset(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": docker_images["mimic"]}},
        defaults={"max_restarts": 0},
    )
    async with running_api(settings) as (engine, client):
        sup = engine.supervisor
        first = await sup.ensure_running("echo", timeout=30)
        assert first.container_id is not None
        await engine.runtime.kill(first.container_id)  # behind Roost's back: a crash
        await wait_until(lambda: sup.get("echo").state is S.FAILED, timeout=10, what="failed")
        ids = [(await send(client, "echo", {"i": i})).json()["id"] for i in range(3)]

        async def statuses() -> list[str]:
            listing = (await client.get("/api/agents/echo/messages")).json()
            return [m["status"] for m in listing["messages"]]

        async def all_dead() -> bool:
            return await statuses() == ["dead"] * 3

        await wait_until(all_dead, timeout=10, what="messages dead")
        dead = (await client.get(f"/api/agents/echo/messages/{ids[0]}")).json()
        assert "failed" in dead["error"]
        assert sup.get("echo").container_id in (None, first.container_id)

        reset = await client.post("/api/agents/echo/reset")
        assert reset.status_code == 200, reset.text

        async def all_delivered() -> bool:
            return await statuses() == ["delivered"] * 3

        await wait_until(all_delivered, timeout=60, what="delivered after reset")
        record = sup.get("echo")
        assert record.state is S.RUNNING
        assert record.url is not None
        assert (await seen_by(record.url))["ids"] == ids

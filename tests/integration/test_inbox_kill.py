"""The kill test: Roost is SIGKILLed while 1000 messages to one agent are queued or in
flight, started again, and every message reaches the agent in acceptance order, with
duplicates only inside the at-least-once window: the message being delivered at the
kill and the one before it, whose outcome commit is pipelined with the next send
(``roost.reactor.delivering``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_until
from tests.integration.roost_process import answers_health, docker_state, roost_process

pytestmark = pytest.mark.docker

MESSAGES = 1000
#: Each message makes the agent sleep this long, so delivery lags acceptance and
#: most messages are still queued when Roost is killed.
AGENT_DELAY = 0.005


def _write_config(tmp_path: Path, instance: str, port: int, image: str) -> Path:
    config = tmp_path / "roost.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
state_dir = "{tmp_path / "state"}"
agent_listen = ":0"
log_level = "warning"

[docker]
instance = "{instance}"

[defaults]
memory = "128m"
startup_timeout = 30
stop_timeout = 2
idle_timeout = 3600

[agents.echo]
image = "{image}"
"""
    )
    return config


async def _messages(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/api/agents/echo/messages", params={"limit": MESSAGES})
    response.raise_for_status()
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


async def test_every_message_arrives_in_order_when_roost_is_killed_mid_delivery(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    port = free_port()
    config = _write_config(tmp_path, instance, port, docker_images["mimic"])
    log = tmp_path / "roost.log"
    base = f"http://127.0.0.1:{port}"
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async with roost_process(config, log) as first:
            await wait_until(lambda: answers_health(client), timeout=30, what="first roost up")
            started = await client.post("/api/agents/echo/start")
            assert started.status_code == 200, started.text
            container = started.json()["container_id"]
            body = {"cmd": "sleep", "seconds": AGENT_DELAY}
            for i in range(MESSAGES):
                response = await client.post("/api/agents/echo/messages", json={**body, "i": i})
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])
            pending = (await client.get("/api/agents/echo/messages")).json()["pending"]
            assert pending > 0, "every message was delivered before the kill: nothing tested"
            first.kill()  # SIGKILL: no shutdown, nothing flushed beyond what committed
            await first.wait()

        # the agent's container outlives Roost, and is adopted (not recreated) below
        state = await docker_state(container)
        assert state["Running"] is True

        async with roost_process(config, log):
            await wait_until(lambda: answers_health(client), timeout=30, what="second roost up")

            async def all_delivered() -> bool:
                messages = await _messages(client)
                return len(messages) == MESSAGES and all(
                    m["status"] == "delivered" for m in messages
                )

            await wait_until(all_delivered, timeout=240, interval=0.5, what="all delivered")
            agent = (await client.get("/api/agents/echo")).json()
            assert agent["container_id"] == container, "the container was recreated"
            seen = (await client.get(agent["url"] + "/seen")).json()
    ids: list[str] = seen["ids"]
    assert seen["distinct"] == MESSAGES
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == accepted  # every id, in acceptance order
    duplicates = [p for p in range(1, len(ids)) if ids[p] in set(ids[:p])]
    # at most two (the one in flight at the kill and the one whose outcome was being
    # committed), redelivered first after the restart, in their order
    assert len(duplicates) <= 2, f"redelivered: {[ids[p] for p in duplicates]}"
    for p in duplicates:
        assert ids[p] in ids[p - 2 : p], f"{ids[p]} was redelivered after later messages"
    if duplicates:  # together, before any later message
        assert duplicates == list(range(duplicates[0], duplicates[0] + len(duplicates)))
    print(f"kill test: {pending} pending at the kill, {len(duplicates)} redelivered")

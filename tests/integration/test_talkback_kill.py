"""The kill tests of agents that talk back: ``roost up`` is SIGKILLed while a pull agent
holds a leased message, and while a WebSocket agent has an unanswered one; after a
restart every accepted message is answered, each seen by the agent under its
``Roost-Message-Id``, first seen in acceptance order, and the only duplicate is the
message that was in flight at the kill (at-least-once), handled again right away.

The agent's container outlives Roost and is adopted; it keeps reaching the agent
listener (pinned to one port, so its ROOST_URL stays right) with its token, whose
hash the state database kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_until
from tests.integration.roost_process import answers_health, docker_state, roost_process

pytestmark = pytest.mark.docker

MESSAGES = 8
#: Seconds the agent works on each message: the kill lands while one is in hand.
WORK = 0.25


def _write_config(
    tmp_path: Path, instance: str, image: str, *, port: int, agent_port: int, delivery: str
) -> Path:
    config = tmp_path / "roost.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
agent_listen = ":{agent_port}"
state_dir = "{tmp_path / "state"}"
log_level = "warning"

[docker]
instance = "{instance}"

[defaults]
memory = "128m"
startup_timeout = 30
stop_timeout = 2
idle_timeout = 3600

[agents.talker]
image = "{image}"
delivery = "{delivery}"
lease_timeout = 20
env = {{ DELIVERY = "{delivery}", POLL_WAIT = "5" }}
"""
    )
    return config


async def _messages(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await client.get("/api/agents/talker/messages", params={"limit": "1000", **params})
    response.raise_for_status()
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


@pytest.mark.parametrize("delivery", ["pull", "websocket"])
async def test_every_message_is_answered_in_order_when_roost_is_killed_mid_answer(
    tmp_path: Path, instance: str, docker_images: dict[str, str], delivery: str
) -> None:
    port, agent_port = free_port(), free_port()
    config = _write_config(
        tmp_path,
        instance,
        docker_images["mimic"],
        port=port,
        agent_port=agent_port,
        delivery=delivery,
    )
    log = tmp_path / "roost.log"
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        async with roost_process(config, log) as first:
            await wait_until(lambda: answers_health(client), timeout=30, what="first roost up")
            started = await client.post("/api/agents/talker/start")
            assert started.status_code == 200, started.text
            container = started.json()["container_id"]
            for i in range(MESSAGES):
                response = await client.post(
                    "/api/agents/talker/messages",
                    json={"cmd": "sleep", "seconds": WORK, "i": i},
                )
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])

            async def mid_stream() -> bool:
                delivered = await _messages(client, status="delivered")
                in_hand = await _messages(client, status="delivering")
                return len(delivered) >= 2 and len(in_hand) == 1

            await wait_until(mid_stream, timeout=60, interval=0.01, what="a message in hand")
            first.kill()  # SIGKILL: the lease / the unanswered frame dies with Roost
            await first.wait()
        assert (await docker_state(container))["Running"] is True

        async with roost_process(config, log):
            await wait_until(lambda: answers_health(client), timeout=30, what="second roost up")

            async def all_answered() -> bool:
                messages = await _messages(client)
                return len(messages) == MESSAGES and all(
                    m["status"] == "delivered" for m in messages
                )

            await wait_until(all_answered, timeout=120, interval=0.2, what="all answered")
            agent = (await client.get("/api/agents/talker")).json()
            assert agent["container_id"] == container, "the container was recreated"
            replies = {m["id"]: m["reply"] for m in await _messages(client)}
            seen = (await client.get(agent["url"] + "/seen")).json()

    for message_id in accepted:  # each answered under its own id
        assert replies[message_id]["message_id"] == message_id
    ids: list[str] = seen["ids"]
    assert list(dict.fromkeys(ids)) == accepted  # every id, first seen in acceptance order
    duplicates = [p for p in range(1, len(ids)) if ids[p] in set(ids[:p])]
    # at most the message in hand at the kill, handled again right after the restart
    assert len(duplicates) <= 1, f"handled twice: {[ids[p] for p in duplicates]}"
    for p in duplicates:
        assert ids[p] == ids[p - 1]
    print(f"{delivery} kill test: {len(duplicates)} handled twice")

"""Agents that talk back, against the real Docker Engine: Roost served in this process
(``serving.serve``: the admin API on loopback, the agent listener on the gateway of
the agents' network), agents in containers reaching it through ``ROOST_URL`` with
their own ``ROOST_AGENT_TOKEN``.

- the mimic agent in pull mode and in WebSocket mode, end to end;
- a foreign pull agent: nothing but busybox ``wget`` in a shell loop;
- a WebSocket agent that never connects goes the failed-start way (backoff,
  ``max_restarts``, the admin's webhook);
- routing: first match in configuration order, fan-out, 404, the prefix rule, and
  ``Roost-Event-Type`` reaching the agent;
- the network path: on the agents' network (inter-container traffic off, standard
  daemon with iptables) agent A cannot open a connection to agent B, while both
  reach the agent listener; A's token opens nothing of B's and nothing of the admin
  API, and the admin listener (loopback) is out of a container's reach.

The SIGKILL scenarios are in ``test_talkback_kill.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost import serving
from roost.config import Settings
from roost.engine import Engine
from tests.conftest import (
    WebhookReceiver,
    docker,
    docker_inspect,
    make_settings,
    wait_until,
)

pytestmark = pytest.mark.docker

#: A pull agent with no Roost code inside: busybox wget in a shell loop. It takes a
#: message, replies naming itself and the id, and takes the next.
WGET_PULL_AGENT = r"""
queue="$ROOST_URL/api/agents/$ROOST_AGENT/queue"
auth="Authorization: Bearer $ROOST_AGENT_TOKEN"
while true; do
  lease=$(wget -q -O - --header "$auth" --post-data '' "$queue/next?wait=5") || { sleep 0.2; continue; }
  id=$(echo "$lease" | sed -n 's/^{"id": *"\([0-9a-f]*\)".*/\1/p')
  [ -n "$id" ] || continue
  wget -q -O /dev/null --header "$auth" --header 'Content-Type: application/json' \
    --post-data "{\"reply\": {\"handled_by\": \"busybox-wget\", \"id\": \"$id\"}}" \
    "$queue/$id/complete"
done
"""


class Daemon:
    def __init__(self, engine: Engine, client: httpx.AsyncClient) -> None:
        self.engine = engine
        self.client = client

    async def send(self, agent: str, body: Any) -> dict[str, Any]:
        response = await self.client.post(
            f"/api/agents/{agent}/messages", params={"wait": "true", "timeout": "30"}, json=body
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def agent(self, name: str) -> dict[str, Any]:
        response = await self.client.get(f"/api/agents/{name}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[Daemon]:
    """Roost as ``roost up`` serves it, in this process, on the real engine."""
    engine = Engine(settings)
    sock = await serving.bind_listen_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop = asyncio.Event()
    task = asyncio.create_task(
        serving.serve(
            settings, engine=engine, listen_socket=sock, shutdown=stop, handle_signals=False
        ),
        name="test.roost",
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def up() -> bool:
                if task.done():
                    raise AssertionError(f"serve ended early: exit {task.result()}")
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, timeout=30, what="roost answering /healthz")
            yield Daemon(engine, client)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 60) == serving.EXIT_OK


async def _mimic(daemon: Daemon, agent: str, path: str) -> dict[str, Any]:
    """GET ``path`` (``/seen``, ``/talkback``) of a mimic agent's own HTTP server."""
    url = (await daemon.agent(agent))["url"]
    async with httpx.AsyncClient(timeout=10) as client:
        found: dict[str, Any] = (await client.get(f"{url}{path}")).json()
    return found


def _settings(
    tmp_path: Path, instance: str, agents: dict[str, dict[str, Any]], **sections: Any
) -> Settings:
    return make_settings(
        tmp_path,
        instance,
        agents=agents,
        # busybox as PID 1 ignores SIGTERM: stop it quickly
        defaults={"idle_timeout": 0, "hold_timeout": 30, "stop_timeout": 0.5},
        **sections,
    )


async def test_mimic_pulls_and_answers_messages_when_in_pull_mode(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agent = {
        "image": docker_images["mimic"],
        "delivery": "pull",
        "nudge_path": "/task",
        "lease_timeout": 10,
        "env": {"DELIVERY": "pull", "POLL_WAIT": "5"},
    }
    async with served(_settings(tmp_path, instance, {"puller": agent})) as roost:
        ids = []
        for n in range(3):
            answer = await roost.send("puller", {"n": n})
            assert answer["status"] == "delivered"
            assert answer["reply"]["echo"] == {"n": n}
            assert answer["reply"]["message_id"] == answer["id"]
            assert answer["attempts"] == 1
            ids.append(answer["id"])
        failed = await roost.send("puller", {"cmd": "fail"})
        assert failed["status"] == "failed"
        assert "failing on request" in failed["error"]
        seen = await _mimic(roost, "puller", "/seen")
        assert seen["ids"][:3] == ids
        assert (await _mimic(roost, "puller", "/talkback"))["nudges"] >= 1
        env = docker_inspect((await roost.agent("puller"))["container_id"])["Config"]["Env"]
        assert f"ROOST_URL={roost.engine.agent_url}" in env


async def test_mimic_answers_over_its_websocket_when_in_websocket_mode(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agent = {
        "image": docker_images["mimic"],
        "delivery": "websocket",
        "env": {"DELIVERY": "websocket"},
    }
    async with served(_settings(tmp_path, instance, {"talker": agent})) as roost:
        started = await roost.client.post("/api/agents/talker/start")
        assert started.status_code == 200, started.text
        assert roost.engine.channels.connected("talker")  # ready means connected
        for n in range(3):
            answer = await roost.send("talker", {"n": n})
            assert answer["reply"]["echo"] == {"n": n}
            assert answer["reply"]["message_id"] == answer["id"]
        routed_failure = await roost.send("talker", {"cmd": "fail"})
        assert routed_failure["status"] == "failed"
        assert (await _mimic(roost, "talker", "/talkback"))["connections"] == 1


async def test_busybox_wget_agent_pulls_and_completes_messages_end_to_end(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agent = {
        "image": docker_images["busybox"],
        "command": ["sh", "-c", WGET_PULL_AGENT],
        "delivery": "pull",
        "lease_timeout": 10,
    }
    async with served(_settings(tmp_path, instance, {"shell": agent})) as roost:
        for n in range(3):
            answer = await roost.send("shell", {"n": n, "id": "not-the-message-id"})
            assert answer["status"] == "delivered"
            assert answer["reply"] == {"handled_by": "busybox-wget", "id": answer["id"]}


async def test_websocket_agent_that_never_connects_fails_like_a_failed_start(
    tmp_path: Path, instance: str, docker_images: dict[str, str], webhook: WebhookReceiver
) -> None:
    agent = {
        "image": docker_images["busybox"],
        "command": ["sleep", "3600"],
        "delivery": "websocket",
        "connect_timeout": 1,
    }
    settings = make_settings(
        tmp_path,
        instance,
        agents={"mute": agent},
        defaults={"restart_backoff": 0.1, "max_restarts": 1, "idle_timeout": 0},
        notify={"webhook": webhook.url},
    )
    async with served(settings) as roost:
        await roost.client.post("/api/agents/mute/start", params={"wait": "false"})
        await wait_until(lambda: bool(webhook.of_kind("agent.failed")), timeout=60, what="alert")
        shown = await roost.agent("mute")
        assert shown["state"] == "failed"
        assert shown["restart_count"] == 1
        notice = webhook.of_kind("agent.failed")[0]
        assert "did not connect" in notice["error"]
        states = [h["to"] for h in shown["history"]]
        assert states.count("starting") == 2  # the first start and one restart
        assert "restarting" in states


async def test_routing_picks_first_match_fans_out_and_404s_on_real_agents(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    mimic = docker_images["mimic"]
    agents: dict[str, dict[str, Any]] = {
        "zeta": {"image": mimic, "event_types": ["issue.opened", "pr.*"]},
        "issue-triage": {"image": mimic},
        "alpha": {"image": mimic, "event_types": ["issue.*"]},
    }
    async with served(_settings(tmp_path, instance, agents)) as roost:
        client = roost.client
        first = await client.post("/api/route/issue.opened", json={"n": 1})
        assert first.status_code == 202, first.text
        assert first.json()["agent"] == "zeta"
        prefix = await client.post("/api/route/issue.closed", json={"n": 2})
        assert prefix.json()["agent"] == "issue-triage"
        fanned = await client.post("/api/route/issue.opened", params={"all": "true"}, json={})
        assert [c["agent"] for c in fanned.json()] == ["zeta", "issue-triage", "alpha"]
        nobody = await client.post("/api/route/deploy.done", json={})
        assert nobody.status_code == 404
        assert "deploy.done" in nobody.json()["error"]

        async def replied(agent: str, message_id: str) -> dict[str, Any]:
            path = f"/api/agents/{agent}/messages/{message_id}"

            async def delivered() -> bool:
                return bool((await client.get(path)).json()["status"] == "delivered")

            await wait_until(delivered, timeout=60, what=f"{agent} replied")
            reply: dict[str, Any] = (await client.get(path)).json()["reply"]
            return reply

        reply = await replied("zeta", first.json()["id"])
        assert reply["event_type"] == "issue.opened"  # the agent saw Roost-Event-Type
        assert (await replied("issue-triage", prefix.json()["id"]))["event_type"] == "issue.closed"
        for copy in fanned.json():
            assert (await replied(copy["agent"], copy["id"]))["event_type"] == "issue.opened"


async def test_agent_cannot_reach_another_agent_but_reaches_the_agent_listener(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    serving_agent = {
        "image": docker_images["busybox"],
        "command": ["httpd", "-f", "-p", "8000", "-h", "/tmp"],
        "delivery": "pull",
    }
    agents = {"agent-a": dict(serving_agent), "agent-b": dict(serving_agent)}
    async with served(_settings(tmp_path, instance, agents)) as roost:
        for name in agents:
            started = await roost.client.post(f"/api/agents/{name}/start")
            assert started.status_code == 200, started.text
        a = (await roost.agent("agent-a"))["container_id"]
        b = (await roost.agent("agent-b"))["container_id"]
        network = roost.engine.agents_network
        assert network == "roost-agents"
        options = json.loads(docker("network", "inspect", network, "--format", "{{json .Options}}"))
        assert options["com.docker.network.bridge.enable_icc"] == "false"
        b_address = docker_inspect(b)["NetworkSettings"]["Networks"][network]["IPAddress"]

        # B serves: the host reaches it (the control) ...
        with socket.create_connection((b_address, 8000), timeout=5):
            pass
        # ... agent A does not: inter-container traffic is dropped
        blocked = await _exec(a, f"nc -w 1 {b_address} 8000 </dev/null && echo CONNECTED")
        # (nc itself works there: the agent listener's port, on the gateway, answers)
        listener = roost.engine.agent_url.removeprefix("http://").replace(":", " ")
        reached = await _exec(a, f"nc -w 2 {listener} </dev/null && echo CONNECTED")
        assert "CONNECTED" in reached.stdout, reached.stderr
        assert "CONNECTED" not in blocked.stdout
        assert blocked.returncode != 0

        # A reaches the agent listener and its own queue with its own token ...
        own = await _exec(a, _wget_queue("agent-a"))
        assert own.returncode == 0, own.stderr
        # ... but nothing of B's, and nothing of the admin API through it
        others = await _exec(a, _wget_queue("agent-b"))
        assert "403" in others.stderr
        admin_path = await _exec(
            a,
            'wget -q -O - --header "Authorization: Bearer $ROOST_AGENT_TOKEN" "$ROOST_URL/api/agents"',
        )
        assert "403" in admin_path.stderr
        # the admin listener is on loopback: from a container, nothing answers there
        gateway = roost.engine.agents_gateway
        admin_port = int(str(roost.client.base_url).rsplit(":", 1)[1].rstrip("/"))
        admin = await _exec(a, f"nc -w 2 {gateway} {admin_port} </dev/null && echo CONNECTED")
        assert "CONNECTED" not in admin.stdout


def _wget_queue(agent: str) -> str:
    return (
        'wget -q -O - --header "Authorization: Bearer $ROOST_AGENT_TOKEN" --post-data "" '
        f'"$ROOST_URL/api/agents/{agent}/queue/next?wait=0"'
    )


class _Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


async def _exec(container: str, script: str) -> _Ran:
    """``docker exec`` a shell script in the container (without blocking the loop
    that serves Roost)."""
    process = await asyncio.create_subprocess_exec(
        "docker",
        "exec",
        container,
        "sh",
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return _Ran(process.returncode, out.decode(), err.decode())

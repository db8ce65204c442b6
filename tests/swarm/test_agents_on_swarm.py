"""Roost's guarantees hold across hosts: agents as services on a real three-node swarm.

Each test runs a whole Roost (``roost up``'s ``serving.serve``, in process, or
``roost up`` itself where it is killed) with ``[docker] backend = "swarm"`` on
the fixture's manager, and talks to it over HTTP as a user would:

- durable messages reach agents on two different nodes, in order; each agent is
  one service with Roost's labels, ``Condition: none``, its limits and placement,
  ``dnsrr`` and a host-mode port, and its token only in its env;
- the proxy wakes an agent that was never started or was stopped (scaled to 0)
  and holds the request until it answers, at the node's host-mode port; an idle
  agent is stopped, never paused (a service cannot be), and pause is refused;
- a crashing agent restarts with backoff, then is ``failed`` with one alert that
  carries its exit code and log tail;
- after a SIGKILL of ``roost up`` the next one adopts its services untouched,
  removes the orphans of its instance and nothing else;
- an agent whose node goes down starts again on a healthy node without using a
  restart; a message sent meanwhile waits and is delivered after, and an
  ``agent.moved`` event says why.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiodocker
import httpx
import pytest

from tests.conftest import MIMIC_IMAGE, WebhookReceiver, free_port, wait_until
from tests.integration.roost_process import answers_health, roost_process
from tests.support import roost_daemon

from .conftest import RoostSwarm, SwarmScope, isolated

pytestmark = pytest.mark.swarm

#: A service's task scheduled, its container started and the agent answering:
#: about a second here, far longer on a loaded machine.
START_TIMEOUT = 60.0
#: A node marked down (~11-13 s after it stops answering) and the agent started
#: again elsewhere.
MOVE_TIMEOUT = 90.0
MIMIC = {"image": MIMIC_IMAGE}


async def _agent(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await client.get(f"/api/agents/{name}")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def _state_is(client: httpx.AsyncClient, name: str, *states: str) -> bool:
    return (await _agent(client, name))["state"] in states


async def _exit_seen(client: httpx.AsyncClient, name: str) -> bool:
    return (await _agent(client, name))["last_exit"] is not None


async def _service(manager: aiodocker.Docker, service_id: str) -> dict[str, Any]:
    return dict(await manager.services.inspect(service_id))


async def _running_task(manager: aiodocker.Docker, service_id: str) -> dict[str, Any]:
    tasks = await manager.tasks.list(filters={"service": service_id})
    running = [t for t in tasks if t["Status"]["State"] == "running"]
    assert len(running) == 1, [t["Status"] for t in tasks]
    return dict(running[0])


async def _delivered(client: httpx.AsyncClient, name: str, ids: list[str]) -> bool:
    for message_id in ids:
        response = await client.get(f"/api/agents/{name}/messages/{message_id}")
        if response.json()["status"] != "delivered":
            return False
    return True


# -- messages, services, placement --------------------------------------------------------


async def test_messages_arrive_in_order_when_agents_run_on_two_nodes(
    roost_swarm: RoostSwarm, manager: aiodocker.Docker
) -> None:
    swarm = roost_swarm.swarm
    settings = roost_swarm.settings(
        agents={
            "alpha": {**MIMIC, "placement": ["node.labels.roost-fixture.node==n2"]},
            "beta": {**MIMIC, "placement": ["node.labels.roost-fixture.node==n3"]},
        },
        defaults={"memory": "96m", "cpus": 0.5, "pids_limit": 64},
    )
    async with (
        roost_daemon(settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=START_TIMEOUT) as client,
    ):
        sent: dict[str, list[str]] = {"alpha": [], "beta": []}
        for i in range(10):
            for name in sent:
                response = await client.post(f"/api/agents/{name}/messages", json={"i": i})
                assert response.status_code == 202, response.text
                sent[name].append(response.json()["id"])
        for name, ids in sent.items():
            await wait_until(
                functools.partial(_delivered, client, name, ids),
                timeout=START_TIMEOUT,
                interval=0.2,
                what=f"{name}'s messages delivered",
            )
            seen = (await client.get(f"/agents/{name}/seen")).json()
            assert [m for m in seen["ids"] if m in ids] == ids  # in acceptance order

        for name, node in (("alpha", "n2"), ("beta", "n3")):
            agent = await _agent(client, name)
            service = await _service(manager, agent["container_id"])
            spec = service["Spec"]
            task = await _running_task(manager, agent["container_id"])
            assert task["NodeID"] == swarm.by_name(node).node_id
            assert agent["url"].startswith(f"http://{swarm.by_name(node).address}:")
            assert spec["Labels"]["roost.instance"] == roost_swarm.instance
            assert spec["Labels"]["roost.agent"] == name
            assert spec["Labels"]["roost.managed"] == "true"
            assert "roost.config-hash" in spec["Labels"]
            template = spec["TaskTemplate"]
            assert template["RestartPolicy"]["Condition"] == "none"
            assert template["Placement"]["Constraints"] == [
                f"node.labels.roost-fixture.node=={node}"
            ]
            assert template["Resources"]["Limits"]["MemoryBytes"] == 96 * 1024 * 1024
            assert template["Resources"]["Limits"]["NanoCPUs"] == 500_000_000
            assert template["Resources"]["Limits"]["Pids"] == 64
            assert spec["EndpointSpec"]["Mode"] == "dnsrr"
            assert spec["EndpointSpec"]["Ports"][0]["PublishMode"] == "host"
            env = dict(e.split("=", 1) for e in template["ContainerSpec"]["Env"])
            token = env["ROOST_AGENT_TOKEN"]
            assert token
            assert env["ROOST_URL"].startswith(f"http://{swarm.host_address}:")
            assert not any(token in value for value in spec["Labels"].values())
            assert token not in spec["Name"]


# -- the proxy, wake and sleep ------------------------------------------------------------


async def test_proxy_wakes_the_agent_and_holds_the_request_when_it_sleeps(
    roost_swarm: RoostSwarm, manager: aiodocker.Docker
) -> None:
    settings = roost_swarm.settings(agents={"echo": MIMIC})
    async with (
        roost_daemon(settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=START_TIMEOUT) as client,
    ):
        first = await client.get("/agents/echo/health")
        assert first.status_code == 200, first.text
        assert first.headers["Roost-Cold-Start"] == "created"
        service_id = (await _agent(client, "echo"))["container_id"]

        stopped = await client.post("/api/agents/echo/stop")
        assert stopped.status_code == 200, stopped.text
        service = await _service(manager, service_id)
        assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
        # (A wake before the stop's exit is seen would detach that service and make
        # a new one, as on an engine: wait for the exit, as an idle agent would.)
        await wait_until(
            lambda: _exit_seen(client, "echo"), timeout=START_TIMEOUT, what="the stop's exit"
        )
        refused = await client.post("/api/agents/echo/pause")
        assert refused.status_code == 409, refused.text
        assert "cannot be paused" in refused.json()["error"]
        assert "pause" not in (await _agent(client, "echo")).get("actions", [])

        again = await client.get("/agents/echo/health")

        assert again.status_code == 200, again.text
        assert again.headers["Roost-Cold-Start"] == "stopped"
        assert int(again.headers["Roost-Wake-Ms"]) > 0
        agent = await _agent(client, "echo")
        assert agent["state"] == "running"
        assert agent["container_id"] == service_id  # the same service, scaled up again
        service = await _service(manager, service_id)
        assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 1


async def test_idle_agent_is_stopped_not_paused_when_it_runs_on_a_swarm(
    roost_swarm: RoostSwarm, manager: aiodocker.Docker
) -> None:
    settings = roost_swarm.settings(
        agents={"sleepy": {**MIMIC, "idle_timeout": 1, "idle_action": "pause"}}
    )
    async with (
        roost_daemon(settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=START_TIMEOUT) as client,
    ):
        started = await client.post("/api/agents/sleepy/start")
        assert started.status_code == 200, started.text
        service_id = started.json()["container_id"]

        await wait_until(
            lambda: _state_is(client, "sleepy", "stopped"),
            timeout=START_TIMEOUT,
            interval=0.2,
            what="sleepy stopped for idling",
        )

        service = await _service(manager, service_id)
        assert service["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
        reasons = [h["reason"] for h in (await _agent(client, "sleepy"))["history"]]
        assert "idle timeout" in reasons
        assert not any("pause" in r for r in reasons), reasons


# -- crashes, backoff, failed ----------------------------------------------------------------


async def test_crashing_agent_restarts_with_backoff_then_fails_with_one_alert(
    roost_swarm: RoostSwarm, manager: aiodocker.Docker, webhook: WebhookReceiver
) -> None:
    settings = roost_swarm.settings(
        agents={
            "crasher": {
                **MIMIC,
                "env": {"EXIT_AFTER": "0.5", "EXIT_CODE": "3"},
                "max_restarts": 2,
                "restart_backoff": 0.5,
            }
        },
        notify={"webhook": webhook.url},
    )
    async with (
        roost_daemon(settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=START_TIMEOUT) as client,
    ):
        started = await client.post("/api/agents/crasher/start")
        assert started.status_code == 200, started.text

        await wait_until(
            lambda: _state_is(client, "crasher", "failed"),
            timeout=START_TIMEOUT * 2,
            interval=0.2,
            what="crasher failed",
        )
        await wait_until(lambda: bool(webhook.of_kind("agent.failed")), what="the alert")

        agent = await _agent(client, "crasher")
        assert agent["restart_count"] == 2
        assert agent["last_exit"]["exit_code"] == 3
        assert agent["last_exit"]["oom_killed"] is False
        reasons = [h["reason"] for h in agent["history"]]
        assert any(r.startswith("restart 1 of 2 in 0.5s") for r in reasons), reasons
        assert any(r.startswith("restart 2 of 2 in 1s") for r in reasons), reasons
        [alert] = webhook.of_kind("agent.failed")
        assert alert["agent"] == "crasher"
        assert alert["exit_code"] == 3
        assert alert["restart_count"] == 2
        assert "mimic" in alert["log_tail"]  # the service's own output, read via the manager
        # Every crashed service was removed; nothing of the agent is left running.
        services = await manager.services.list(
            filters={"label": [f"roost.instance={roost_swarm.instance}"]}
        )
        assert services == []


# -- reconcile after a kill ---------------------------------------------------------------


async def test_services_are_adopted_and_orphans_removed_when_roost_was_killed(
    roost_swarm: RoostSwarm, manager: aiodocker.Docker, swarm_scope: SwarmScope
) -> None:
    port = free_port()
    config = roost_swarm.toml(listen_port=port, agents={"a": MIMIC, "b": MIMIC})
    log = roost_swarm.tmp_path / "roost.log"

    def quiet() -> dict[str, Any]:  # (aiodocker rewrites the Env it is given)
        return {"ContainerSpec": {"Image": MIMIC_IMAGE, "Env": {"MODE": "echo"}}}

    endpoint = {"Mode": "dnsrr"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        async with roost_process(config, log, stop_timeout=60) as first:
            await wait_until(lambda: answers_health(client), timeout=60, what="first roost up")
            before = {}
            for name in ("a", "b"):
                response = await client.post(f"/api/agents/{name}/start")
                assert response.status_code == 200, response.text
                before[name] = response.json()["container_id"]
            # An orphan of this instance (no record owns it), another instance's
            # service and an unlabelled one: only the first may go.
            orphan = await manager.services.create(
                quiet(),
                name=swarm_scope.name("orphan"),
                labels={
                    **swarm_scope.labels,
                    "roost.managed": "true",
                    "roost.instance": roost_swarm.instance,
                    "roost.agent": "ghost",
                },
                endpoint_spec=endpoint,
            )
            others = [
                await manager.services.create(
                    quiet(),
                    name=swarm_scope.name("other-instance"),
                    labels={
                        **swarm_scope.labels,
                        "roost.managed": "true",
                        "roost.instance": "someone-else",
                        "roost.agent": "a",
                    },
                    endpoint_spec=endpoint,
                ),
                await manager.services.create(
                    quiet(),
                    name=swarm_scope.name("unlabelled"),
                    labels=swarm_scope.labels,
                    endpoint_spec=endpoint,
                ),
            ]
            first.kill()  # SIGKILL: nothing stopped, nothing flushed
            await first.wait()

        async with roost_process(config, log, stop_timeout=60):
            await wait_until(lambda: answers_health(client), timeout=60, what="second roost up")

            async def orphan_gone() -> bool:
                ids = {s["ID"] for s in await manager.services.list()}
                return orphan["ID"] not in ids

            await wait_until(orphan_gone, timeout=60, interval=0.2, what="the orphan removed")
            for name in ("a", "b"):
                agent = await _agent(client, name)
                assert agent["state"] == "running", agent
                assert agent["container_id"] == before[name]  # adopted, not recreated
                assert agent["restart_count"] == 0
                assert (await client.get(f"/agents/{name}/health")).status_code == 200
            remaining = {s["ID"] for s in await manager.services.list()}
            assert {o["ID"] for o in others} <= remaining


# -- node loss ---------------------------------------------------------------------------


async def test_agent_moves_to_a_healthy_node_uncounted_when_its_node_goes_down(
    roost_swarm: RoostSwarm, manager: aiodocker.Docker
) -> None:
    swarm = roost_swarm.swarm
    settings = roost_swarm.settings(
        agents={"mover": {**MIMIC, "placement": ["node.role==worker"], "max_restarts": 0}}
    )
    async with (
        roost_daemon(settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=START_TIMEOUT) as client,
    ):
        started = await client.post("/api/agents/mover/start")
        assert started.status_code == 200, started.text
        before = started.json()
        task = await _running_task(manager, before["container_id"])
        lost = swarm.node(task["NodeID"])
        [healthy] = [n for n in swarm.nodes if n.role == "worker" and n is not lost]

        async with isolated(swarm, lost):
            cut_at = time.monotonic()
            response = await client.post("/api/agents/mover/messages", json={"while": "down"})
            assert response.status_code == 202, response.text
            message_id = response.json()["id"]

            async def moved() -> bool:
                agent = await _agent(client, "mover")
                return agent["state"] == "running" and agent["container_id"] not in (
                    None,
                    before["container_id"],
                )

            await wait_until(moved, timeout=MOVE_TIMEOUT, interval=0.1, what="mover moved")
            answered = await client.get("/agents/mover/health")
            assert answered.status_code == 200
            elapsed = time.monotonic() - cut_at
            after = await _agent(client, "mover")
            new_task = await _running_task(manager, after["container_id"])
            await wait_until(
                lambda: _delivered(client, "mover", [message_id]),
                timeout=START_TIMEOUT,
                interval=0.2,
                what="the message sent while the node was down",
            )

        assert new_task["NodeID"] == healthy.node_id
        assert after["url"].startswith(f"http://{healthy.address}:")
        assert after["restart_count"] == 0  # max_restarts 0: a counted crash would fail it
        reason = f"node {lost.node_id} went down; starting again on another node"
        assert reason in [h["reason"] for h in after["history"]]
        recent = (await client.get("/api/events", params={"recent": 1000})).json()["events"]
        moves = [e for e in recent if e["kind"] == "agent.moved"]
        assert [(e["agent"], e["node"], e["reason"]) for e in moves] == [
            ("mover", lost.node_id, reason)
        ]
        print(f"node loss → answering again on another node: {elapsed:.1f} s")


async def test_doctor_finds_the_manager_when_the_swarm_backend_is_configured(
    roost_swarm: RoostSwarm,
) -> None:
    config = roost_swarm.toml(listen_port=free_port(), agents={"a": MIMIC})
    roost = Path(sys.executable).parent / "roost"
    process = await asyncio.create_subprocess_exec(
        str(roost),
        "--config",
        str(config),
        "doctor",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    checks = {c["name"]: c for c in json.loads(stdout)["checks"]}
    assert checks["swarm"]["status"] == "ok", (checks, stderr)
    assert checks["images"]["status"] == "skip"

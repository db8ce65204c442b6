"""The swarm fixture works the way the Swarm backend needs (through aiodocker on the manager).

- three nodes, all ready, one of them the leader, ids as the fixture reports;
- a ``dnsrr`` service publishing in host mode answers HTTP from the host on
  each node's address, at the port its task's ``PortStatus`` names, with its
  tasks spread over all three nodes (images loaded everywhere, no registry);
- two services on different nodes reach each other by service name over an
  attachable overlay network;
- a task whose container exits 0 / 1 / is OOM-killed (restart condition
  ``none``) ends ``complete`` / ``failed`` / ``failed``, with the exit code in
  ``ContainerStatus`` (137 for the OOM kill: Swarm has no OOM flag).

The VIP endpoint mode and the ingress routing mesh need IPVS, which this
kernel lacks: every service here uses ``dnsrr`` and host-mode ports.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import aiodocker
import aiohttp
import pytest

from tests.conftest import MIMIC_IMAGE, wait_until

from .conftest import Swarm, SwarmScope

pytestmark = pytest.mark.swarm

MIMIC_PORT = 8000
#: Creating a task, starting its container and the agent answering: about a
#: second here, far longer on a loaded machine.
TASK_TIMEOUT = 60.0
HOST_PORT = {"Protocol": "tcp", "TargetPort": MIMIC_PORT, "PublishMode": "host"}


async def service_tasks(manager: aiodocker.Docker, service: str) -> list[dict[str, Any]]:
    return [dict(task) for task in await manager.tasks.list(filters={"service": service})]


async def running_tasks(
    manager: aiodocker.Docker, service: str, count: int
) -> list[dict[str, Any]]:
    """Wait until ``count`` tasks of ``service`` run; return them."""
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal found
        found = [
            task
            for task in await service_tasks(manager, service)
            if task["DesiredState"] == "running" and task["Status"]["State"] == "running"
        ]
        return len(found) == count

    await wait_until(enough, timeout=TASK_TIMEOUT, interval=0.1, what=f"{count} tasks of {service}")
    return found


def published_port(task: dict[str, Any]) -> int:
    """The host port of the task's published port 8000 (host mode)."""
    ports = task["Status"]["PortStatus"]["Ports"]
    # Docker 20.10 lists the binding once per address family: equal entries.
    published = {port["PublishedPort"] for port in ports if port["TargetPort"] == MIMIC_PORT}
    assert len(published) == 1, f"expected one published port for {MIMIC_PORT}: {ports}"
    port: int = published.pop()
    return port


async def answers(http: aiohttp.ClientSession, url: str) -> bool:
    """True once GET url is 200 with the mimic's health body (its port may open late)."""
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status == 200 and await response.json() == {"ok": True}
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_nodes_are_ready_when_the_fixture_is_up(
    swarm: Swarm, manager: aiodocker.Docker
) -> None:
    nodes = await manager.nodes.list()

    assert {node["ID"] for node in nodes} == {node.node_id for node in swarm.nodes}
    assert {node["Status"]["State"] for node in nodes} == {"ready"}
    assert {node["Spec"]["Availability"] for node in nodes} == {"active"}
    leaders = [node["ID"] for node in nodes if node.get("ManagerStatus", {}).get("Leader")]
    assert leaders == [swarm.by_name("n1").node_id]
    labels = {node["ID"]: node["Spec"]["Labels"].get("roost-fixture.node") for node in nodes}
    assert labels == {node.node_id: node.name for node in swarm.nodes}


async def test_host_mode_port_answers_on_every_node_when_tasks_spread(
    swarm: Swarm, manager: aiodocker.Docker, swarm_scope: SwarmScope
) -> None:
    name = swarm_scope.name("web")
    await manager.services.create(
        {"ContainerSpec": {"Image": MIMIC_IMAGE}, "Placement": {"MaxReplicas": 1}},
        name=name,
        labels=swarm_scope.labels,
        mode={"Replicated": {"Replicas": len(swarm.nodes)}},
        endpoint_spec={"Mode": "dnsrr", "Ports": [HOST_PORT]},
    )

    tasks = await running_tasks(manager, name, len(swarm.nodes))

    assert {task["NodeID"] for task in tasks} == {node.node_id for node in swarm.nodes}
    async with aiohttp.ClientSession() as http:
        for task in tasks:
            url = f"http://{swarm.node(task['NodeID']).address}:{published_port(task)}/health"
            await wait_until(partial(answers, http, url), timeout=TASK_TIMEOUT, what=f"GET {url}")


async def test_services_reach_each_other_when_on_an_attachable_overlay(
    swarm: Swarm, manager: aiodocker.Docker, swarm_scope: SwarmScope
) -> None:
    network = swarm_scope.name("net")
    await manager.networks.create(
        {"Name": network, "Driver": "overlay", "Attachable": True, "Labels": swarm_scope.labels}
    )
    target, caller = swarm_scope.name("target"), swarm_scope.name("caller")
    # On two different workers, so the request crosses the overlay between nodes.
    for name, node, ports in ((target, "n2", []), (caller, "n3", [HOST_PORT])):
        await manager.services.create(
            {
                "ContainerSpec": {"Image": MIMIC_IMAGE},
                "Placement": {"Constraints": [f"node.id=={swarm.by_name(node).node_id}"]},
            },
            name=name,
            labels=swarm_scope.labels,
            networks=[network],
            endpoint_spec={"Mode": "dnsrr", "Ports": ports},
        )
    await running_tasks(manager, target, 1)
    (caller_task,) = await running_tasks(manager, caller, 1)
    caller_url = f"http://{swarm.node(caller_task['NodeID']).address}:{published_port(caller_task)}"
    reply: dict[str, Any] = {}

    async def caller_reached_target() -> bool:
        nonlocal reply
        message = {"cmd": "fetch", "url": f"http://{target}:{MIMIC_PORT}/health"}
        try:
            async with http.post(
                f"{caller_url}/messages", json=message, timeout=aiohttp.ClientTimeout(total=15)
            ) as response:
                reply = await response.json()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async with aiohttp.ClientSession() as http:
        # The target's name resolves once the overlay's gossip reaches the caller's node.
        await wait_until(
            caller_reached_target, timeout=TASK_TIMEOUT, interval=0.2, what="caller → target"
        )

    assert reply["status"] == 200, reply
    assert reply["body"].strip() == '{"ok": true}'
    inspected = await manager.networks.get(network)
    assert (await inspected.show())["Attachable"] is True


@pytest.mark.parametrize(
    ("env", "limits", "state", "exit_code"),
    [
        pytest.param({"EXIT_AFTER": "0.2", "EXIT_CODE": "0"}, {}, "complete", 0, id="exit-0"),
        pytest.param({"EXIT_AFTER": "0.2", "EXIT_CODE": "1"}, {}, "failed", 1, id="exit-1"),
        pytest.param({"OOM": "1"}, {"MemoryBytes": 64 * 1024 * 1024}, "failed", 137, id="oom"),
    ],
)
async def test_task_ends_in_state_when_its_container_exits(
    manager: aiodocker.Docker,
    swarm_scope: SwarmScope,
    env: dict[str, str],
    limits: dict[str, int],
    state: str,
    exit_code: int,
) -> None:
    name = swarm_scope.name("once")
    await manager.services.create(
        {
            "ContainerSpec": {"Image": MIMIC_IMAGE, "Env": env},
            "RestartPolicy": {"Condition": "none"},
            "Resources": {"Limits": limits},
        },
        name=name,
        labels=swarm_scope.labels,
        endpoint_spec={"Mode": "dnsrr"},
    )
    ended: list[dict[str, Any]] = []

    async def task_ended() -> bool:
        nonlocal ended
        ended = [
            task
            for task in await service_tasks(manager, name)
            if task["Status"]["State"] in ("complete", "failed", "rejected", "shutdown")
            # Restart condition none: the orchestrator then wants the task down.
            and task["DesiredState"] == "shutdown"
        ]
        return bool(ended)

    await wait_until(
        task_ended, timeout=TASK_TIMEOUT, interval=0.1, what=f"{name} ended, desired shutdown"
    )

    (task,) = ended
    assert task["Status"]["State"] == state, task["Status"]
    assert task["Status"]["ContainerStatus"]["ExitCode"] == exit_code
    assert len(await service_tasks(manager, name)) == 1  # and made no new task

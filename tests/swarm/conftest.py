"""Fixtures for tests against a real three-node Docker Swarm (``scripts/swarm-fixture``).

``swarm`` (session-scoped) runs ``scripts/swarm-fixture up --json --holder
<pytest pid>`` once and yields the manager's socket and the nodes (name, role,
swarm node id, address the host reaches, socket of that node's daemon). Its
teardown runs ``down --holder <pid>``: the swarm is removed unless another
live test session still holds it, and the script fails when anything is left
behind (namespace, interface, process, mount, cgroup, file), which fails the
session here.

``manager`` is an aiodocker client on the manager, one per test (each test has
its own event loop). ``swarm_scope`` gives a test a unique name prefix and the
label set to put on everything it creates; its teardown removes every service
and network carrying that label and waits until their tasks are gone.

``roost_swarm`` is what a test needs to run Roost on the swarm: a fresh
``roost.instance`` and settings with ``[docker] backend = "swarm"`` on the
manager (``node_hosts`` naming every node's socket, so exit details and OOM
flags are read there) and the agent listener on the host's address on the
hub, where every node reaches it. Its teardown removes every service carrying
that instance. ``isolated(swarm, node)`` cuts a worker off the swarm (node
loss, ``scripts/swarm-fixture isolate``) and rejoins it on exit.

Invariants:
- Tests pin by swarm node id or the ``roost-fixture.node`` label, never by
  hostname: every node shares the host's hostname.
- Only services and networks with this test's ``roost-test.scope`` label are
  removed; a concurrent session's objects are never touched.
- The nodes have no registry: services use the locally loaded images, and the
  daemons prefer local images (``DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiodocker.exceptions import DockerError

from roost.config import Settings
from tests.conftest import ROOT, make_settings, wait_until

SWARM_FIXTURE = ROOT / "scripts" / "swarm-fixture"
SCOPE_LABEL = "roost-test.scope"
#: Removing a service stops its tasks on every node; their stop takes about a
#: second each, longer under load.
CLEANUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class SwarmNode:
    """One node of the fixture swarm, as the host sees it."""

    name: str
    role: str
    node_id: str
    address: str
    socket: str

    @property
    def docker_url(self) -> str:
        return f"unix://{self.socket}"


@dataclass(frozen=True)
class Swarm:
    """The running fixture swarm: its manager and its nodes (manager first)."""

    manager_socket: str
    nodes: tuple[SwarmNode, ...]
    #: the host's address on the hub: where every node reaches the host.
    host_address: str = "198.19.0.1"

    @property
    def manager_url(self) -> str:
        return f"unix://{self.manager_socket}"

    def node(self, node_id: str) -> SwarmNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no fixture node has swarm node id {node_id!r}")

    def by_name(self, name: str) -> SwarmNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no fixture node is named {name!r}")


def run_swarm_fixture(*args: str) -> subprocess.CompletedProcess[str]:
    """Run scripts/swarm-fixture; fail with its output when it fails."""
    result = subprocess.run(
        [str(SWARM_FIXTURE), *args], capture_output=True, text=True, check=False, timeout=600
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"scripts/swarm-fixture {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stderr.strip()}\n{result.stdout.strip()}"
        )
    return result


def parse_swarm(document: dict[str, Any]) -> Swarm:
    nodes = tuple(
        SwarmNode(
            name=node["name"],
            role=node["role"],
            node_id=node["node_id"],
            address=node["address"],
            socket=node["socket"],
        )
        for node in document["nodes"]
    )
    return Swarm(
        manager_socket=document["manager_socket"],
        nodes=nodes,
        host_address=document.get("host_address", "198.19.0.1"),
    )


@pytest.fixture(scope="session")
def swarm(docker_images: dict[str, str]) -> Iterator[Swarm]:
    """A three-node swarm for the whole session; removed at its end unless still held."""
    holder = str(os.getpid())
    up = run_swarm_fixture("up", "--json", "--holder", holder)
    yield parse_swarm(json.loads(up.stdout))
    run_swarm_fixture("down", "--holder", holder)


@pytest.fixture
async def manager(swarm: Swarm) -> AsyncIterator[aiodocker.Docker]:
    """An aiodocker client on the swarm manager."""
    client = aiodocker.Docker(url=swarm.manager_url)
    try:
        yield client
    finally:
        await client.close()


@dataclass(frozen=True)
class SwarmScope:
    """What a test stamps on the services and networks it creates."""

    prefix: str

    @property
    def labels(self) -> dict[str, str]:
        return {SCOPE_LABEL: self.prefix}

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"


@pytest.fixture
async def swarm_scope(manager: aiodocker.Docker) -> AsyncIterator[SwarmScope]:
    """A unique prefix and label; every service and network with it is removed after."""
    scope = SwarmScope(prefix=f"t{secrets.token_hex(4)}")
    yield scope
    await remove_scope(manager, scope)


async def remove_scope(manager: aiodocker.Docker, scope: SwarmScope) -> None:
    label_filter = {"label": [f"{SCOPE_LABEL}={scope.prefix}"]}
    services = await manager.services.list(filters=label_filter)
    service_ids = {service["ID"] for service in services}
    for service_id in service_ids:
        await manager.services.delete(service_id)

    async def tasks_gone() -> bool:
        tasks = await manager.tasks.list()
        return not any(task["ServiceID"] in service_ids for task in tasks)

    await wait_until(tasks_gone, timeout=CLEANUP_TIMEOUT, interval=0.2, what="tasks removed")
    # A network is removable only once the last task endpoint on it is gone,
    # which the nodes report a little after the task list empties.
    for network in await manager.networks.list(filters=label_filter):
        await remove_network(manager, network["Id"], network["Name"])


async def remove_network(manager: aiodocker.Docker, network_id: str, name: str) -> None:
    deadline = time.monotonic() + CLEANUP_TIMEOUT
    while True:
        try:
            await (await manager.networks.get(network_id)).delete()
            return
        except DockerError as exc:
            if exc.status == 404:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"network {name} not removable {CLEANUP_TIMEOUT}s after its services "
                    f"were removed: {exc.message}"
                ) from exc
        await asyncio.sleep(0.2)


# -- Roost on the swarm ------------------------------------------------------------


@dataclass(frozen=True)
class RoostSwarm:
    """A Roost instance's place on the fixture swarm (see the module docstring)."""

    swarm: Swarm
    instance: str
    tmp_path: Path

    @property
    def node_hosts(self) -> dict[str, str]:
        return {node.node_id: node.docker_url for node in self.swarm.nodes}

    def settings(
        self,
        *,
        agents: dict[str, dict[str, Any]],
        defaults: dict[str, Any] | None = None,
        **sections: dict[str, Any],
    ) -> Settings:
        docker = {
            "backend": "swarm",
            "host": self.swarm.manager_url,
            "node_hosts": self.node_hosts,
            **sections.pop("docker", {}),
        }
        server = {"agent_listen": f"{self.swarm.host_address}:0", **sections.pop("server", {})}
        return make_settings(
            self.tmp_path,
            self.instance,
            agents=agents,
            defaults={"liveness_interval": 10, **(defaults or {})},
            docker=docker,
            server=server,
            **sections,
        )

    def toml(self, *, listen_port: int, agents: dict[str, dict[str, Any]]) -> Path:
        """The same as a roost.toml, for ``roost up`` in a process of its own."""
        lines = [
            "[server]",
            f'listen = "127.0.0.1:{listen_port}"',
            f'state_dir = "{self.tmp_path / "state"}"',
            f'agent_listen = "{self.swarm.host_address}:0"',
            'log_level = "info"',
            "[docker]",
            f'instance = "{self.instance}"',
            'backend = "swarm"',
            f'host = "{self.swarm.manager_url}"',
            "node_hosts = { "
            + ", ".join(f'"{node}" = "{url}"' for node, url in self.node_hosts.items())
            + " }",
            "[defaults]",
            'memory = "128m"',
            "startup_timeout = 60",
            "stop_timeout = 2",
            "idle_timeout = 0",
        ]
        for name, table in agents.items():
            lines.append(f"[agents.{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        config = self.tmp_path / "roost.toml"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return config


@pytest.fixture
async def roost_swarm(
    swarm: Swarm, manager: aiodocker.Docker, tmp_path: Path
) -> AsyncIterator[RoostSwarm]:
    """A fresh Roost instance on the swarm; its services are removed afterwards."""
    placed = RoostSwarm(swarm, f"ts-{secrets.token_hex(4)}", tmp_path)
    yield placed
    services = await manager.services.list(filters={"label": [f"roost.instance={placed.instance}"]})
    for service in services:
        with contextlib.suppress(DockerError):
            await manager.services.delete(service["ID"])


@contextlib.asynccontextmanager
async def isolated(swarm: Swarm, node: SwarmNode) -> AsyncIterator[None]:
    """Cut ``node`` off the others (the manager marks it down ~11-13 s later); link
    it again on exit and wait until it is ready."""
    await asyncio.to_thread(run_swarm_fixture, "isolate", node.name)
    try:
        yield
    finally:
        await asyncio.to_thread(run_swarm_fixture, "rejoin", node.name)

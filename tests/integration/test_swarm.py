"""Swarm spawning against a real Docker Engine and the real mimic agent.

A test coordinator (an aiohttp server on the host) is reached by spawned agents
through their ``COORDINATOR_URL`` (``http://host.docker.internal:<port>``, which
resolves to the host through the ``host-gateway`` extra host); two agents share
the data volume; a registered agent survives an engine restart.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from roost import AsyncDockerAgentRunner
from roost.edge import create_app
from roost.engine import Engine
from tests.conftest import (
    container_exists,
    docker_inspect,
    make_settings,
    remove_instance_containers,
    site_port,
    wait_until,
)

pytestmark = pytest.mark.docker


class Coordinator:
    """A coordinator stand-in: records every request agents send it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.received.append({"method": request.method, "path": request.path, "body": body})
        self.arrived.set()
        return web.json_response({"welcome": body})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        # All interfaces: containers reach the host through the bridge gateway.
        site = web.TCPSite(self._runner, "0.0.0.0", 0)
        await site.start()
        self.port = site_port(site)

    @property
    def url(self) -> str:
        return f"http://host.docker.internal:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    server = Coordinator()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def swarm_names(instance: str) -> Iterator[tuple[str, str]]:
    """A network and a volume name of this test's own; both removed afterwards."""
    network, volume = f"{instance}-net", f"{instance}-data"
    yield network, volume
    remove_instance_containers(instance)  # containers first: they hold both
    subprocess.run(["docker", "network", "rm", network], capture_output=True, check=False)
    subprocess.run(["docker", "volume", "rm", volume], capture_output=True, check=False)


async def message(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/messages", json=body, timeout=aiohttp.ClientTimeout(total=20)) as resp,
    ):
        return resp.status, await resp.json()


async def agent_env(url: str) -> dict[str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/env", timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        env: dict[str, str] = await resp.json()
        return env


def docker_object_exists(kind: str, name: str) -> bool:
    found = subprocess.run(["docker", kind, "inspect", name], capture_output=True, check=False)
    return found.returncode == 0


def docker_labels(kind: str, name: str) -> dict[str, str]:
    out = subprocess.run(
        ["docker", kind, "inspect", "--format", "{{json .Labels}}", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    labels: dict[str, str] = json.loads(out)
    return labels


async def test_spawned_agents_reach_coordinator_and_share_volume_when_spawned_by_runner(
    tmp_path: Path,
    instance: str,
    docker_images: dict[str, str],
    coordinator: Coordinator,
    swarm_names: tuple[str, str],
) -> None:
    network, volume = swarm_names
    runner = AsyncDockerAgentRunner(
        image=docker_images["mimic"],
        coordinator_url=coordinator.url,
        network=network,
        volume=volume,
        instance=instance,
        state_dir=tmp_path / "state",
        startup_timeout=30.0,
        defaults={"memory": "128m", "stop_timeout": 2},
    )
    try:
        writer, reader = await asyncio.gather(
            runner.spawn("writer", agent_id="agent-0001", capabilities="write,plan"),
            runner.spawn("reader", capabilities="read"),
        )
        assert writer["agent_id"] == "agent-0001"
        assert writer["capabilities"] == "write,plan"
        assert uuid.UUID(reader["agent_id"])  # a fresh id when the caller gives none
        assert await runner.is_running(writer["container_id"])

        # The agent calls its coordinator at the URL Roost gave it, with its identity.
        env = await agent_env(writer["url"])
        assert env["COORDINATOR_URL"] == coordinator.url
        assert env["AGENT_NAME"] == "writer"
        assert env["AGENT_CAPABILITIES"] == "write,plan"
        status, reply = await message(
            writer["url"],
            {
                "cmd": "fetch",
                "url": env["COORDINATOR_URL"] + "/register",
                "body": {"agent_id": env["AGENT_ID"], "capabilities": env["AGENT_CAPABILITIES"]},
            },
        )
        assert status == 200, reply
        assert reply["status"] == 200
        assert coordinator.received == [
            {
                "method": "POST",
                "path": "/register",
                "body": {"agent_id": "agent-0001", "capabilities": "write,plan"},
            }
        ]

        # Both mount the shared volume: one writes, the other reads.
        status, wrote = await message(
            writer["url"], {"cmd": "write_file", "path": "/data/plan.txt", "content": "step 1"}
        )
        assert status == 200, wrote
        status, read = await message(reader["url"], {"cmd": "read_file", "path": "/data/plan.txt"})
        assert status == 200, read
        assert read["content"] == "step 1"

        # Wiring as Docker sees it: one network, one volume, both labelled as ours.
        for spawned in (writer, reader):
            info = docker_inspect(spawned["container_id"])
            assert list(info["NetworkSettings"]["Networks"]) == [network]
            assert info["HostConfig"]["ExtraHosts"] == ["host.docker.internal:host-gateway"]
            mounts = [(m["Type"], m.get("Name"), m["Destination"]) for m in info["Mounts"]]
            assert ("volume", volume, "/data") in mounts
            bound = info["NetworkSettings"]["Ports"]["8000/tcp"]
            assert bound[0]["HostIp"] == "127.0.0.1"
        for kind, name in (("network", network), ("volume", volume)):
            labels = docker_labels(kind, name)
            assert labels["roost.managed"] == "true"
            assert labels["roost.instance"] == instance

        rows = await runner.list_containers()
        assert [(r.name, r.state) for r in rows] == [
            ("reader", "running"),
            ("writer", "running"),
        ]

        # stop: an unknown id is False; a known one is True and the container is gone.
        assert await runner.stop("0" * 64) is False
        assert await runner.stop(writer["container_id"]) is True
        assert not container_exists(writer["container_id"])
        assert not await runner.is_running(writer["container_id"])
        assert await runner.stop(writer["container_id"]) is False
        assert await runner.stop_all() == 1
        assert not container_exists(reader["container_id"])
        # It created the network and the volume: it removed them.
        assert not docker_object_exists("network", network)
        assert not docker_object_exists("volume", volume)
    finally:
        await runner.stop_all()


async def test_registered_agent_survives_engine_restart_when_registered_over_api(
    tmp_path: Path,
    instance: str,
    docker_images: dict[str, str],
    coordinator: Coordinator,
    swarm_names: tuple[str, str],
) -> None:
    network, volume = swarm_names
    settings = make_settings(
        tmp_path,
        instance,
        swarm={
            "network": network,
            "volume": volume,
            "coordinator_url": coordinator.url,
            "image": docker_images["mimic"],
        },
    )
    async with Engine(settings) as engine:
        app = create_app(engine, token=None)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://roost", timeout=60
        ) as client:
            response = await client.post(
                "/api/agents",
                params={"start": "true"},
                json={"name": "worker", "agent_id": "w-42", "capabilities": ["code"]},
            )
            assert response.status_code == 201, response.text
            first = response.json()
            assert first["state"] == "running"

    assert not docker_inspect(first["container_id"])["State"]["Running"]  # shutdown stopped it

    async with Engine(settings) as engine:
        app = create_app(engine, token=None)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://roost", timeout=60
        ) as client:
            listed = (await client.get("/api/agents")).json()["agents"]
            assert [a["name"] for a in listed] == ["worker"]
            response = await client.post("/api/agents/worker/wake")
            assert response.status_code == 200, response.text
            woken = response.json()
            assert woken["state"] == "running"
            # The stored spec hashes as before, so its stopped container is reused.
            assert woken["container_id"] == first["container_id"]
            assert docker_inspect(woken["container_id"])["State"]["Running"]
            env = await agent_env(woken["url"])
            assert env["AGENT_ID"] == "w-42"
            assert env["ROOST_AGENT_ID"] == "w-42"
            assert env["COORDINATOR_URL"] == coordinator.url
            status, reply = await message(
                woken["url"], {"cmd": "fetch", "url": env["COORDINATOR_URL"] + "/ping"}
            )
            assert (status, reply["status"]) == (200, 200)
            assert coordinator.received[-1]["path"] == "/ping"
            info = docker_inspect(woken["container_id"])
            assert list(info["NetworkSettings"]["Networks"]) == [network]

            response = await client.delete("/api/agents/worker")
            assert response.status_code == 204
            await wait_until(
                lambda: not container_exists(woken["container_id"]),
                timeout=10,
                what="the deleted agent's container to be gone",
            )
            assert (await client.get("/api/agents/worker")).status_code == 404

"""The library API behaves like the code it replaces (issue 2, item 7)."""

from __future__ import annotations

import aiohttp
import pytest

import roost
from roost.core.states import AgentState
from tests.conftest import (
    docker_inspect,
    instance_containers,
    remove_instance_containers,
    wait_until,
)

pytestmark = pytest.mark.docker


async def _exit(url: str, code: int, container_id: str | None) -> None:
    """Make the agent exit and wait until Docker says it has (as a caller would)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/messages", json={"cmd": "exit", "code": code}) as resp,
    ):
        await resp.read()
    assert container_id is not None
    await wait_until(
        lambda: not docker_inspect(container_id)["State"]["Running"], what="container exit"
    )


async def test_one_restart_then_permanent_failure_when_max_restarts_is_one(
    docker_images: dict[str, str], tmp_path: object
) -> None:
    manager = roost.ContainerManager(max_restarts=1, restart_backoff=0)
    try:
        url = await manager.start_agent("code_agent", image=docker_images["mimic"], port=8000)
        assert url.startswith("http://127.0.0.1:")
        assert manager.health("code_agent") is roost.SessionHealth.HEALTHY
        engine = manager.engine
        assert engine is not None
        first_id = engine.supervisor.get("code-agent").container_id

        await _exit(url, 1, first_id)
        new_url = await manager.handle_container_exit(
            "code_agent", image=docker_images["mimic"], port=8000
        )
        record = engine.supervisor.get("code-agent")
        assert record.container_id != first_id
        assert record.restart_count == 1
        assert record.url == new_url

        await _exit(new_url, 1, record.container_id)
        with pytest.raises(roost.ContainerError, match="failed permanently"):
            await manager.handle_container_exit(
                "code_agent", image=docker_images["mimic"], port=8000
            )
        assert manager.state("code_agent") is AgentState.FAILED
        info = manager.exit_info("code_agent")
        assert isinstance(info, roost.ExitInfo)
        assert info.exit_code == 1
        assert manager.health("code_agent") is roost.SessionHealth.UNHEALTHY
    finally:
        instance = manager.instance
        await manager.stop_all()
        await manager.stop_all()  # idempotent
        remove_instance_containers(instance)


async def test_start_agent_raises_container_error_with_log_tail_when_never_healthy(
    docker_images: dict[str, str],
) -> None:
    manager = roost.ContainerManager(max_restarts=0, startup_timeout=1.0)
    try:
        with pytest.raises(roost.ContainerError) as caught:
            await manager.start_agent("never", image=docker_images["mimic"], port=9999)
        assert "never" in str(caught.value)
    finally:
        instance = manager.instance
        await manager.stop_all()
        remove_instance_containers(instance)


async def test_stop_all_stops_and_removes_every_container(docker_images: dict[str, str]) -> None:
    manager = roost.ContainerManager()
    try:
        await manager.start_agent("a", image=docker_images["mimic"])
        await manager.start_agent("b", image=docker_images["mimic"])
        engine = manager.engine
        assert engine is not None
        ids = [engine.supervisor.get(n).container_id for n in ("a", "b")]
        for cid in ids:
            assert cid is not None
            assert docker_inspect(cid)["State"]["Running"]
    finally:
        instance = manager.instance
        await manager.stop_all()
    assert instance_containers(instance) == []


def test_construction_fails_with_container_error_when_docker_is_unreachable(
    tmp_path: object,
) -> None:
    with pytest.raises(roost.ContainerError, match="not reachable"):
        roost.ContainerManager(docker_host="unix:///nonexistent/docker.sock")


async def test_image_that_cannot_be_pulled_raises_container_error() -> None:
    manager = roost.ContainerManager(max_restarts=0)
    try:
        with pytest.raises(roost.ContainerError, match="roost-absent-image:v0"):
            await manager.start_agent("x", image="roost-absent-image:v0")
    finally:
        await manager.stop_all()

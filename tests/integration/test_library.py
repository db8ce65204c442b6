"""The library against a real Docker Engine: the replaced code's own usage, run
verbatim, and agents on their own terms (another port, another health path, an
image whose own HEALTHCHECK says unhealthy)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import roost
from roost.core.states import AgentState
from roost.core.transition import HEALTHCHECK_FAILED
from tests.conftest import (
    ROOT,
    docker,
    docker_inspect,
    free_port,
    instance_containers,
    remove_instance_containers,
    wait_until,
)

pytestmark = pytest.mark.docker

#: The swarm runner's Usage block from the code Roost replaces, verbatim, then
#: what the test checks afterwards.
RUNNER_USAGE = """
from roost import DockerAgentRunner

runner = DockerAgentRunner()
info = runner.spawn("Echo", capabilities="summarise,translate")
runner.stop(info["container_id"])
runner.stop_all()
"""
RUNNER_REPORT = """
import json, threading
print(json.dumps({
    "info": info,
    "instance": runner.instance,
    "stopped_again": runner.stop(info["container_id"]),
    "threads": [t.name for t in threading.enumerate()],
}))
"""


def poll(predicate: Callable[[], bool], *, what: str, timeout: float = 30.0) -> None:
    """``wait_until`` for synchronous tests."""
    asyncio.run(wait_until(predicate, timeout=timeout, what=what))


def running_ids(instance: str) -> list[str]:
    return docker("ps", "-q", "--no-trunc", "--filter", f"label=roost.instance={instance}").split()


def answers(url: str, path: str = "/health") -> int:
    return httpx.get(url + path, timeout=10).status_code


def exists(kind: str, name: str) -> bool:
    found = subprocess.run(["docker", kind, "inspect", name], capture_output=True, check=False)
    return found.returncode == 0


def is_running(container_id: str) -> bool:
    """Docker's view; a container already removed is not running."""
    found = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}}", container_id],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.returncode == 0 and found.stdout.strip() == "true"


def kill_and_wait(container_id: str) -> None:
    """``docker kill``, then wait until Docker says it exited (Roost may have removed
    it already, having seen the die event first)."""
    docker("kill", container_id)
    poll(lambda: not is_running(container_id), what=f"container {container_id[:12]} to exit")


# -- the replaced code's own usage ---------------------------------------------------


def test_runner_usage_block_runs_verbatim_when_run_as_a_plain_script(
    docker_images: dict[str, str],
) -> None:
    network_before = exists("network", "roost-swarm")
    volume_before = exists("volume", "roost-swarm-data")

    done = subprocess.run(
        [sys.executable, "-c", RUNNER_USAGE + RUNNER_REPORT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    info = report["info"]
    try:
        assert info["name"] == "Echo"
        assert info["capabilities"] == "summarise,translate"
        assert info["image"] == "roost-mimic:latest"
        assert info["agent_id"]
        assert report["stopped_again"] is False  # stop_all ran: never a false success
        assert not any(name.startswith("roost-") for name in report["threads"])
        assert not exists("container", info["container_id"])
        assert instance_containers(report["instance"]) == []
        # What the runner created, it removed; what it found, it left.
        assert exists("network", "roost-swarm") is network_before
        assert exists("volume", "roost-swarm-data") is volume_before
    finally:
        remove_instance_containers(report["instance"])


def test_agent_restarts_once_at_the_same_url_then_fails_when_killed_twice(
    docker_images: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    image, port = docker_images["mimic"], free_port()
    manager = roost.ContainerManager()
    instance = manager.instance
    try:
        url = manager.start_agent("issue-triage", image=image, port=port)
        assert url == f"http://localhost:{port}"
        assert answers(url) == 200
        [first] = running_ids(instance)

        kill_and_wait(first)
        manager.handle_container_exit("issue-triage", image=image, port=port)  # returns None

        assert answers(url) == 200  # running again, same URL
        [second] = running_ids(instance)
        assert second != first
        assert manager.health("issue-triage") is roost.SessionHealth.HEALTHY

        kill_and_wait(second)
        with caplog.at_level(logging.CRITICAL, logger="roost.library"):
            manager.handle_container_exit("issue-triage", image=image, port=port)  # returns None

        assert manager.state("issue-triage") is AgentState.FAILED
        assert manager.health("issue-triage") is roost.SessionHealth.UNHEALTHY
        assert running_ids(instance) == []  # no new container
        [critical] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
        assert "failed permanently" in critical.getMessage()
        exit_info = manager.exit_info("issue-triage")
        assert exit_info is not None
        assert exit_info.exit_code == 137
    finally:
        manager.stop_all()
        manager.stop_all()  # idempotent
    assert instance_containers(instance) == []


async def test_sync_manager_serves_a_running_event_loop_and_a_thread_at_once(
    docker_images: dict[str, str],
) -> None:
    # As from a FastAPI handler: a plain call blocks this loop, while the engine runs
    # on the manager's own loop thread; another thread calls at the same time.
    image = docker_images["mimic"]
    manager = roost.ContainerManager(startup_timeout=30)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            from_thread = pool.submit(manager.start_agent, "from-thread", image=image, port=None)
            in_loop = manager.start_agent("in-loop", image=image, port=None)
            threaded = await asyncio.wrap_future(from_thread)

        async with httpx.AsyncClient(timeout=10) as client:
            for url in (in_loop, threaded):
                assert (await client.get(url + "/health")).status_code == 200
    finally:
        manager.stop_all()
    assert instance_containers(manager.instance) == []


def test_start_agent_names_the_host_port_when_another_process_holds_it(
    docker_images: dict[str, str],
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with roost.ContainerManager(startup_timeout=20) as manager:
            with pytest.raises(
                roost.ContainerError, match=re.escape(f"127.0.0.1:{port} is already in use")
            ):
                manager.start_agent("squeezed", image=docker_images["mimic"], port=port)
            assert running_ids(manager.instance) == []
    assert instance_containers(manager.instance) == []


def test_start_agent_raises_container_error_with_log_tail_when_never_healthy(
    docker_images: dict[str, str],
) -> None:
    # Nothing listens on 9999 inside the container: never healthy.
    with roost.ContainerManager(max_restarts=0, startup_timeout=1.0, container_port=9999) as m:
        with pytest.raises(roost.ContainerError) as caught:
            m.start_agent("never", image=docker_images["mimic"], port=None)
        assert "never" in str(caught.value)
        assert caught.value.log_tail


def test_image_that_cannot_be_pulled_raises_container_error() -> None:
    with (
        roost.ContainerManager() as manager,
        pytest.raises(roost.ContainerError, match="roost-absent-image:v0"),
    ):
        manager.start_agent("x", image="roost-absent-image:v0", port=None)


# -- agents on their own terms -------------------------------------------------------


def test_agent_on_another_port_is_published_when_container_port_says_so(
    docker_images: dict[str, str],
) -> None:
    port = free_port()
    with roost.ContainerManager(
        container_port=9000, startup_timeout=20, defaults={"env": {"PORT": "9000"}}
    ) as manager:
        url = manager.start_agent("nine-thousand", image=docker_images["mimic"], port=port)

        assert url == f"http://localhost:{port}"
        assert answers(url) == 200
        [cid] = running_ids(manager.instance)
        bindings = docker_inspect(cid)["HostConfig"]["PortBindings"]
        assert bindings == {"9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}


@pytest.mark.parametrize("health_path", ["/", "/ready"])
def test_agent_is_ready_when_its_own_health_path_answers(
    docker_images: dict[str, str], health_path: str
) -> None:
    with roost.ContainerManager(
        health_path=health_path, startup_timeout=20, defaults={"env": {"HEALTH_PATH": health_path}}
    ) as manager:
        url = manager.start_agent("own-health", image=docker_images["mimic"], port=None)

        assert answers(url, health_path) == 200
        if health_path != "/":
            assert answers(url, "/health") == 404  # Roost never relied on /health


async def test_agent_is_restarted_when_its_image_healthcheck_reports_unhealthy(
    docker_images: dict[str, str],
) -> None:
    async with roost.AsyncContainerManager(max_restarts=1, startup_timeout=20) as manager:
        image = docker_images["mimic-healthcheck"]
        url = await manager.start_agent("checked", image=image, port=None)
        engine = manager.engine
        assert engine is not None
        first = engine.agents.get("checked").container_id
        assert first is not None

        # Only Docker's HEALTHCHECK fails from now on; GET /health stays 200.
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.post(
                url + "/messages",
                json={"cmd": "write_file", "path": "/tmp/unhealthy", "content": "x"},
            )
            assert reply.status_code == 200, reply.text
        await wait_until(
            lambda: engine.agents.get("checked").restart_count == 1,
            what="the unhealthy container to be replaced",
        )
        await wait_until(lambda: manager.url("checked") is not None, what="the agent back up")

        record = engine.agents.get("checked")
        assert record.container_id != first
        assert record.last_exit is not None
        assert record.last_exit.error == HEALTHCHECK_FAILED
        assert not exists("container", first)
        assert manager.health("checked") is roost.SessionHealth.HEALTHY


def test_health_is_unhealthy_when_the_image_healthcheck_keeps_failing(
    docker_images: dict[str, str],
) -> None:
    with roost.ContainerManager(
        max_restarts=1, startup_timeout=20, defaults={"env": {"HEALTHCHECK_FAIL": "1"}}
    ) as manager:
        manager.start_agent("sick", image=docker_images["mimic-healthcheck"], port=None)
        assert manager.health("sick") is roost.SessionHealth.HEALTHY  # HTTP says ready

        poll(lambda: manager.state("sick") is AgentState.FAILED, what="the agent to fail")

        assert manager.health("sick") is roost.SessionHealth.UNHEALTHY
        exit_info = manager.exit_info("sick")
        assert exit_info is not None
        assert exit_info.error == HEALTHCHECK_FAILED
        poll(lambda: running_ids(manager.instance) == [], what="the unhealthy container's removal")

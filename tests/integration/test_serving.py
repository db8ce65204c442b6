"""`roost up` as deployed: a real daemon process, stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import docker_inspect, free_port, wait_until
from tests.integration.roost_process import answers_health, roost_process

pytestmark = pytest.mark.docker


def write_config(tmp_path: Path, instance: str, port: int, *, leave_running: bool) -> Path:
    config = tmp_path / "roost.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
state_dir = "state"
agent_listen = ":0"

[docker]
instance = "{instance}"
leave_running = {"true" if leave_running else "false"}

[defaults]
memory = "96m"
stop_timeout = 5

[agents.echo]
image = "roost-mimic:latest"
""",
        encoding="utf-8",
    )
    return config


@asynccontextmanager
async def roost_up(config: Path, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """``roost up`` answering on ``port`` (its output in roost.log beside ``config``)."""
    async with (
        roost_process(config, config.parent / "roost.log") as process,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        await wait_until(lambda: answers_health(client), what="roost up answering /healthz")
        yield process


async def api(port: int, method: str, path: str) -> Any:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        response = await client.request(method, path)
        response.raise_for_status()
        return response.json()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_agents_with_grace_and_exits_0_when_roost_up_runs(
    tmp_path: Path, instance: str, docker_images: dict[str, str], signum: signal.Signals
) -> None:
    port = free_port()
    config = write_config(tmp_path, instance, port, leave_running=False)
    async with roost_up(config, port) as process:
        agent = await api(port, "POST", "/api/agents/echo/start")
        cid = agent["container_id"]
        assert docker_inspect(cid)["State"]["Running"]
        process.send_signal(signum)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0
    state = docker_inspect(cid)["State"]
    assert not state["Running"]
    assert state["ExitCode"] == 0  # SIGTERM handled by the agent: stopped with grace


async def test_leave_running_keeps_agents_up_and_next_roost_adopts_them_when_signalled(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    port = free_port()
    config = write_config(tmp_path, instance, port, leave_running=True)
    async with roost_up(config, port) as process:
        cid = (await api(port, "POST", "/api/agents/echo/start"))["container_id"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0
    assert docker_inspect(cid)["State"]["Running"]
    async with roost_up(config, port) as process:
        agent = await api(port, "GET", "/api/agents/echo")
        assert agent["state"] == "running"
        assert agent["container_id"] == cid  # adopted, not restarted
        assert agent["restart_count"] == 0
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0


async def test_sighup_reloads_the_file_and_never_kills_the_daemon_when_roost_up_runs(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    port = free_port()
    config = write_config(tmp_path, instance, port, leave_running=False)
    async with roost_up(config, port) as process:
        text = config.read_text(encoding="utf-8")

        log = config.parent / "roost.log"

        def replace(content: str) -> None:
            # Atomically, as editors save: a reload may read the file at any moment.
            staged = config.with_suffix(".new")
            staged.write_text(content, encoding="utf-8")
            staged.replace(config)

        # An invalid file first: nothing changes, the daemon goes on.
        replace(text + '\n[agents.bad]\nimage = "x"\nmemroy = "1g"\n')
        process.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: "configuration not reloaded" in log.read_text(encoding="utf-8"),
            what="the invalid file refused",
        )
        assert "agents.bad.memroy" in log.read_text(encoding="utf-8")
        names = [a["name"] for a in (await api(port, "GET", "/api/agents"))["agents"]]
        assert names == ["echo"]
        replace(text + '\n[agents.added]\nimage = "roost-mimic:latest"\n')

        async def added() -> bool:
            process.send_signal(signal.SIGHUP)
            agents = (await api(port, "GET", "/api/agents"))["agents"]
            return "added" in [a["name"] for a in agents]

        await wait_until(added, what="the reloaded agent")
        assert process.returncode is None
        names = [a["name"] for a in (await api(port, "GET", "/api/agents"))["agents"]]
        assert names == ["added", "echo"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0

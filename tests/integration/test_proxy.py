"""The reverse proxy against a real Docker Engine and the real mimic agent, served by
uvicorn in-process: held requests across slow starts and wakes, streams across the
idle timeout."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from roost.core import events as ev
from roost.core.states import AgentState
from roost.edge import create_app
from roost.engine import Engine
from tests.conftest import make_settings, wait_until
from tests.support import served

pytestmark = pytest.mark.docker

S = AgentState


@contextlib.asynccontextmanager
async def roost(
    tmp_path: Path,
    instance: str,
    agents: dict[str, dict[str, Any]],
    defaults: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Engine, str, aiohttp.ClientSession]]:
    settings = make_settings(tmp_path, instance, agents=agents, defaults=defaults)
    engine = Engine(settings)
    async with (
        engine,
        served(create_app(engine, token=None)) as url,
        aiohttp.ClientSession() as http,
    ):
        yield engine, url, http


async def steps(engine: Engine, name: str) -> list[tuple[S, S, str, float]]:
    return [
        (e.change.from_state, e.change.to_state, e.change.reason, e.change.at)
        for e in await engine.store.history(name, limit=1000)
    ]


async def test_held_request_survives_slow_start_when_agent_created_or_stopped(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agents = {"slow": {"image": docker_images["mimic"], "env": {"STARTUP_DELAY": "1.5"}}}
    async with roost(tmp_path, instance, agents) as (engine, url, http):
        async with http.post(
            url + "/agents/slow/messages", json={"hello": 1}, timeout=aiohttp.ClientTimeout(30)
        ) as response:
            assert response.status == 200, await response.text()
            reply = await response.json()
            assert reply["echo"] == {"hello": 1}
            assert response.headers["Roost-Cold-Start"] == "created"
            assert int(response.headers["Roost-Wake-Ms"]) >= 1500  # it was held, not refused

        await engine.supervisor.request("slow", ev.StopRequested("test"))
        assert engine.supervisor.get("slow").state is S.STOPPED
        async with http.get(
            url + "/agents/slow/health", timeout=aiohttp.ClientTimeout(30)
        ) as response:
            assert response.status == 200
            assert response.headers["Roost-Cold-Start"] == "stopped"
            assert int(response.headers["Roost-Wake-Ms"]) >= 1500
        assert engine.supervisor.get("slow").state is S.RUNNING


async def test_request_wakes_paused_agent_when_agent_paused(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agents = {"echo": {"image": docker_images["mimic"]}}
    async with roost(tmp_path, instance, agents) as (engine, url, http):
        first = await engine.supervisor.ensure_running("echo", timeout=30)
        await engine.supervisor.request("echo", ev.PauseRequested("test"))
        assert engine.supervisor.get("echo").state is S.PAUSED
        async with http.get(url + "/agents/echo/health") as response:
            assert response.status == 200
            assert response.headers["Roost-Cold-Start"] == "paused"
        record = engine.supervisor.get("echo")
        assert record.state is S.RUNNING
        assert record.container_id == first.container_id  # unpaused, not recreated


async def test_stream_stays_open_across_idle_timeout_when_streaming(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agents = {"echo": {"image": docker_images["mimic"]}}
    defaults = {"idle_timeout": 1, "pause_after": 0.5, "idle_action": "stop"}
    async with roost(tmp_path, instance, agents, defaults) as (engine, url, http):
        await engine.supervisor.ensure_running("echo", timeout=30)
        chunk_count, interval = 8, 0.35  # 2.45 s: well past pause_after and idle_timeout
        started = time.time()
        lines: list[bytes] = []
        async with http.get(
            url + f"/agents/echo/stream?n={chunk_count}&interval={interval}",
            timeout=aiohttp.ClientTimeout(30),
        ) as response:
            assert response.status == 200
            async for line in response.content:
                lines.append(line)
        ended = time.time()
        assert len(lines) == chunk_count
        assert lines[-1].strip() == b'{"chunk": %d}' % (chunk_count - 1)
        during = [s for s in await steps(engine, "echo") if started <= s[3] <= ended]
        assert not [s for s in during if s[1] in (S.PAUSED, S.STOPPED)], during
        assert engine.supervisor.get("echo").state in (S.RUNNING, S.IDLE)
        # Once the stream is over, the agent idles as usual.
        await wait_until(
            lambda: engine.supervisor.get("echo").state in (S.PAUSED, S.STOPPED),
            timeout=15,
            what="the agent to sleep after the stream",
        )

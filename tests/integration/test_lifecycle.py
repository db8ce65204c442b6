"""The agent lifecycle against a real Docker Engine and the real mimic agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from roost import errors
from roost.core import events as ev
from roost.core.states import AgentState
from roost.engine import Engine
from tests.conftest import (
    WebhookReceiver,
    container_exists,
    docker_inspect,
    make_settings,
    wait_until,
)

pytestmark = pytest.mark.docker

S = AgentState


async def post(url: str, body: Any) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        return await resp.json()


async def history(engine: Engine, name: str) -> list[tuple[str, str, str, float]]:
    return [
        (h.change.from_state.value, h.change.to_state.value, h.change.reason, h.change.at)
        for h in await engine.store.history(name, limit=1000)
    ]


async def test_agent_starts_and_answers_when_started(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": docker_images["mimic"], "env": {"MODE": "echo"}}},
        defaults={"memory": "96m", "pids_limit": 64},
    )
    async with Engine(settings) as engine:
        record = await engine.supervisor.ensure_running("echo", timeout=30)
        assert record.state is S.RUNNING
        assert record.url is not None
        reply = await post(record.url + "/messages", {"hello": 1})
        assert reply["echo"] == {"hello": 1}
        assert reply["agent"] == "echo"

        assert record.container_id is not None
        info = docker_inspect(record.container_id)
        labels = info["Config"]["Labels"]
        assert labels["roost.managed"] == "true"
        assert labels["roost.instance"] == instance
        assert labels["roost.agent"] == "echo"
        assert labels["roost.config-hash"] == settings.agent("echo").config_hash
        host = info["HostConfig"]
        assert host["Memory"] == 96 * 1024 * 1024
        assert host["MemorySwap"] == host["Memory"]
        assert host["PidsLimit"] == 64
        assert "no-new-privileges" in host["SecurityOpt"]
        env = dict(e.split("=", 1) for e in info["Config"]["Env"])
        assert env["ROOST_AGENT"] == "echo"
        assert env["ROOST_AGENT_ID"] == "echo"
        assert env["MODE"] == "echo"
        assert "ROOST_URL" in env
        # concurrent wake requests merge into the one running container
        again = await engine.supervisor.ensure_running("echo", timeout=30)
        assert again.container_id == record.container_id


async def test_concurrent_starts_merge_into_one_container_when_agent_is_stopped(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    import asyncio

    settings = make_settings(tmp_path, instance, agents={"echo": {"image": docker_images["mimic"]}})
    async with Engine(settings) as engine:
        records = await asyncio.gather(
            *(engine.supervisor.ensure_running("echo", timeout=30) for _ in range(5))
        )
        assert len({r.container_id for r in records}) == 1
        created = [h for h in await history(engine, "echo") if h[1] == "starting"]
        assert len(created) == 1


async def test_crash_restarts_with_backoff_when_agent_exits_nonzero(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    backoff = 0.4
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": docker_images["mimic"]}},
        defaults={"restart_backoff": backoff, "max_restarts": 3},
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        first = await sup.ensure_running("echo", timeout=30)
        await post(first.url + "/messages", {"cmd": "exit", "code": 3})  # type: ignore[operator]
        await wait_until(
            lambda: (
                sup.get("echo").state is S.RUNNING
                and sup.get("echo").container_id != first.container_id
            ),
            what="restart after the crash",
        )
        record = sup.get("echo")
        assert record.restart_count == 1
        assert record.last_exit is not None
        assert record.last_exit.exit_code == 3
        assert not record.last_exit.oom_killed
        assert first.container_id is not None
        assert not container_exists(first.container_id)
        steps = await history(engine, "echo")
        to_states = [s[1] for s in steps]
        i = to_states.index("crashed")
        assert to_states[i : i + 4] == ["crashed", "restarting", "starting", "running"]
        assert "exited with code 3" in steps[i][2]
        # the restart waited for the configured backoff (a lower bound, not a speed claim)
        assert steps[i + 2][3] - steps[i + 1][3] >= backoff * 0.95


async def test_agent_fails_after_max_restarts_and_admin_is_notified_when_it_keeps_crashing(
    tmp_path: Path, instance: str, docker_images: dict[str, str], webhook: WebhookReceiver
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={
            "crashy": {
                "image": docker_images["mimic"],
                "env": {"EXIT_AFTER": "0.3", "EXIT_CODE": "2"},
            }
        },
        defaults={"restart_backoff": 0.05, "max_restarts": 2},
        notify={"webhook": webhook.url},
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        await sup.request("crashy", ev.StartRequested())
        await wait_until(
            lambda: sup.get("crashy").state is S.FAILED, timeout=60, what="agent failed"
        )
        await wait_until(lambda: bool(webhook.of_kind("agent.failed")), what="webhook")
        record = sup.get("crashy")
        assert record.restart_count == 2
        notices = webhook.of_kind("agent.failed")
        assert len(notices) == 1
        notice = notices[0]
        assert notice["agent"] == "crashy"
        assert notice["exit_code"] == 2
        assert notice["oom_killed"] is False
        assert notice["restart_count"] == 2
        assert "mimic" in notice["log_tail"]
        assert len(notice["log_tail"].splitlines()) <= 50
        # failed stays failed: a wake is refused until reset
        with pytest.raises(errors.StateError):
            await sup.request("crashy", ev.StartRequested())
        reset = await sup.request("crashy", ev.ResetRequested())
        assert reset.state is S.STOPPED
        assert reset.restart_count == 0


async def test_oom_kill_is_recorded_in_exit_info_when_agent_exhausts_memory(
    tmp_path: Path, instance: str, docker_images: dict[str, str], webhook: WebhookReceiver
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"hog": {"image": docker_images["mimic"], "memory": "48m", "max_restarts": 0}},
        notify={"webhook": webhook.url},
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        record = await sup.ensure_running("hog", timeout=30)
        await post(record.url + "/messages", {"cmd": "oom"})  # type: ignore[operator]
        await wait_until(lambda: sup.get("hog").state is S.FAILED, what="OOM-killed agent")
        last_exit = sup.get("hog").last_exit
        assert last_exit is not None
        assert last_exit.oom_killed
        assert last_exit.exit_code == 137
        await wait_until(lambda: bool(webhook.of_kind("agent.failed")), what="webhook")
        assert webhook.of_kind("agent.failed")[0]["oom_killed"] is True


async def test_unhealthy_agent_is_restarted_when_liveness_fails(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"sick": {"image": docker_images["mimic"]}},
        defaults={"liveness_interval": 0.2, "liveness_failures": 2, "max_restarts": 3},
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        first = await sup.ensure_running("sick", timeout=30)
        await post(first.url + "/messages", {"cmd": "unhealthy"})  # type: ignore[operator]
        await wait_until(
            lambda: (
                sup.get("sick").state is S.RUNNING
                and sup.get("sick").container_id != first.container_id
            ),
            what="restart of the unhealthy agent",
        )
        assert sup.get("sick").restart_count == 1
        reasons = [h[2] for h in await history(engine, "sick") if h[1] == "crashed"]
        assert any("unhealthy" in r for r in reasons)


async def test_idle_agent_is_paused_then_stopped_and_woken_when_quiet(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"sleepy": {"image": docker_images["mimic"]}},
        defaults={
            "idle_mark_after": 0.2,
            "pause_after": 0.6,
            "idle_timeout": 1.5,
            "idle_action": "stop",
            "liveness_interval": 60,
        },
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        record = await sup.ensure_running("sleepy", timeout=30)
        cid = record.container_id
        assert cid is not None
        await wait_until(lambda: sup.get("sleepy").state is S.PAUSED, what="idle pause")
        await wait_until(lambda: docker_inspect(cid)["State"]["Paused"], what="docker paused")
        await wait_until(lambda: sup.get("sleepy").state is S.STOPPED, what="idle stop")
        await wait_until(
            lambda: not docker_inspect(cid)["State"]["Running"], what="container stopped"
        )
        # Roost has seen the exit it caused (until then a wake would detach and recreate)
        await wait_until(lambda: not sup.get("sleepy").expected_exit, what="exit seen")
        assert sup.get("sleepy").restart_count == 0  # an idle stop is never a crash
        to_states = [h[1] for h in await history(engine, "sleepy")]
        assert to_states[-3:] == ["idle", "paused", "stopped"]
        assert "crashed" not in to_states

        woken = await sup.ensure_running("sleepy", timeout=30)
        assert woken.container_id == cid  # the stopped container is started again
        reply = await post(woken.url + "/messages", {"after": "wake"})  # type: ignore[operator]
        assert reply["echo"] == {"after": "wake"}


async def test_paused_agent_is_unpaused_when_woken(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(tmp_path, instance, agents={"nap": {"image": docker_images["mimic"]}})
    async with Engine(settings) as engine:
        sup = engine.supervisor
        record = await sup.ensure_running("nap", timeout=30)
        await sup.request("nap", ev.PauseRequested())
        paused = record.container_id
        assert paused is not None
        await wait_until(lambda: docker_inspect(paused)["State"]["Paused"])
        woken = await sup.ensure_running("nap", timeout=30)
        assert woken.container_id == record.container_id
        assert not docker_inspect(paused)["State"]["Paused"]
        reply = await post(woken.url + "/messages", {"n": 1})  # type: ignore[operator]
        assert reply["echo"] == {"n": 1}


async def test_exit_zero_nobody_asked_for_is_stopped_not_crashed(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(tmp_path, instance, agents={"done": {"image": docker_images["mimic"]}})
    async with Engine(settings) as engine:
        sup = engine.supervisor
        record = await sup.ensure_running("done", timeout=30)
        await post(record.url + "/messages", {"cmd": "exit", "code": 0})  # type: ignore[operator]
        await wait_until(lambda: sup.get("done").state is S.STOPPED, what="stopped")
        assert sup.get("done").restart_count == 0
        assert sup.get("done").last_exit is not None


async def test_startup_timeout_removes_container_and_carries_log_tail_when_never_healthy(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={
            "slow": {
                "image": docker_images["mimic"],
                "env": {"STARTUP_DELAY": "600"},
                "startup_timeout": 1.0,
                "max_restarts": 0,
            }
        },
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        with pytest.raises(errors.ContainerError) as caught:
            await sup.ensure_running("slow", timeout=30, fail_fast=True)
        await wait_until(lambda: sup.get("slow").state is S.FAILED, what="failed")
        assert "did not answer GET /health" in sup.get("slow").last_error
        assert "mimic" in sup.get("slow").last_error  # the log tail is in the error
        assert "slow" in str(caught.value)
        ids = [h for h in await history(engine, "slow")]
        assert ids
        assert sup.get("slow").container_id is None


async def test_missing_image_fails_terminally_with_a_clear_error(
    tmp_path: Path, instance: str
) -> None:
    settings = make_settings(
        tmp_path, instance, agents={"ghost": {"image": "roost-no-such-image:never"}}
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        with pytest.raises(errors.ContainerError):
            await sup.ensure_running("ghost", timeout=60, fail_fast=True)
        await wait_until(lambda: sup.get("ghost").state is S.FAILED, what="failed")
        assert "roost-no-such-image:never" in sup.get("ghost").last_error
        assert sup.get("ghost").restart_count == 0  # terminal: no pointless restarts


async def test_changed_spec_recreates_container_on_next_start(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agents = {"echo": {"image": docker_images["mimic"], "env": {"V": "1"}}}
    settings = make_settings(tmp_path, instance, agents=agents, docker={"leave_running": True})
    async with Engine(settings) as engine:
        first = await engine.supervisor.ensure_running("echo", timeout=30)
    agents["echo"]["env"] = {"V": "2"}
    settings2 = make_settings(tmp_path, instance, agents=agents)
    async with Engine(settings2) as engine:
        sup = engine.supervisor
        # adopted as it runs (no restart), then a restart applies the new spec
        assert sup.get("echo").container_id == first.container_id
        await sup.request("echo", ev.RestartRequested())
        record = await sup.ensure_running("echo", timeout=30)
        assert record.container_id != first.container_id
        assert record.container_id is not None
        env = docker_inspect(record.container_id)["Config"]["Env"]
        assert "V=2" in env

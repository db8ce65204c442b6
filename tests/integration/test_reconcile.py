"""Reconcile with Docker on start: adopt, remove orphans, never touch others.

Roost is killed with SIGKILL in a subprocess here, so "survives being killed at
any line" is tested against the real thing, not a simulated shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from roost.core.states import AgentState
from roost.engine import Engine
from tests.conftest import (
    container_exists,
    docker,
    docker_inspect,
    make_settings,
    remove_instance_containers,
    wait_until,
)

pytestmark = pytest.mark.docker

S = AgentState

# Runs an Engine from a JSON settings document, starts the named agents, prints
# their container ids as one JSON line, then waits forever (until SIGKILLed).
ENGINE_PROCESS = r"""
import asyncio, json, sys
from pathlib import Path
from roost.config import parse_settings
from roost.engine import Engine

async def main():
    doc = json.loads(sys.argv[1])
    base = Path(sys.argv[2])
    settings = parse_settings(doc, file=str(base / "roost.toml"), base_dir=base)
    engine = Engine(settings)
    await engine.start()
    ids = {}
    for name in sys.argv[3:]:
        record = await engine.supervisor.ensure_running(name, timeout=60)
        ids[name] = record.container_id
    print(json.dumps(ids), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _document(tmp_path: Path, instance: str, agents: dict[str, dict[str, object]]) -> str:
    return json.dumps(
        {
            "server": {"state_dir": str(tmp_path / "state")},
            "docker": {"instance": instance},
            "defaults": {"memory": "96m", "startup_timeout": 30, "stop_timeout": 1},
            "agents": agents,
        }
    )


async def _run_and_kill(
    tmp_path: Path, instance: str, agents: dict[str, dict[str, object]], names: list[str]
) -> dict[str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ENGINE_PROCESS,
        _document(tmp_path, instance, agents),
        str(tmp_path),
        *names,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=90)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    ids: dict[str, str] = json.loads(line)
    return ids


async def test_running_containers_are_adopted_with_same_ids_when_roost_was_sigkilled(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agents: dict[str, dict[str, object]] = {
        "alpha": {"image": docker_images["mimic"]},
        "beta": {"image": docker_images["mimic"]},
    }
    ids = await _run_and_kill(tmp_path, instance, agents, ["alpha", "beta"])
    # Roost is dead; its containers are not.
    for cid in ids.values():
        assert docker_inspect(cid)["State"]["Running"]

    settings = make_settings(
        tmp_path, instance, agents=agents, defaults={"memory": "96m", "stop_timeout": 1}
    )
    async with Engine(settings) as engine:
        sup = engine.supervisor
        for name, cid in ids.items():
            record = sup.get(name)
            assert record.state is S.RUNNING, name
            assert record.container_id == cid, "adopted, not recreated"
            assert record.restart_count == 0
        history = await engine.store.history("alpha", limit=100)
        assert [h.change.to_state.value for h in history].count("starting") == 1


async def test_container_that_died_while_roost_was_down_is_handled_as_a_crash(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agents: dict[str, dict[str, object]] = {"gamma": {"image": docker_images["mimic"]}}
    ids = await _run_and_kill(tmp_path, instance, agents, ["gamma"])
    docker("kill", ids["gamma"])

    settings = make_settings(tmp_path, instance, agents=agents)
    async with Engine(settings) as engine:
        sup = engine.supervisor
        await wait_until(
            lambda: (
                sup.get("gamma").state is S.RUNNING
                and sup.get("gamma").container_id != ids["gamma"]
            ),
            what="restart of the agent that died while Roost was down",
        )
        assert sup.get("gamma").restart_count == 1
        last_exit = sup.get("gamma").last_exit
        assert last_exit is not None
        assert last_exit.exit_code == 137


async def test_orphans_are_removed_only_for_this_instance_when_roost_starts(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    other = f"{instance}-other"
    image = docker_images["mimic"]

    def run(*labels: str) -> str:
        args = ["docker", "run", "-d"]
        for label in labels:
            args += ["--label", label]
        return subprocess.run(
            [*args, image], check=True, capture_output=True, text=True
        ).stdout.strip()

    ours = run("roost.managed=true", f"roost.instance={instance}", "roost.agent=ghost")
    theirs = run("roost.managed=true", f"roost.instance={other}", "roost.agent=ghost")
    plain = run(f"roost.test={instance}")  # not managed: never touched
    try:
        settings = make_settings(
            tmp_path, instance, agents={"real": {"image": docker_images["mimic"]}}
        )
        async with Engine(settings):
            await wait_until(lambda: not container_exists(ours), what="orphan removal")
            assert docker_inspect(theirs)["State"]["Running"]
            assert docker_inspect(plain)["State"]["Running"]
    finally:
        remove_instance_containers(other)
        docker("rm", "-f", plain, check=False)


async def test_leave_running_containers_are_adopted_on_next_start(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agents: dict[str, dict[str, object]] = {"keep": {"image": docker_images["mimic"]}}
    settings = make_settings(tmp_path, instance, agents=agents, docker={"leave_running": True})
    async with Engine(settings) as engine:
        first = await engine.supervisor.ensure_running("keep", timeout=30)
    assert first.container_id is not None
    assert docker_inspect(first.container_id)["State"]["Running"]

    async with Engine(settings) as engine:
        record = engine.supervisor.get("keep")
        assert record.state is S.RUNNING
        assert record.container_id == first.container_id
    # and without leave_running a shutdown stops it (an exit Roost caused: no crash)
    settings_stop = make_settings(tmp_path, instance, agents=agents)
    async with Engine(settings_stop) as engine:
        assert engine.supervisor.get("keep").container_id == first.container_id
    assert not docker_inspect(first.container_id)["State"]["Running"]
    async with Engine(settings_stop) as engine:
        record = engine.supervisor.get("keep")
        assert record.state is S.STOPPED
        assert record.restart_count == 0


async def test_paused_container_stays_paused_when_roost_restarts(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    from roost.core import events as ev

    agents: dict[str, dict[str, object]] = {"nap": {"image": docker_images["mimic"]}}
    settings = make_settings(tmp_path, instance, agents=agents, docker={"leave_running": True})
    async with Engine(settings) as engine:
        record = await engine.supervisor.ensure_running("nap", timeout=30)
        await engine.supervisor.request("nap", ev.PauseRequested())
    paused = record.container_id
    assert paused is not None
    await wait_until(lambda: docker_inspect(paused)["State"]["Paused"])
    async with Engine(settings) as engine:
        again = engine.supervisor.get("nap")
        assert again.state is S.PAUSED
        assert again.container_id == record.container_id
        assert docker_inspect(paused)["State"]["Paused"]


async def test_second_roost_on_same_state_dir_is_refused(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    from roost import errors

    settings = make_settings(tmp_path, instance)
    async with Engine(settings):
        with pytest.raises(errors.AlreadyRunning, match="state directory"):
            await Engine(settings).start()

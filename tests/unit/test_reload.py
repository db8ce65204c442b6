"""Reload (SIGHUP, ``roost reload``, POST /api/reload) on a served daemon on fakes: the
file's agents are applied, an invalid file changes nothing, and doctor sees drift."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner

from roost.cli import cli
from roost.config import load_settings
from roost.testing import EngineHarness
from tests.conftest import wait_until

IMAGE = "roost-mimic:latest"


def write(path: Path, agents: str) -> None:
    path.write_text(
        f"""
[server]
state_dir = "state"

[docker]
instance = "reload-test"

[defaults]
startup_timeout = 10
stop_timeout = 1
{agents}
""",
        encoding="utf-8",
    )


FIRST = """
[agents.keep]
image = "roost-mimic:latest"
memory = "128m"

[agents.drop]
image = "roost-mimic:latest"
"""

SECOND = """
[agents.keep]
image = "roost-mimic:latest"
memory = "256m"

[agents.new]
image = "roost-mimic:latest"
"""


async def test_reload_adds_removes_and_changes_configured_agents_when_the_file_changed(
    tmp_path: Path,
) -> None:
    config = tmp_path / "roost.toml"
    write(config, FIRST)
    async with EngineHarness.served(load_settings(str(config))) as h:
        first = (await h.client.post("/api/agents/keep/start")).json()["container_id"]
        await h.client.post("/api/agents/drop/start")
        registered = await h.client.post("/api/agents", json={"name": "spawned"})
        assert registered.status_code == 201
        write(config, SECOND)

        response = await h.client.post("/api/reload", params={"restart": "true"})
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["added"] == ["new"]
        assert report["removed"] == ["drop"]
        assert report["changed"] == ["keep"]
        assert report["needs_restart"] == []

        names = [a["name"] for a in (await h.client.get("/api/agents")).json()["agents"]]
        assert names == ["keep", "new", "spawned"]  # registered agents are left alone
        await wait_until(
            lambda: (
                h.engine.agents.get("keep").state.value == "running"
                and h.engine.agents.get("keep").container_id != first
            ),
            what="keep recreated with its new memory (--restart)",
        )
        cid = h.engine.agents.get("keep").container_id
        assert cid is not None
        assert h.runtime.container_spec(cid).memory == 256 * 1024**2
        kinds = [e.kind for e in h.engine.events.recent(200)]
        for kind in ("agent.added", "agent.removed", "agent.changed", "config.reloaded"):
            assert kind in kinds


async def test_reload_of_an_invalid_file_changes_nothing_and_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "roost.toml"
    write(config, FIRST)
    async with EngineHarness.served(load_settings(str(config))) as h:
        write(config, FIRST + '\n[agents.bad]\nimage = "x"\nmemroy = "1g"\n')
        response = await h.client.post("/api/reload")
        assert response.status_code == 400
        assert "agents.bad.memroy" in response.json()["error"]
        names = [a["name"] for a in (await h.client.get("/api/agents")).json()["agents"]]
        assert names == ["drop", "keep"]


async def test_reload_of_an_empty_file_changes_nothing(tmp_path: Path) -> None:
    # What a reload reads while the file is rewritten in place (truncated first).
    config = tmp_path / "roost.toml"
    write(config, FIRST)
    async with EngineHarness.served(load_settings(str(config))) as h:
        config.write_text("\n", encoding="utf-8")
        response = await h.client.post("/api/reload")
        assert response.status_code == 400
        assert "the file holds no settings" in response.json()["error"]
        names = [a["name"] for a in (await h.client.get("/api/agents")).json()["agents"]]
        assert names == ["drop", "keep"]


async def test_reload_reports_a_section_that_needs_a_restart_each_time_and_keeps_it_running(
    tmp_path: Path,
) -> None:
    config = tmp_path / "roost.toml"
    write(config, FIRST)
    async with EngineHarness.served(load_settings(str(config))) as h:
        running = h.engine.settings.docker
        config.write_text(
            config.read_text(encoding="utf-8").replace(
                'instance = "reload-test"', 'instance = "reload-test"\nleave_running = true'
            ),
            encoding="utf-8",
        )
        for _ in range(2):
            response = await h.client.post("/api/reload")
            assert response.status_code == 200, response.text
            assert response.json()["needs_restart"] == ["docker"]
        assert h.engine.settings.docker == running  # applied only by a restart


async def test_reloads_asked_at_once_apply_one_at_a_time_and_the_last_file_wins(
    tmp_path: Path,
) -> None:
    config = tmp_path / "roost.toml"
    write(config, FIRST)
    async with EngineHarness.served(load_settings(str(config))) as h:
        write(config, SECOND)
        reports = await asyncio.gather(*(h.engine.reload_from_file() for _ in range(3)))
        assert reports[0]["added"] == ["new"]
        assert all(not r["added"] and not r["removed"] for r in reports[1:])
        names = [a["name"] for a in (await h.client.get("/api/agents")).json()["agents"]]
        assert names == ["keep", "new"]


async def test_doctor_reports_drift_and_roost_reload_applies_it_when_the_file_changed(
    tmp_path: Path,
) -> None:
    config = tmp_path / "roost.toml"
    write(config, FIRST)
    async with EngineHarness.served(load_settings(str(config))) as h:
        write(config, SECOND)

        def run(*args: str) -> tuple[int, str]:
            result = CliRunner().invoke(
                cli, ["--config", str(config), "--url", h.url, *args], env={"ROOST_TOKEN": None}
            )
            return result.exit_code, result.output

        _, doctored = await asyncio.to_thread(run, "doctor")
        assert "drift" in doctored
        assert "added: new" in doctored
        assert "removed: drop" in doctored
        code, reloaded = await asyncio.to_thread(run, "reload")
        assert code == 0, reloaded
        assert "added new" in reloaded
        _, again = await asyncio.to_thread(run, "doctor")
        assert "the daemon runs what the file says" in again

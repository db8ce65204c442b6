"""Agent logs over the API on a served daemon (fakes): the tail, output since a
duration, the latest crash's output after the container is gone, and following
across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from roost.config import Settings
from roost.core.records import ExitInfo
from roost.testing import EngineHarness
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"


def _settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path,
        "logs-api",
        agents={"echo": {"image": IMAGE}},
        defaults={"max_restarts": 2, "restart_backoff": 0},
    )


async def test_previous_shows_the_crashed_containers_tail_when_it_is_gone(tmp_path: Path) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as h:
        cid = (await h.client.post("/api/agents/echo/start")).json()["container_id"]
        h.runtime.write_log(cid, "working")
        h.runtime.write_log(cid, "Traceback: it broke")
        assert (
            await h.client.get("/api/agents/echo/logs")
        ).text == "working\nTraceback: it broke\n"
        h.runtime.crash(cid, exit_code=1)

        async def restarted() -> bool:
            record = h.engine.agents.get("echo")
            return record.state.value == "running" and record.container_id != cid

        await wait_until(restarted, what="echo restarted")
        await wait_until(
            lambda: "it broke" in (h.engine.agents.get("echo").last_exit or ExitInfo()).log_tail,
            what="the crash's tail read",
        )
        previous = await h.client.get("/api/agents/echo/logs", params={"previous": "true"})
        assert previous.status_code == 200
        assert "Traceback: it broke" in previous.text
        current = await h.client.get("/api/agents/echo/logs")
        assert "it broke" not in current.text


async def test_follow_streams_new_output_and_marks_each_new_container_when_agent_restarts(
    tmp_path: Path,
) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as h:
        first = (await h.client.post("/api/agents/echo/start")).json()["container_id"]
        h.runtime.write_log(first, "before")
        received: list[str] = []

        async def follow() -> None:
            async with (
                httpx.AsyncClient(base_url=h.url, timeout=30) as client,
                client.stream(
                    "GET", "/api/agents/echo/logs", params={"follow": "true", "tail": "10"}
                ) as response,
            ):
                assert response.status_code == 200
                async for text in response.aiter_text():
                    received.append(text)

        following = asyncio.create_task(follow())
        try:
            await wait_until(lambda: "before" in "".join(received), what="the tail")
            h.runtime.write_log(first, "live line")
            await wait_until(lambda: "live line" in "".join(received), what="a live line")
            h.runtime.crash(first, exit_code=1)

            async def restarted() -> bool:
                record = h.engine.agents.get("echo")
                return record.state.value == "running" and record.container_id != first

            await wait_until(restarted, what="echo restarted")
            second = h.engine.agents.get("echo").container_id
            assert second is not None
            h.runtime.write_log(second, "after restart")
            await wait_until(lambda: "after restart" in "".join(received), what="new container")
            text = "".join(received)
            assert f"--- container {second[:12]} started ---" in text
            assert text.index("live line") < text.index("after restart")
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)


async def test_since_refuses_a_malformed_duration_naming_it(tmp_path: Path) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as h:
        await h.client.post("/api/agents/echo/start")
        response = await h.client.get("/api/agents/echo/logs", params={"since": "soon"})
        assert response.status_code == 400
        assert response.json()["error"].startswith("since:")


async def test_cli_logs_previous_and_inspect_show_the_crash_when_the_agent_failed(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from roost.cli import cli

    settings = make_settings(
        tmp_path, "logs-cli", agents={"echo": {"image": IMAGE}}, defaults={"max_restarts": 0}
    )
    async with EngineHarness.served(settings) as h:
        cid = (await h.client.post("/api/agents/echo/start")).json()["container_id"]
        h.runtime.write_log(cid, "Traceback: the end")
        h.runtime.crash(cid, exit_code=2)
        await wait_until(lambda: h.engine.agents.get("echo").state.value == "failed", what="failed")

        def run(*args: str) -> str:
            result = CliRunner().invoke(cli, ["--url", h.url, *args], env={"ROOST_TOKEN": None})
            assert result.exit_code == 0, result.output
            return result.output

        assert "Traceback: the end" in await asyncio.to_thread(run, "logs", "--previous", "echo")
        shown = await asyncio.to_thread(run, "inspect", "echo")
        assert "echo: failed" in shown
        assert "exit 2" in shown
        assert "| Traceback: the end" in shown
        assert "queue depth: 0" in shown

"""The admin HTTP API, driven in-process (httpx ASGI transport) on a FakeRuntime engine."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.core.records import ExitInfo
from roost.reactor.agents import ACTIONS
from roost.testing import EngineHarness as Harness
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"
TOKEN = "s3cret-token"


async def _harness(tmp_path: Path, *, token: str | None) -> AsyncIterator[Harness]:
    settings = make_settings(
        tmp_path,
        "api-test",
        agents={"echo": {"image": IMAGE}, "absent": {"image": "roost-nowhere:1"}},
    )
    async with Harness.running(settings, images=[IMAGE], token=token) as harness:
        yield harness


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path, token=None):
        yield harness


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path, token=TOKEN):
        yield harness


async def test_healthz_reports_agent_count_and_docker_api_when_engine_started(
    api: Harness,
) -> None:
    response = await api.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "ok": True,
        "status": "ok",
        "problems": {},
        "agents": 2,
        "docker_api": "1.41",
    }


async def test_list_agents_returns_every_agent_sorted_when_none_started(api: Harness) -> None:
    response = await api.client.get("/api/agents")
    assert response.status_code == 200
    agents = response.json()["agents"]
    assert [a["name"] for a in agents] == ["absent", "echo"]
    for agent in agents:
        assert agent["state"] == "created"
        assert agent["container_id"] is None
        assert agent["url"] is None
        assert agent["restart_count"] == 0
        assert agent["last_exit"] is None
        assert "last_activity_at" in agent


async def test_start_returns_running_agent_with_url_when_container_healthy(api: Harness) -> None:
    response = await api.client.post("/api/agents/echo/start")
    assert response.status_code == 200, response.text
    agent = response.json()
    assert agent["state"] == "running"
    assert agent["url"].startswith("http://127.0.0.1:")
    state = await api.runtime.inspect(agent["container_id"])
    assert state.running
    assert agent["url"] == f"http://127.0.0.1:{state.host_port}"


async def test_wake_answers_202_with_starting_agent_when_wait_false(api: Harness) -> None:
    response = await api.client.post("/api/agents/echo/wake", params={"wait": "false"})
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "starting"
    await wait_until(
        lambda: api.engine.agents.get("echo").state.value == "running",
        timeout=10,
        what="echo running",
    )


async def test_get_agent_includes_history_when_agent_started(api: Harness) -> None:
    await api.client.post("/api/agents/echo/start")
    agent = await api.agent("echo")
    assert agent["state"] == "running"
    steps = [(h["from"], h["to"]) for h in agent["history"]]
    assert steps == [("created", "starting"), ("starting", "running")]
    assert all(
        isinstance(h["reason"], str) and isinstance(h["at"], float) for h in agent["history"]
    )
    assert agent["history"][0]["reason"] == "start requested via API"


async def test_stop_pause_restart_return_resulting_state_when_running(api: Harness) -> None:
    await api.client.post("/api/agents/echo/start")
    paused = await api.client.post("/api/agents/echo/pause")
    assert paused.status_code == 200
    assert paused.json()["state"] == "paused"
    woken = await api.client.post("/api/agents/echo/wake")
    assert woken.status_code == 200
    assert woken.json()["state"] == "running"
    restarted = await api.client.post("/api/agents/echo/restart")
    assert restarted.status_code == 200
    assert restarted.json()["state"] == "starting"
    await wait_until(
        lambda: api.engine.agents.get("echo").state.value == "running",
        timeout=10,
        what="echo running after restart",
    )
    stopped = await api.client.post("/api/agents/echo/stop")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    assert stopped.json()["url"] is None


async def test_pause_is_refused_with_409_when_agent_not_running(api: Harness) -> None:
    response = await api.client.post("/api/agents/echo/pause")
    assert response.status_code == 409
    body = response.json()
    assert "only a running agent can be paused" in body["error"]
    assert body["agent"] == "echo"


async def test_unknown_agent_answers_404_naming_it_when_read_or_acted_on(api: Harness) -> None:
    for method, path in [
        ("GET", "/api/agents/nobody"),
        ("GET", "/api/agents/nobody/logs"),
        ("POST", "/api/agents/nobody/start"),
        ("POST", "/api/agents/nobody/stop"),
    ]:
        response = await api.client.request(method, path)
        assert response.status_code == 404, (method, path)
        body = response.json()
        assert body["agent"] == "nobody"
        assert "'nobody'" in body["error"]


async def test_unknown_action_answers_404_listing_valid_ones_when_posted(api: Harness) -> None:
    response = await api.client.post("/api/agents/echo/explode")
    assert response.status_code == 404
    body = response.json()
    assert "'explode'" in body["error"]
    for action in ACTIONS:
        assert action in body["error"]
    assert body["valid_actions"] == list(ACTIONS)


async def test_unknown_route_answers_json_error_when_requested(api: Harness) -> None:
    response = await api.client.get("/api/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"error": "no such route: GET /api/nothing-here"}


async def test_start_answers_502_with_error_when_image_absent(api: Harness) -> None:
    response = await api.client.post("/api/agents/absent/start")
    assert response.status_code == 502, response.text
    body = response.json()
    assert "roost-nowhere:1" in body["error"]
    assert body["agent"] == "absent"
    assert "log_tail" in body
    assert (await api.agent("absent"))["state"] == "failed"


async def test_reset_clears_failure_when_agent_failed(api: Harness) -> None:
    await api.client.post("/api/agents/absent/start")
    refused = await api.client.post("/api/agents/absent/restart")
    assert refused.status_code == 409
    assert "reset it first" in refused.json()["error"]
    response = await api.client.post("/api/agents/absent/reset")
    assert response.status_code == 200
    assert response.json()["state"] == "stopped"
    assert response.json()["restart_count"] == 0


async def test_invalid_query_answers_422_naming_the_parameter_when_timeout_negative(
    api: Harness,
) -> None:
    response = await api.client.post("/api/agents/echo/start", params={"timeout": "-1"})
    assert response.status_code == 422
    assert "timeout" in response.json()["error"]


async def test_logs_return_container_output_as_text_when_agent_has_container(
    api: Harness,
) -> None:
    missing = await api.client.get("/api/agents/echo/logs")
    assert missing.status_code == 404
    assert "has no container" in missing.json()["error"]
    agent = (await api.client.post("/api/agents/echo/start")).json()
    api.runtime.log_lines[agent["container_id"]] = [f"line {i}" for i in range(5)]
    response = await api.client.get("/api/agents/echo/logs", params={"tail": 2})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "line 3\nline 4\n"


async def test_dashboard_is_served_with_its_own_files_and_no_external_asset(
    api: Harness,
) -> None:
    response = await api.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    files = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert sorted(f.split("?")[0] for f in files) == [
        "/static/dashboard.css",
        "/static/dashboard.js",
    ]
    assert "{{version}}" not in page
    texts = [page]
    for file in files:
        served = await api.client.get(file)
        assert served.status_code == 200, file
        texts.append(served.text)
    assert "/api/agents" in texts[-1] or "/api/agents" in texts[-2]
    for text in texts:
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, urls  # an XML namespace, not fetched


async def test_agents_answer_the_actions_their_state_allows_and_their_queue_depth(
    api: Harness,
) -> None:
    created = (await api.client.get("/api/agents")).json()["agents"][1]
    assert created["name"] == "echo"
    assert created["actions"] == ["start", "stop", "wake", "restart"]
    assert created["pending_messages"] == 0
    running = (await api.client.post("/api/agents/echo/start")).json()
    assert running["actions"] == ["stop", "pause", "restart"]
    await api.client.post("/api/agents/absent/start")
    failed = await api.agent("absent")
    assert failed["state"] == "failed"
    assert failed["actions"] == ["reset"]


async def test_agent_details_show_its_config_without_env_values(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        "api-test",
        agents={"echo": {"image": IMAGE, "env": {"API_KEY": "hunter2"}, "idle_timeout": 60}},
    )
    async with Harness.running(settings, images=[IMAGE]) as harness:
        agent = await harness.agent("echo")
    config = agent["config"]
    assert config["image"] == IMAGE
    assert config["idle_timeout"] == 60
    assert config["env_names"] == ["API_KEY"]
    assert "env" not in config
    assert "hunter2" not in json.dumps(agent)


async def test_openapi_lists_agent_routes_when_requested(api: Harness) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "Roost"
    paths = schema["paths"]
    for path in ["/healthz", "/api/agents", "/api/agents/{name}", "/api/agents/{name}/logs"]:
        assert "get" in paths[path], path
    for action in ACTIONS:
        assert "post" in paths[f"/api/agents/{{name}}/{action}"], action


async def test_api_answers_401_when_token_missing_or_wrong(secured: Harness) -> None:
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}]:
        for method, path in [
            ("GET", "/api/agents"),
            ("GET", "/api/agents/echo"),
            ("POST", "/api/agents/echo/start"),
            ("GET", "/metrics"),
        ]:
            response = await secured.client.request(method, path, headers=headers)
            assert response.status_code == 401, (headers, method, path)
            assert "token" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
    assert secured.engine.agents.get("echo").state.value == "created"


async def test_api_answers_when_token_right(secured: Harness) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = await secured.client.get("/api/agents", headers=headers)
    assert response.status_code == 200
    assert len(response.json()["agents"]) == 2


async def test_healthz_and_openapi_need_no_token_when_token_set(secured: Harness) -> None:
    assert (await secured.client.get("/healthz")).status_code == 200
    schema = (await secured.client.get("/openapi.json")).json()
    assert "/api/agents" in schema["paths"]
    assert (await secured.client.get("/docs")).status_code == 200


async def test_unexpected_failure_answers_json_500_when_store_breaks(
    api: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_history(name: str, *, limit: int = 100) -> list[Any]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(api.engine.store, "history", broken_history)
    assert api.app is not None
    transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://roost") as client:
        response = await client.get("/api/agents/echo")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error while serving GET /api/agents/echo"}


async def test_crash_log_tail_is_kept_and_shown_after_a_daemon_restart_when_agent_crashed(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path,
        "exits-test",
        agents={"crashy": {"image": IMAGE}},
        defaults={"max_restarts": 0},
    )
    async with Harness.running(settings, images=[IMAGE]) as first:
        started = await first.client.post("/api/agents/crashy/start")
        cid = started.json()["container_id"]
        first.runtime.log_lines[cid] = ["booting", "Traceback: boom"]
        first.runtime.crash(cid, exit_code=3)
        await wait_until(
            lambda: first.engine.agents.get("crashy").state.value == "failed",
            what="crashy failed",
        )
        await wait_until(
            lambda: (
                first.engine.agents.get("crashy").last_exit is not None
                and "boom" in (first.engine.agents.get("crashy").last_exit or ExitInfo()).log_tail
            ),
            what="the log tail read",
        )
        runtime = first.runtime
    # A new daemon on the same state directory: the exit and its log tail are still there.
    async with Harness.running(settings, runtime=runtime) as second:
        agent = await second.agent("crashy")
        assert agent["state"] == "failed"
        assert agent["last_exit"]["exit_code"] == 3
        assert "Traceback: boom" in agent["last_exit"]["log_tail"]
        [latest] = agent["exits"]
        assert latest["exit_code"] == 3
        assert latest["container_id"] == cid
        assert "Traceback: boom" in latest["log_tail"]
        assert agent["config"]["image"] == IMAGE


async def test_event_stream_takes_the_token_from_its_cookie_and_nothing_else_does(
    secured: Harness,
) -> None:
    cookie = {"Cookie": f"roost_token={TOKEN}"}
    events = await secured.client.get("/api/events", params={"recent": 5}, headers=cookie)
    assert events.status_code == 200, events.text
    assert "events" in events.json()
    assert (await secured.client.get("/api/agents", headers=cookie)).status_code == 401
    assert (await secured.client.post("/api/agents/echo/stop", headers=cookie)).status_code == 401
    wrong = {"Cookie": "roost_token=wrong"}
    assert (await secured.client.get("/api/events", headers=wrong)).status_code == 401

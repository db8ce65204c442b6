"""The waiting page: browsers asking for a sleeping agent with ``waiting_page = true``.

The engine runs on a ``FakeRuntime`` whose starts wait for a gate (so the agent
stays ``starting`` as long as the test wants) and whose containers publish the
port of a small aiohttp app standing in for the agent; the edge is driven in
process over httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from roost.adapters.http_agent_client import HttpAgentClient
from roost.core.states import AgentState
from roost.edge.waiting import accepts_html
from roost.ports.runtime import ContainerState
from roost.testing import EngineHarness
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, site_port, wait_until

IMAGE = "roost-mimic:latest"
S = AgentState
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


class GatedRuntime(FakeRuntime):
    """Starts wait for ``gate``; containers publish ``agent_port``."""

    def __init__(self, agent_port: int) -> None:
        super().__init__(images=[IMAGE])
        self.agent_port = agent_port
        self.gate = asyncio.Event()

    async def inspect(self, container_id: str) -> ContainerState:
        state = await super().inspect(container_id)
        if state.host_port is None:
            return state
        return dataclasses.replace(state, host_port=self.agent_port)

    async def start(self, container_id: str) -> None:
        await self.gate.wait()
        await super().start(container_id)


@pytest.fixture
async def agent_port() -> AsyncIterator[int]:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<h1>the agent's own page</h1>", content_type="text/html")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/", page)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site_port(site)
    await runner.cleanup()


@pytest.fixture
async def gated(tmp_path: Path, agent_port: int) -> AsyncIterator[EngineHarness]:
    runtime = GatedRuntime(agent_port)
    settings = make_settings(
        tmp_path,
        "waiting",
        agents={
            "web": {"image": IMAGE, "waiting_page": True, "hold_timeout": 0.5},
            "api": {"image": IMAGE, "hold_timeout": 0.5},
        },
        defaults={"liveness_interval": 3600},
    )
    # Probes and the proxy reach the aiohttp app for real.
    async with EngineHarness.running(
        settings, runtime=runtime, agent_client=HttpAgentClient()
    ) as harness:
        yield harness


def runtime_of(harness: EngineHarness) -> GatedRuntime:
    assert isinstance(harness.runtime, GatedRuntime)
    return harness.runtime


async def test_browser_gets_self_refreshing_page_with_state_when_agent_is_waking(
    gated: EngineHarness,
) -> None:
    response = await gated.client.get("/agents/web/", headers=BROWSER)
    assert response.status_code == 503
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["retry-after"] == "1"
    page = response.text
    assert '<meta http-equiv="refresh" content="1">' in page
    assert 'id="roost-state">starting<' in page
    assert "web is waking up" in page
    assert "http://" not in page  # no external asset
    assert "https://" not in page
    # the wake goes on behind the page
    assert gated.engine.agents.get("web").state is S.STARTING


async def test_browser_gets_the_agent_page_when_the_refresh_finds_it_ready(
    gated: EngineHarness,
) -> None:
    first = await gated.client.get("/agents/web/", headers=BROWSER)
    assert first.status_code == 503
    runtime_of(gated).gate.set()
    await wait_until(lambda: gated.engine.agents.get("web").awake, what="web running")
    again = await gated.client.get("/agents/web/", headers=BROWSER)
    assert again.status_code == 200
    assert again.text == "<h1>the agent's own page</h1>"
    assert again.headers["roost-cold-start"] == "none"


async def test_browser_is_proxied_at_once_when_the_agent_wakes_within_the_short_hold(
    gated: EngineHarness,
) -> None:
    runtime_of(gated).gate.set()
    response = await gated.client.get("/agents/web/", headers=BROWSER)
    assert response.status_code == 200
    assert response.text == "<h1>the agent's own page</h1>"
    assert response.headers["roost-cold-start"] == "created"


async def test_api_client_is_held_as_before_when_the_agent_shows_a_waiting_page(
    gated: EngineHarness,
) -> None:
    for headers in ({"Accept": "application/json"}, {"Accept": "*/*"}, {}):
        response = await gated.client.get("/agents/web/", headers=headers)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert "after holding the request 0.5s (hold_timeout)" in response.json()["error"]


async def test_browser_is_held_as_before_when_waiting_page_is_off(gated: EngineHarness) -> None:
    response = await gated.client.get("/agents/api/", headers=BROWSER)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json()["state"] == "starting"


async def test_post_from_a_browser_is_held_not_paged_when_agent_sleeps(
    gated: EngineHarness,
) -> None:
    response = await gated.client.post("/agents/web/form", headers=BROWSER, content=b"a=1")
    assert response.headers["content-type"] == "application/json"


async def test_head_gets_the_page_headers_without_a_body_when_agent_wakes(
    gated: EngineHarness,
) -> None:
    response = await gated.client.head("/agents/web/", headers=BROWSER)
    assert response.status_code == 503
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.content == b""


async def test_page_says_failed_and_how_to_reset_when_the_agent_failed(
    tmp_path: Path, agent_port: int
) -> None:
    settings = make_settings(
        tmp_path,
        "waiting",
        agents={"web": {"image": "roost-nowhere:1", "waiting_page": True}},
    )
    async with EngineHarness.running(settings, runtime=GatedRuntime(agent_port)) as harness:
        first = await harness.client.get("/agents/web/", headers=BROWSER)
        assert harness.engine.agents.get("web").state is S.FAILED
        assert first.status_code == 503
        assert "roost-nowhere:1" in first.text  # why it could not start
        again = await harness.client.get("/agents/web/", headers=BROWSER)
        assert again.status_code == 503
        assert "web has failed" in again.text
        assert 'id="roost-state">failed<' in again.text
        assert "roost reset web" in again.text


async def test_agent_name_is_escaped_when_shown_in_the_page() -> None:
    from roost.edge.waiting import waiting_page

    page = waiting_page("<script>", "starting", "a & b").decode()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "a &amp; b" in page


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html", True),
        ("application/xhtml+xml;q=0.9", True),
        ("Text/HTML; charset=utf-8", True),
        ("text/html;q=0", False),
        ("text/html;q=0.0, application/json", False),
        ("*/*", False),
        ("application/json", False),
        ("text/*", False),
    ],
)
def test_accept_names_html_only_when_html_is_acceptable(accept: str, html: bool) -> None:
    assert accepts_html([(b"accept", accept.encode())]) is html

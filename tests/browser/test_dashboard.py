"""The dashboard, driven by a real browser (Debian's chromium through Playwright)
against a real daemon (``serving.serve`` in this process) on the real Docker Engine.

The tests click what an operator clicks and watch the states change as the event
stream reports them; they never sleep: Playwright's ``expect`` polls with a deadline.
Every page load is checked to fetch nothing from anywhere but Roost itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, Request, async_playwright, expect

from tests.conftest import make_settings
from tests.support import roost_daemon

pytestmark = [pytest.mark.browser, pytest.mark.docker]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
]
#: Real containers start in well under a second here; this leaves room for a busy CI.
DEADLINE_MS = 30_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Dashboard:
    """A page on the dashboard that records every request the browser makes."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.requests: list[str] = []
        #: requests the page's Content-Security-Policy stopped before any network use.
        self.blocked: list[str] = []
        page.on("request", self._record)
        page.on("requestfailed", self._failed)

    def _record(self, request: Request) -> None:
        self.requests.append(request.url)

    def _failed(self, request: Request) -> None:
        if "csp" in (request.failure or "").lower():  # "csp" or net::ERR_BLOCKED_BY_CSP
            self.blocked.append(request.url)

    def foreign_requests(self) -> list[str]:
        """Requests to anything but Roost (data: URLs are in-page, blob: ones name
        the page's own origin)."""
        origin = urlsplit(self.url).netloc
        return [
            url
            for url in self.requests
            if not url.startswith("data:")
            and urlsplit(url.removeprefix("blob:")).netloc != origin
            and url not in self.blocked
        ]

    def row(self, agent: str) -> Any:
        return self.page.locator(f'tr[data-agent="{agent}"]')

    def state(self, agent: str) -> Any:
        return self.row(agent).locator(".state")

    def actions(self, agent: str) -> Any:
        return self.row(agent).locator("button[data-action]")

    def button(self, agent: str, action: str) -> Any:
        return self.row(agent).locator(f'button[data-action="{action}"]')


@contextlib.asynccontextmanager
async def dashboard(browser: Browser, url: str, path: str = "/") -> AsyncIterator[Dashboard]:
    context = await browser.new_context()
    try:
        board = Dashboard(await context.new_page(), url)
        await board.page.goto(url + path)
        yield board
        assert board.foreign_requests() == []
    finally:
        await context.close()


def settings_for(tmp_path: Path, instance: str, **agents: dict[str, Any]) -> Any:
    return make_settings(
        tmp_path,
        instance,
        agents={name: {"image": "roost-mimic:latest", **spec} for name, spec in agents.items()},
        defaults={"memory": "64m", "restart_backoff": 0.2, "liveness_interval": 60},
    )


async def test_actions_follow_the_state_and_stop_asks_first_when_an_operator_clicks(
    browser: Browser, tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with (
        roost_daemon(settings_for(tmp_path, instance, echo={})) as (url, _),
        dashboard(browser, url) as board,
    ):
        await expect(board.page.locator("#connection")).to_have_text("live", timeout=DEADLINE_MS)
        await expect(board.state("echo")).to_have_text("created")
        await expect(board.actions("echo")).to_have_text(["start", "stop", "restart"])

        await board.button("echo", "start").click()
        await expect(board.state("echo")).to_have_text("running", timeout=DEADLINE_MS)
        await expect(board.actions("echo")).to_have_text(["pause", "stop", "restart"])

        await board.button("echo", "pause").click()
        await expect(board.state("echo")).to_have_text("paused", timeout=DEADLINE_MS)
        await expect(board.actions("echo")).to_have_text(["wake", "stop", "restart"])

        # stop asks first: cancelling leaves the agent alone
        await board.button("echo", "stop").click()
        dialog = board.page.locator("dialog#confirm")
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text("Stop agent echo?")
        await board.page.locator("#confirm-cancel").click()
        await expect(dialog).to_be_hidden()
        await expect(board.state("echo")).to_have_text("paused")

        await board.button("echo", "stop").click()
        await board.page.locator("#confirm-ok").click()
        await expect(board.state("echo")).to_have_text("stopped", timeout=DEADLINE_MS)
        await expect(board.actions("echo")).to_have_text(["start", "restart"])

        # a wake from the API shows up live, and in the wake chart
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert (await client.post("/api/agents/echo/wake")).status_code == 200
        await expect(board.state("echo")).to_have_text("running", timeout=DEADLINE_MS)
        await expect(board.page.locator("#chart-wakes rect.bar")).to_have_count(
            2, timeout=DEADLINE_MS
        )


async def test_agent_page_shows_exit_history_queue_logs_and_config_when_it_crashes(
    browser: Browser, tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = settings_for(tmp_path, instance, echo={"env": {"SECRET_TOKEN": "hunter2"}})
    async with (
        roost_daemon(settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=60) as client,
        dashboard(browser, url, "/#/agents/echo") as board,
    ):
        page = board.page
        await expect(page.locator("h1 .state")).to_have_text("created", timeout=DEADLINE_MS)
        await expect(page.locator("#config")).to_contain_text("SECRET_TOKEN")
        await expect(page.locator("#config")).not_to_contain_text("hunter2")

        reply = await client.post("/api/agents/echo/messages?wait=true", json={"hi": 1})
        assert reply.status_code == 200, reply.text
        await expect(page.locator("#queue tbody tr")).to_have_count(1, timeout=DEADLINE_MS)
        await expect(page.locator("#queue .state")).to_have_text("delivered")
        await expect(page.locator("#logs pre")).to_contain_text(
            "mimic: listening", timeout=DEADLINE_MS
        )

        # the agent exits with code 3: Roost restarts it, the page shows the exit
        await client.post("/api/agents/echo/messages?wait=true", json={"cmd": "exit", "code": 3})
        await expect(page.locator("#exits")).to_contain_text("exit 3", timeout=DEADLINE_MS)
        await expect(page.locator("h1 .state")).to_have_text("running", timeout=DEADLINE_MS)
        history = page.locator("#history")
        await expect(history).to_contain_text("exited with code 3")
        await expect(history.locator(".state", has_text="crashed")).to_have_count(1)
        await expect(page.locator("#facts")).to_contain_text("restarts1")
        await expect(page.locator("#agent-chart-restarts rect.bar.slow")).to_have_count(1)


async def test_page_says_disconnected_and_claims_no_running_agent_when_roost_dies(
    browser: Browser, tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with (
        roost_daemon(settings_for(tmp_path, instance, echo={})) as (url, shutdown),
        dashboard(browser, url) as board,
    ):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert (await client.post("/api/agents/echo/start")).status_code == 200
        await expect(board.state("echo")).to_have_text("running", timeout=DEADLINE_MS)
        shutdown.set()  # Roost stops (and stops its agents); the page is left alone
        connection = board.page.locator("#connection")
        await expect(connection).to_have_text("disconnected", timeout=DEADLINE_MS)
        await expect(board.page.locator("#banner")).to_contain_text("Disconnected from Roost")
        await expect(board.state("echo")).to_have_text("unknown")
        await expect(board.page.locator("#agents")).not_to_contain_text("running")
        for button in await board.actions("echo").all():
            await expect(button).to_be_disabled()


async def test_jobs_page_lists_jobs_by_state_shows_logs_and_cancels_when_asked(
    browser: Browser, tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with (
        roost_daemon(settings_for(tmp_path, instance)) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=60) as client,
        dashboard(browser, url, "/#/jobs") as board,
    ):
        page = board.page
        busybox = docker_images["busybox"]
        done = await client.post("/api/jobs", json={"image": busybox, "command": ["echo", "hi"]})
        long = await client.post("/api/jobs", json={"image": busybox, "command": ["sleep", "60"]})
        assert done.status_code == long.status_code == 202
        done_id, long_id = done.json()["id"], long.json()["id"]
        finished = page.locator(f'#jobs-finished tr[data-job="{done_id}"]')
        await expect(finished.locator(".state")).to_have_text("succeeded", timeout=DEADLINE_MS)
        running = page.locator(f'#jobs-running tr[data-job="{long_id}"]')
        await expect(running).to_be_visible(timeout=DEADLINE_MS)

        await running.locator('button[data-action="cancel"]').click()
        await page.locator("#confirm-ok").click()
        cancelled = page.locator(f'#jobs-finished tr[data-job="{long_id}"] .state')
        await expect(cancelled).to_have_text("cancelled", timeout=DEADLINE_MS)

        await finished.locator("a").click()
        await expect(page.locator("#logs pre")).to_have_text("hi\n", timeout=DEADLINE_MS)


async def test_browser_sees_the_waiting_page_then_the_agent_when_it_wakes_slowly(
    browser: Browser, tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = settings_for(
        tmp_path, instance, slow={"waiting_page": True, "env": {"STARTUP_DELAY": "3"}}
    )
    async with roost_daemon(settings) as (url, _):
        context = await browser.new_context()
        try:
            board = Dashboard(await context.new_page(), url)
            response = await board.page.goto(url + "/agents/slow/health")
            assert response is not None
            assert response.status == 503
            await expect(board.page.locator("#roost-state")).to_have_text("starting")
            await expect(board.page.locator("h1")).to_have_text("slow is waking up")
            # the page reloads itself until the agent answers: then it is the agent's
            await expect(board.page.locator("body")).to_contain_text(
                '"ok": true', timeout=DEADLINE_MS
            )
            assert board.foreign_requests() == []
        finally:
            await context.close()


async def test_token_form_unlocks_the_dashboard_and_its_live_stream_when_a_token_is_set(
    browser: Browser, tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("dash-s3cret\n")
    settings = make_settings(
        tmp_path,
        instance,
        agents={"echo": {"image": "roost-mimic:latest"}},
        server={"token_file": str(token_file)},
    )
    async with roost_daemon(settings) as (url, _), dashboard(browser, url) as board:
        page = board.page
        await expect(page.locator("#token-form")).to_be_visible(timeout=DEADLINE_MS)
        await page.locator("#token-input").fill("dash-s3cret")
        await page.locator("#token-form button").click()
        await expect(board.state("echo")).to_have_text("created", timeout=DEADLINE_MS)
        await expect(page.locator("#connection")).to_have_text("live", timeout=DEADLINE_MS)
        headers = {"Authorization": "Bearer dash-s3cret"}
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
            assert (await client.post("/api/agents/echo/start")).status_code == 200
        # only the event stream (authorised by its cookie) can have told the page
        await expect(board.state("echo")).to_have_text("running", timeout=DEADLINE_MS)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_api_docs_render_from_roost_alone_when_opened_offline(
    browser: Browser, tmp_path: Path, instance: str, docker_images: dict[str, str], path: str
) -> None:
    async with (
        roost_daemon(settings_for(tmp_path, instance)) as (url, _),
        dashboard(browser, url, path) as board,
    ):
        await expect(
            board.page.get_by_text(re.compile("/api/agents/\\{name\\}/wake")).first
        ).to_be_visible(timeout=DEADLINE_MS)

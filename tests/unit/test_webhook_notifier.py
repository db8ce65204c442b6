"""roost.adapters.webhook_notifier against a real local aiohttp server: payload shape,
retries, giving up without raising, and the one log line (no env, no full log tail)."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from roost.adapters.webhook_notifier import LogNotifier, MultiNotifier, WebhookNotifier
from roost.core.backoff import Backoff
from roost.core.records import ExitInfo
from tests.conftest import free_port

NOTIFY_LOGGER = "roost.notify"

FAILED_PAYLOAD: dict[str, Any] = {
    "agent": "echo",
    "exit_code": 137,
    "oom_killed": True,
    "error": "killed by the kernel OOM killer",
    "restart_count": 3,
    "max_restarts": 3,
    "log_tail": "booting\nSECRET-MIDDLE-LINE\nloading model\nKilled\n",
    "finished_at": "2024-01-01T00:00:00Z",
    "env": {"API_KEY": "sk-very-secret"},
}


class Receiver:
    """A local webhook endpoint that records requests and answers scripted statuses."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], Any]] = []
        self.statuses: list[int] = []  # answered in order; 200 once exhausted
        self.stall = False
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.json()))
        if self.stall:
            await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"ok": status < 400}, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{secret}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook/tok-abc123"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


class RecordingClock:
    """A clock whose sleeps return at once and are recorded (retry delays as data)."""

    def __init__(self, now: float) -> None:
        self._now = now
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def closing() -> AsyncIterator[list[WebhookNotifier]]:
    """Notifiers appended here are closed after the test, even when it fails."""
    notifiers: list[WebhookNotifier] = []
    yield notifiers
    for notifier in notifiers:
        await notifier.aclose()


def make(closing: list[WebhookNotifier], url: str, **kwargs: Any) -> WebhookNotifier:
    kwargs.setdefault("retry", Backoff((0.0, 0.0, 0.0)))
    notifier = WebhookNotifier(url, **kwargs)
    closing.append(notifier)
    return notifier


def notify_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == NOTIFY_LOGGER]


# --------------------------------------------------------------------------- delivery


async def test_webhook_receives_kind_time_and_payload_when_notified(
    receiver: Receiver, closing: list[WebhookNotifier]
) -> None:
    clock = RecordingClock(now=1_700_000_000.0)
    notifier = make(closing, receiver.url, clock=clock)
    payload = {"agent": "echo", "exit_code": 1, "restart_count": 3}

    await notifier.notify("agent.failed", payload)

    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert body == {"kind": "agent.failed", "at": "2023-11-14T22:13:20+00:00", **payload}
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Roost-Delivery"]


async def test_at_is_an_aware_iso_time_when_no_clock_is_given(
    receiver: Receiver, closing: list[WebhookNotifier]
) -> None:
    notifier = make(closing, receiver.url)
    await notifier.notify("agent.waking", {"agent": "echo"})
    at = dt.datetime.fromisoformat(receiver.requests[0][1]["at"])
    assert at.utcoffset() == dt.timedelta(0)


async def test_odd_values_are_encoded_when_payload_is_not_plain_json(
    receiver: Receiver, closing: list[WebhookNotifier]
) -> None:
    class Color(enum.Enum):
        RED = "red"

    notifier = make(closing, receiver.url)
    exit_info = ExitInfo(exit_code=2, oom_killed=False, error="boom", finished_at=None)
    await notifier.notify("agent.crashed", {"state": Color.RED, "last_exit": exit_info})
    body = receiver.requests[0][1]
    assert body["state"] == "red"
    assert body["last_exit"] == exit_info.to_json()


# --------------------------------------------------------------------------- retries


async def test_post_is_retried_with_one_delivery_id_when_server_fails_then_recovers(
    receiver: Receiver, closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500, 503]
    clock = RecordingClock(now=0.0)
    notifier = make(closing, receiver.url, clock=clock, retry=Backoff((0.5, 1.0, 2.0)))

    with caplog.at_level(logging.INFO, logger=NOTIFY_LOGGER):
        await notifier.notify("agent.failed", {"agent": "echo"})

    assert len(receiver.requests) == 3
    assert len({headers["X-Roost-Delivery"] for headers, _ in receiver.requests}) == 1
    assert clock.slept == [0.5, 1.0]
    assert any("delivered on attempt 3" in r.getMessage() for r in notify_records(caplog))
    assert not any("not delivered" in r.getMessage() for r in notify_records(caplog))


async def test_gives_up_without_raising_when_server_keeps_failing(
    receiver: Receiver, closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500] * 10
    notifier = make(closing, receiver.url)

    await notifier.notify("agent.failed", {"agent": "echo"})

    assert len(receiver.requests) == 4  # the first try and three retries
    failures = [r for r in notify_records(caplog) if "not delivered" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.WARNING
    assert "HTTP 500" in failures[0].getMessage()


async def test_no_retry_when_server_rejects_the_request(
    receiver: Receiver, closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [400]
    notifier = make(closing, receiver.url)

    await notifier.notify("agent.failed", {"agent": "echo"})

    assert len(receiver.requests) == 1
    assert any("HTTP 400" in r.getMessage() for r in notify_records(caplog))


async def test_does_not_raise_and_logs_when_nothing_listens(
    closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook/tok-abc123"
    notifier = make(closing, url)

    await notifier.notify("agent.failed", FAILED_PAYLOAD)

    messages = [r.getMessage() for r in notify_records(caplog)]
    failure = [m for m in messages if "not delivered" in m]
    assert len(failure) == 1
    assert "after 4 attempt(s)" in failure[0]
    assert "tok-abc123" not in "\n".join(messages)  # the URL's secret path is never logged


async def test_does_not_raise_when_url_is_malformed(
    closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make(closing, "http://")
    await notifier.notify("agent.failed", {"agent": "echo"})
    assert any("not delivered" in r.getMessage() for r in notify_records(caplog))


async def test_attempt_times_out_and_is_logged_when_server_stalls(
    receiver: Receiver, closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.stall = True
    notifier = make(closing, receiver.url, timeout=0.2, retry=Backoff(()))

    await notifier.notify("agent.failed", {"agent": "echo"})

    assert len(receiver.requests) == 1
    assert any("timed out after 0.2s" in r.getMessage() for r in notify_records(caplog))


async def test_only_logs_when_url_is_empty(
    closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make(closing, "")
    await notifier.notify("agent.failed", {"agent": "echo"})
    assert [r.levelno for r in notify_records(caplog)] == [logging.WARNING]
    assert notifier._session is None


async def test_only_logs_when_closed(
    receiver: Receiver, closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make(closing, receiver.url)
    await notifier.notify("agent.waking", {"agent": "echo"})
    await notifier.aclose()
    await notifier.aclose()  # idempotent

    await notifier.notify("agent.failed", {"agent": "echo"})

    assert len(receiver.requests) == 1
    assert any("closed" in r.getMessage() for r in notify_records(caplog))


# --------------------------------------------------------------------------- log line


async def test_failure_is_one_warning_line_without_env_or_full_tail_when_agent_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await LogNotifier().notify("agent.failed", FAILED_PAYLOAD)

    records = notify_records(caplog)
    assert len(records) == 1
    line = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert "\n" not in line
    for fragment in (
        "agent.failed",
        "agent=echo",
        "exit_code=137",
        "oom_killed=true",
        "restart_count=3",
        '"booting"',
        '"Killed"',
    ):
        assert fragment in line
    assert "SECRET-MIDDLE-LINE" not in line
    assert "sk-very-secret" not in line
    assert "API_KEY" not in line


async def test_other_kinds_log_at_info_when_notified(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=NOTIFY_LOGGER):
        await LogNotifier().notify("agent.waking", {"agent": "echo"})
    records = notify_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "notify agent.waking agent=echo")
    ]


async def test_webhook_notifier_writes_the_same_line_when_it_posts(
    receiver: Receiver, closing: list[WebhookNotifier], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make(closing, receiver.url)
    await notifier.notify("agent.failed", FAILED_PAYLOAD)
    lines = [r.getMessage() for r in notify_records(caplog)]
    assert len(lines) == 1
    assert lines[0].startswith("notify agent.failed agent=echo exit_code=137")
    # The webhook itself gets the whole payload (the receiver is the admin's own endpoint).
    assert receiver.requests[0][1]["log_tail"] == FAILED_PAYLOAD["log_tail"]


# --------------------------------------------------------------------------- fan-out


class Recording:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        self.seen.append((kind, payload))


class Broken:
    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        raise RuntimeError("broken notifier")


async def test_multi_notifier_reaches_every_notifier_when_one_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, last = Recording(), Recording()
    multi = MultiNotifier(first, Broken(), last)

    await multi.notify("agent.failed", {"agent": "echo"})
    await multi.aclose()

    assert first.seen == last.seen == [("agent.failed", {"agent": "echo"})]
    assert any("Broken raised" in r.getMessage() for r in notify_records(caplog))


async def test_multi_notifier_posts_and_logs_when_combined_with_webhook(
    receiver: Receiver, closing: list[WebhookNotifier]
) -> None:
    webhook = make(closing, receiver.url)
    recording = Recording()
    await MultiNotifier(webhook, recording).notify("agent.waking", {"agent": "echo"})
    assert json.dumps(receiver.requests[0][1]["agent"]) == '"echo"'
    assert recording.seen == [("agent.waking", {"agent": "echo"})]

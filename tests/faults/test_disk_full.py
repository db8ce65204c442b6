"""The disk under Roost's state directory fills up mid-start and mid-burst.

``state_dir`` lives on a 2 MiB tmpfs that the test fills (``fill``) while a real
``roost up`` works, then frees. Meanwhile:

- new messages are refused with 507 (disk full) or 503 with ``Retry-After``,
  never acknowledged and then lost;
- ``/healthz`` says ``degraded`` and names the store's problem;
- the webhook gets one ``store.degraded`` and, once space is freed, one
  ``store.recovered``;
- an agent whose start was under way is never left ``starting`` with a healthy
  container: it is ``running`` once its state can be written;
- every message acknowledged before is delivered, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import WebhookReceiver, wait_until

from .conftest import FaultReport, PrivateDockerd, fill
from .rig import (
    RoostDaemon,
    Sender,
    agent,
    check_delivery,
    messages,
    mimic,
    running_roost,
    seen,
    start_agents,
    tracebacks,
    wait_delivered,
    wait_states,
)

pytestmark = pytest.mark.faults

#: Seconds the slow agent answers 503 to its health check: the disk fills meanwhile.
STARTUP_DELAY = 6.0
#: Most messages a burst sends before the full disk must have refused one.
BURST_LIMIT = 5000
#: Messages queued for a slow agent before the disk fills.
BACKLOG = 40
#: Seconds the disk stays full in the burst scenario (longer than the store's
#: rechecks settle, so a false "recovered" would show).
FULL_FOR = 3.0


def _daemon(
    tmp_path: Path, dockerd: PrivateDockerd, webhook: WebhookReceiver, state_dir: Path
) -> RoostDaemon:
    return RoostDaemon(
        tmp_path,
        dockerd,
        agents={"busy": mimic(), "slow": mimic(env={"STARTUP_DELAY": str(STARTUP_DELAY)})},
        notify={"webhook": webhook.url},
        state_dir=state_dir,
    )


async def _healthz(client: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/healthz")).json()
    return body


async def _burst_until_refused(sender: Sender) -> tuple[int, str | None]:
    """Send new messages until one is refused; its status and Retry-After."""
    for _ in range(BURST_LIMIT):
        if await sender.send(retry_refused=False) is None:
            return sender.refusals[-1]
    raise AssertionError(f"{BURST_LIMIT} messages were accepted on a full disk")


def _check_refusal(status: int, retry_after: str | None) -> None:
    assert status == 507 or (status == 503 and retry_after is not None), (
        f"a message on a full disk answered {status} (Retry-After: {retry_after})"
    )


async def _check_recovered(
    client: httpx.AsyncClient,
    webhook: WebhookReceiver,
    senders: list[Sender],
    fault_report: FaultReport,
    freed_at: float,
) -> None:
    """After space is freed: the store says so once, acknowledged messages arrive."""
    await wait_until(
        lambda: bool(webhook.of_kind("store.recovered")), timeout=30, what="store.recovered"
    )
    recovered = time.monotonic() - freed_at
    assert (await _healthz(client))["status"] == "ok"
    lost = duplicates = 0
    for sender in senders:
        # New messages are taken again.
        assert await sender.send(retry_refused=False) is not None, sender.refusals[-1]
        await wait_delivered(client, sender.agent, sender.acked, timeout=60)
        described = await agent(client, sender.agent)
        received = (await seen(described["url"]))["ids"]
        # A delivery whose outcome could not be written is sent again: at-least-once.
        check = check_delivery(sender.acked, received, allowed_duplicates=1, what=sender.agent)
        lost += check.lost
        duplicates += check.duplicates
    assert len(webhook.of_kind("store.degraded")) == 1, webhook.received
    assert len(webhook.of_kind("store.recovered")) == 1, webhook.received
    assert webhook.of_kind("agent.failed") == []
    fault_report.record("store.recovered after space was freed (s)", recovered)
    fault_report.record(
        "messages acknowledged / refused / lost / redelivered",
        f"{sum(len(s.acked) for s in senders)} / {sum(len(s.refusals) for s in senders)} / "
        f"{lost} / {duplicates}",
    )
    statuses = Counter(status for sender in senders for status, _ in sender.refusals)
    fault_report.record("refusals by HTTP status", dict(sorted(statuses.items())))
    fault_report.record(
        "alerts (store.degraded / store.recovered)",
        f"{len(webhook.of_kind('store.degraded'))} / {len(webhook.of_kind('store.recovered'))}",
    )


async def test_refuses_new_messages_and_delivers_the_acknowledged_when_the_disk_fills_mid_burst(
    tmp_path: Path,
    private_dockerd: PrivateDockerd,
    small_tmpfs: Path,
    webhook: WebhookReceiver,
    fault_report: FaultReport,
) -> None:
    daemon = _daemon(tmp_path, private_dockerd, webhook, small_tmpfs / "state")
    async with running_roost(daemon) as client:
        await start_agents(client, "busy")
        # Each message keeps the agent busy a while: deliveries are under way (their
        # outcomes still to be written) when the disk fills.
        sender = Sender(client, "busy", body=lambda n: {"cmd": "sleep", "seconds": 0.02, "n": n})
        for _ in range(BACKLOG):
            await sender.send()
        filled = fill(small_tmpfs)
        status, retry_after = await _burst_until_refused(sender)
        _check_refusal(status, retry_after)
        healthz = await _healthz(client)
        assert healthz["status"] == "degraded", healthz
        assert "full" in healthz["problems"]["store"], healthz
        await wait_until(
            lambda: bool(webhook.of_kind("store.degraded")), timeout=30, what="store.degraded"
        )
        full_until = time.monotonic() + FULL_FOR
        refusals = 1
        while time.monotonic() < full_until:  # the disk stays full this long
            _check_refusal(*await _burst_until_refused(sender))
            refusals += 1
            await asyncio.sleep(0.1)  # pacing the senders
        statuses = await messages(client, "busy")
        undelivered = sum(statuses[i]["status"] != "delivered" for i in sender.acked)
        assert undelivered > 0, "the backlog was delivered before the disk filled: nothing tested"
        assert webhook.of_kind("store.recovered") == [], "recovered while the disk is full"
        assert len(webhook.of_kind("store.degraded")) == 1, webhook.received

        (small_tmpfs / "filler").unlink()
        freed_at = time.monotonic()
        await _check_recovered(client, webhook, [sender], fault_report, freed_at)
    assert tracebacks(daemon.lines()) == [], daemon.tail(80)
    fault_report.record("bytes written to fill the disk", filled)
    fault_report.record("requests refused while full", refusals)
    fault_report.record("acknowledged but undelivered when the disk filled", undelivered)


async def test_a_start_under_way_ends_running_when_the_disk_fills_mid_start(
    tmp_path: Path,
    private_dockerd: PrivateDockerd,
    small_tmpfs: Path,
    webhook: WebhookReceiver,
    fault_report: FaultReport,
) -> None:
    daemon = _daemon(tmp_path, private_dockerd, webhook, small_tmpfs / "state")
    async with running_roost(daemon) as client:
        await start_agents(client, "busy")
        sender = Sender(client, "busy")
        for _ in range(20):
            await sender.send()
        requested = await client.post("/api/agents/slow/start", params={"wait": "false"})
        assert requested.status_code == 202, requested.text
        await wait_until(
            lambda: _has_container(client, "slow"), timeout=30, what="slow's container"
        )
        fill(small_tmpfs)
        _check_refusal(*await _burst_until_refused(sender))
        # The slow agent answers its health check now, but that cannot be written.
        slow: dict[str, Any] = {}

        async def stuck() -> bool:
            slow.update(await agent(client, "slow"))
            return slow["degraded"] is not None

        await wait_until(stuck, timeout=STARTUP_DELAY + 30, what="slow's state write failing")
        assert slow["state"] == "starting", slow
        assert "cannot write its state" in slow["degraded"], slow
        healthz = await _healthz(client)
        assert healthz["status"] == "degraded", healthz
        assert "store" in healthz["problems"], healthz

        (small_tmpfs / "filler").unlink()
        freed_at = time.monotonic()
        await wait_states(client, {"slow": "running", "busy": "running"}, timeout=30)
        running = time.monotonic() - freed_at
        slow = await agent(client, "slow")
        assert slow["degraded"] is None, slow
        assert [h["to"] for h in slow["history"]] == ["starting", "running"], slow["history"]
        await _check_recovered(client, webhook, [sender], fault_report, freed_at)
    assert tracebacks(daemon.lines()) == [], daemon.tail(80)
    fault_report.record("agent running after space was freed (s)", running)


async def _has_container(client: httpx.AsyncClient, name: str) -> bool:
    described = await agent(client, name)
    return described["state"] == "starting" and described["container_id"] is not None

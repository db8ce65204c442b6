"""A dockerd with ``--live-restore`` goes away (stopped cleanly, or killed) under
traffic, and comes back once Roost has noticed.

Its containers keep running while it is away, so Roost must change nothing:
every agent stays ``running`` on the same container (same id, no restart
counted), every acknowledged message reaches that container in order (its
``GET /seen`` holds them all), and no ``agent.failed`` alert is sent. If Roost
noticed the engine was away, it said so once and said once that it is back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import WebhookReceiver, wait_until

from .conftest import FaultReport, PrivateDockerd
from .rig import (
    RoostDaemon,
    agents,
    check_delivery,
    messages,
    mimic,
    running_roost,
    seen,
    start_agents,
    tracebacks,
    traffic,
    wait_delivered,
    wait_states,
)

pytestmark = pytest.mark.faults

NAMES = ("b1", "b2")
TRAFFIC_INTERVAL = 0.1
#: Liveness probes go through the engine's port proxy, which is down with it: the
#: outage lasts longer than the probes' patience (interval × failures).
LIVENESS_INTERVAL = 1.0
LIVENESS_FAILURES = 2
OUTAGE = LIVENESS_INTERVAL * (LIVENESS_FAILURES + 2)


@pytest.mark.parametrize("kill", [False, True], ids=["stopped", "killed"])
async def test_agents_stay_running_on_their_containers_when_a_live_restore_daemon_restarts(
    kill: bool,
    tmp_path: Path,
    private_dockerd_live_restore: PrivateDockerd,
    webhook: WebhookReceiver,
    fault_report: FaultReport,
) -> None:
    dockerd = private_dockerd_live_restore
    daemon = RoostDaemon(
        tmp_path,
        dockerd,
        agents={name: mimic() for name in NAMES},
        defaults={
            "max_restarts": 1,
            "restart_backoff": 0.1,
            "liveness_interval": LIVENESS_INTERVAL,
            "liveness_failures": LIVENESS_FAILURES,
        },
        notify={"webhook": webhook.url},
    )
    async with running_roost(daemon) as client:
        before = await start_agents(client, *NAMES)
        async with traffic(client, NAMES, interval=TRAFFIC_INTERVAL) as senders:
            for sender in senders.values():
                await sender.wait_acked(5)
            delivered_before = await _delivered(client)
            await dockerd.stop(kill=kill)
            down_at = time.monotonic()
            await wait_until(
                lambda: _status(client, "degraded"), timeout=30, what="/healthz degraded"
            )
            # Messages keep coming while the daemon is away.
            counts = {n: len(s.acked) for n, s in senders.items()}
            for name, sender in senders.items():
                await sender.wait_acked(counts[name] + 10)
            await asyncio.sleep(OUTAGE - (time.monotonic() - down_at))  # the outage itself
            delivered_while_down = await _delivered(client) - delivered_before
            start_called = time.monotonic()
            await dockerd.start()
            engine_start = time.monotonic() - start_called
            await wait_until(lambda: _status(client, "ok"), timeout=30, what="/healthz ok")
            noticed = time.monotonic() - start_called
            counts = {n: len(s.acked) for n, s in senders.items()}
            for name, sender in senders.items():
                await sender.wait_acked(counts[name] + 5)

        await wait_states(client, dict.fromkeys(NAMES, "running"), timeout=30)
        after = await agents(client)
        lost = duplicates = 0
        for name, sender in senders.items():
            await wait_delivered(client, name, sender.acked, timeout=60)
            assert after[name]["container_id"] == before[name]["container_id"], name
            assert after[name]["restart_count"] == 0, name
            received = (await seen(after[name]["url"]))["ids"]
            check = check_delivery(sender.acked, received, allowed_duplicates=1, what=name)
            lost += check.lost
            duplicates += check.duplicates
    unavailable = len(webhook.of_kind("engine.unavailable"))
    recovered = len(webhook.of_kind("engine.recovered"))
    assert unavailable == recovered <= 1, webhook.received
    assert webhook.of_kind("agent.failed") == []
    assert tracebacks(daemon.lines()) == [], daemon.tail(80)

    fault_report.record("engine start (s)", engine_start)
    fault_report.record("engine seen back after its start was called (s)", noticed)
    fault_report.record("messages delivered while the daemon was away", delivered_while_down)
    fault_report.record(
        "messages acknowledged / lost / redelivered",
        f"{sum(len(s.acked) for s in senders.values())} / {lost} / {duplicates}",
    )
    fault_report.record("containers replaced", 0)
    fault_report.record(
        "alerts (engine.unavailable / engine.recovered / agent.failed)",
        f"{unavailable} / {recovered} / 0",
    )


async def _status(client: httpx.AsyncClient, status: str) -> bool:
    return bool((await client.get("/healthz")).json()["status"] == status)


async def _delivered(client: httpx.AsyncClient) -> int:
    found = [await messages(client, name) for name in NAMES]
    return sum(m["status"] == "delivered" for stored in found for m in stored.values())

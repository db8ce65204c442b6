"""A crash storm: several agents crash-loop at once while two healthy ones take traffic.

Each crashing agent exits with code 3 shortly after it answers its health check,
every time, until ``max_restarts`` is used up and it is ``failed``. Afterwards:

- every crashing agent is ``failed`` and the webhook got exactly one
  ``agent.failed`` for each (with its exit code and restart count);
- the healthy agents stayed ``running`` on their containers, and every message
  acknowledged for them arrived once, in order;
- the daemon's log has no traceback.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import WebhookReceiver, wait_until

from .conftest import FaultReport, PrivateDockerd
from .rig import (
    RoostDaemon,
    agents,
    check_delivery,
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

CRASHING = ("c1", "c2", "c3", "c4", "c5")
HEALTHY = ("h1", "h2")
MAX_RESTARTS = 2
EXIT_CODE = 3
TRAFFIC_INTERVAL = 0.05


async def test_each_crash_looping_agent_alerts_once_and_healthy_ones_lose_nothing_in_a_storm(
    tmp_path: Path,
    private_dockerd: PrivateDockerd,
    webhook: WebhookReceiver,
    fault_report: FaultReport,
) -> None:
    crashing = mimic(env={"EXIT_AFTER": "0.3", "EXIT_CODE": str(EXIT_CODE)})
    daemon = RoostDaemon(
        tmp_path,
        private_dockerd,
        agents={**dict.fromkeys(CRASHING, crashing), **{n: mimic() for n in HEALTHY}},
        defaults={"max_restarts": MAX_RESTARTS, "restart_backoff": 0.1},
        notify={"webhook": webhook.url},
    )
    async with running_roost(daemon) as client:
        before = await start_agents(client, *HEALTHY)
        async with traffic(client, HEALTHY, interval=TRAFFIC_INTERVAL) as senders:
            storm_began = time.monotonic()
            requested = await asyncio.gather(
                *(client.post(f"/api/agents/{n}/start", params={"wait": "false"}) for n in CRASHING)
            )
            assert all(r.status_code == 202 for r in requested), [r.text for r in requested]
            await wait_states(client, dict.fromkeys(CRASHING, "failed"), timeout=120)
            storm = time.monotonic() - storm_began
            await wait_until(
                lambda: len(webhook.of_kind("agent.failed")) >= len(CRASHING),
                timeout=30,
                what="an agent.failed alert per crashing agent",
            )
            acked_in_storm = sum(len(s.acked) for s in senders.values())

        lost = duplicates = 0
        after = await agents(client)
        for name, sender in senders.items():
            await wait_delivered(client, name, sender.acked, timeout=60)
            assert after[name]["state"] == "running", after[name]
            assert after[name]["container_id"] == before[name]["container_id"], name
            assert after[name]["restart_count"] == 0, name
            received = (await seen(after[name]["url"]))["ids"]
            check = check_delivery(sender.acked, received, allowed_duplicates=0, what=name)
            lost += check.lost
            duplicates += check.duplicates
        for name in CRASHING:
            assert after[name]["restart_count"] == MAX_RESTARTS, after[name]
        alerts = webhook.of_kind("agent.failed")
    assert sorted(a["agent"] for a in alerts) == sorted(CRASHING), alerts
    for alert in alerts:
        assert alert["exit_code"] == EXIT_CODE, alert
        assert alert["restart_count"] == MAX_RESTARTS, alert
    assert tracebacks(daemon.lines()) == [], daemon.tail(80)

    crashes = len(CRASHING) * (MAX_RESTARTS + 1)
    fault_report.record("agents crash-looping / crashes in all", f"{len(CRASHING)} / {crashes}")
    fault_report.record("storm until every crashing agent was failed (s)", storm)
    fault_report.record("agent.failed alerts", len(alerts))
    fault_report.record(
        "messages to healthy agents: acknowledged (during the storm) / lost / duplicated",
        f"{sum(len(s.acked) for s in senders.values())} ({acked_in_storm}) / {lost} / {duplicates}",
    )

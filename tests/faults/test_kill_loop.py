"""``roost up`` is SIGKILLed at random points, again and again, under message traffic.

Two agents run on a private dockerd; a sender per agent posts numbered messages
the whole time, each with its own ``Idempotency-Key`` and sent again with the
same key until a 2xx names its id (as ``roost send`` does), so every message is
acknowledged exactly once, in order. Meanwhile Roost is killed ``KILLS`` times:
sometimes before its API answers (start-up, reconcile), sometimes while it
serves, and started again each time.

Afterwards every acknowledged message has reached its agent, first arrivals in
acceptance order, and any duplicate is inside the documented at-least-once
window: the messages without a committed outcome at a kill (the one in flight,
and the one before it whose outcome commit was pipelined), redelivered first
after the restart (at most two per kill per agent). The agents' containers were adopted each time,
never replaced (their ``GET /seen`` holds the whole history).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import httpx
import pytest

from .conftest import FaultReport, PrivateDockerd
from .rig import (
    RoostDaemon,
    agents,
    check_delivery,
    mimic,
    seen,
    start_agents,
    tracebacks,
    traffic,
    wait_delivered,
    wait_states,
)

pytestmark = pytest.mark.faults

NAMES = ("k1", "k2")
KILLS = 24
#: Seconds between messages to each agent while Roost is up.
TRAFFIC_INTERVAL = 0.02
#: A kill comes this long (at most) after the API answers ...
LATEST_KILL = 1.5
#: ... or, for this share of the kills, at a random point of the start-up (within
#: the time the first start-up took), so some land before the API answers.
STARTING_SHARE = 0.3


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz", timeout=1.0)).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(600)
async def test_every_acknowledged_message_arrives_when_roost_is_killed_again_and_again(
    tmp_path: Path, private_dockerd: PrivateDockerd, fault_report: FaultReport
) -> None:
    seed = int(os.environ.get("ROOST_FAULTS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    fault_report.record("random seed (ROOST_FAULTS_SEED)", seed)
    daemon = RoostDaemon(
        tmp_path,
        private_dockerd,
        agents={name: mimic() for name in NAMES},
        defaults={"max_restarts": 1, "restart_backoff": 0.1},
    )
    async with httpx.AsyncClient(base_url=daemon.url, timeout=10.0) as client:
        await daemon.start()
        spawned = time.monotonic()
        await daemon.wait_up()
        # Start-up kills land within this (the first start-up's length, as measured).
        startup_window = time.monotonic() - spawned
        before = await start_agents(client, *NAMES)
        killed_starting = 0
        restarts: list[float] = []
        respawned: float | None = None  # none yet: the first Roost is up already
        async with traffic(client, NAMES, interval=TRAFFIC_INTERVAL) as senders:
            for _ in range(KILLS):
                if rng.random() < STARTING_SHARE:
                    # Somewhere in start-up: loading, reconciling, just answering.
                    await asyncio.sleep(rng.uniform(0.0, startup_window))  # the kill's moment
                    killed_starting += not await _answers(client)
                else:
                    await daemon.wait_up()
                    if respawned is not None:
                        restarts.append(time.monotonic() - respawned)
                    first = senders[NAMES[0]]
                    await first.wait_acked(len(first.acked) + 1, timeout=60)  # by this Roost
                    await asyncio.sleep(rng.uniform(0.0, LATEST_KILL))  # the kill's moment
                await daemon.kill()
                await daemon.start()
                respawned = time.monotonic()
            await daemon.wait_up()
        try:
            await wait_states(client, dict.fromkeys(NAMES, "running"), timeout=60)
            after = await agents(client)
            lost = duplicates = 0
            for name, sender in senders.items():
                await wait_delivered(client, name, sender.acked, timeout=120)
                assert after[name]["container_id"] == before[name]["container_id"], name
                assert after[name]["restart_count"] == 0, name
                received = (await seen(after[name]["url"]))["ids"]
                check = check_delivery(
                    sender.acked, received, allowed_duplicates=2 * KILLS, what=name, window=2
                )
                lost += check.lost
                duplicates += check.duplicates
        finally:
            await daemon.stop()

    assert tracebacks(daemon.lines()) == [], daemon.tail(80)
    acknowledged = sum(len(s.acked) for s in senders.values())
    assert acknowledged > 2 * KILLS, "too little traffic between the kills to test anything"
    fault_report.record("kills (before the API answered)", f"{KILLS} ({killed_starting})")
    fault_report.record("messages acknowledged", acknowledged)
    fault_report.record(
        "sends that found no Roost (sent again, same key)", sum(s.errors for s in senders.values())
    )
    fault_report.record("messages lost", lost)
    fault_report.record("redelivered (in flight at a kill)", duplicates)
    if restarts:
        fault_report.record(
            "spawn until the API answers, median (s)", sorted(restarts)[len(restarts) // 2]
        )

"""Swarm: cold start and wake through Roost on a real three-node swarm, vs raw Swarm calls.

Needs root and the fixture swarm (``scripts/swarm-fixture``; this script brings it
up with itself as a holder and takes it down at the end unless someone else holds
it). Three measurements, each against a baseline taken in the same run:

- **cold start**: Roost ``ensure_running`` of a newly registered agent
  (``[docker] backend = "swarm"``: service create → its task running → GET /health
  every 5 ms) against raw ``POST /services/create`` with the same service body,
  then polling its tasks every 20 ms (as Roost does) until one runs, then GET
  /health every 5 ms on the node's host-mode port until 200;
- **wake**: the same agent stopped (its service scaled to 0, the task gone) and
  woken by ``ensure_running``, against a raw scale to 1 (with a ForceUpdate bump,
  as Roost does) of an equally stopped service → task running → HTTP 200;
- **node loss**: an agent on a worker whose node is cut off the hub
  (``scripts/swarm-fixture isolate``): the time until it answers again on the
  other worker through Roost (the node is marked down after ~11-13 s: Swarm's
  heartbeat, not Roost, sets that floor), and how long Swarm took to mark it down.

Raw and Roost rounds take turns (each goes first every other round) after one
unmeasured warm-up each, both pinned to the same worker (``PIN``), and every
service is removed after its measurement. The raw service body is the one Roost
sends (``swarm_backend._service_spec``), so only Roost's own work differs. Target: Roost adds ≤ 50 ms (median) to
the raw path. The load average is printed: the machine is shared.

Run (root): ``.venv/bin/python bench/bench_swarm.py [--quick]``
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import common

from roost.adapters.swarm_backend import _service_spec
from roost.core.states import AgentState
from roost.engine import Engine
from roost.ports.runtime import ContainerSpec

TARGET_OVERHEAD = 0.050
FIXTURE = common.ROOT / "scripts" / "swarm-fixture"
TASK_POLL = 0.02
#: Both sides run on the same worker: Swarm spreads new services over the nodes,
#: and the manager's node is busier than the others.
PIN = "node.labels.roost-fixture.node==n2"
TIMEOUT = 120.0


def fixture(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(FIXTURE), *args], check=True, capture_output=True, text=True, timeout=600
    )
    return json.loads(result.stdout) if "--json" in args else {}


async def _running_task(docker: aiodocker.Docker, service_id: str, force: int) -> dict[str, Any]:
    """Poll the service's tasks every TASK_POLL until its task of ``force`` runs."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        tasks = await docker._query_json(
            "tasks", params={"filters": json.dumps({"service": [service_id]})}
        )
        for task in tasks:
            if (task.get("Spec") or {}).get("ForceUpdate", 0) != force:
                continue
            if task["Status"]["State"] == "running":
                return dict(task)
        await asyncio.sleep(TASK_POLL)
    raise TimeoutError(f"service {service_id} has no running task")


async def _url(docker: aiodocker.Docker, task: dict[str, Any], addresses: dict[str, str]) -> str:
    ports = task["Status"]["PortStatus"]["Ports"]
    return f"http://{addresses[task['NodeID']]}:{ports[0]['PublishedPort']}"


async def raw_cold(
    docker: aiodocker.Docker,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    addresses: dict[str, str],
) -> tuple[float, str]:
    t0 = time.monotonic()
    created = await docker._query_json("services/create", "POST", data=json.dumps(body))
    task = await _running_task(docker, created["ID"], 0)
    await common.poll_health(http, await _url(docker, task, addresses) + "/health", timeout=TIMEOUT)
    return time.monotonic() - t0, str(created["ID"])


async def _scale(docker: aiodocker.Docker, service_id: str, replicas: int, bump: int) -> int:
    service = await docker._query_json(f"services/{service_id}")
    spec = service["Spec"]
    spec["Mode"]["Replicated"]["Replicas"] = replicas
    spec["TaskTemplate"]["ForceUpdate"] = spec["TaskTemplate"].get("ForceUpdate", 0) + bump
    await docker._query_json(
        f"services/{service_id}/update",
        "POST",
        params={"version": str(service["Version"]["Index"])},
        data=json.dumps(spec),
    )
    return int(spec["TaskTemplate"]["ForceUpdate"])


async def _stopped(docker: aiodocker.Docker, service_id: str) -> None:
    """Scale to 0 and wait until no task is live (as Roost's sleep does)."""
    await _scale(docker, service_id, 0, 0)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        tasks = await docker._query_json(
            "tasks", params={"filters": json.dumps({"service": [service_id]})}
        )
        if all(t["Status"]["State"] not in ("running", "starting", "preparing") for t in tasks):
            return
        await asyncio.sleep(TASK_POLL)


async def raw_wake(
    docker: aiodocker.Docker,
    http: aiohttp.ClientSession,
    service_id: str,
    addresses: dict[str, str],
) -> float:
    t0 = time.monotonic()
    force = await _scale(docker, service_id, 1, 1)
    task = await _running_task(docker, service_id, force)
    await common.poll_health(http, await _url(docker, task, addresses) + "/health", timeout=TIMEOUT)
    return time.monotonic() - t0


async def cleanup_services(docker: aiodocker.Docker, run: str) -> None:
    """Remove every raw baseline service of this run (errors too)."""
    for service in await docker.services.list(filters={"label": [f"{common.BENCH_LABEL}={run}"]}):
        await docker.services.delete(service["ID"])


async def roost_exit_seen(engine: Engine, name: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while engine.agents.get(name).last_exit is None or engine.agents.get(name).expected_exit:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: its stop's exit was not seen")
        await asyncio.sleep(0.05)


async def main(quick: bool) -> None:
    rounds = 3 if quick else 10
    losses = 1 if quick else 3
    load_before = os.getloadavg()
    swarm = fixture("up", "--json", "--holder", str(os.getpid()))
    try:
        await measure(swarm, rounds, losses, load_before)
    finally:
        fixture("down", "--holder", str(os.getpid()))


async def measure(
    swarm: dict[str, Any], rounds: int, losses: int, load_before: tuple[float, ...]
) -> None:
    manager = f"unix://{swarm['manager_socket']}"
    nodes = {n["node_id"]: n for n in swarm["nodes"]}
    addresses = {node_id: n["address"] for node_id, n in nodes.items()}
    instance = common.run_id("bsw")
    raw_run = common.run_id("bswraw")
    cold: dict[str, list[float]] = {"raw": [], "roost": []}
    wake: dict[str, list[float]] = {"raw": [], "roost": []}
    moves: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="roost-bench-swarm-") as tmp:
        settings = common.make_settings(
            Path(tmp),
            instance,
            defaults={"idle_timeout": 0, "restart_backoff": 0, "stop_timeout": 1, "memory": "96m"},
            docker={
                "backend": "swarm",
                "host": manager,
                "node_hosts": {node_id: f"unix://{n['socket']}" for node_id, n in nodes.items()},
            },
        )
        async with (
            aiodocker.Docker(url=manager) as docker,
            aiohttp.ClientSession() as http,
            Engine(settings) as engine,
        ):
            engine.agent_url = f"http://{swarm['host_address']}:9"  # no agent listener needed
            try:
                for i in range(rounds + 1):  # round 0 is the warm-up
                    spec = ContainerSpec(
                        image=common.MIMIC_IMAGE,
                        labels={common.BENCH_LABEL: raw_run},
                        name=f"{raw_run}-{i}",
                        env={"ROOST_AGENT": f"raw-{i}", "ROOST_URL": "http://x"},
                        port=common.MIMIC_PORT,
                        memory=96 * 1024**2,
                        cap_drop=settings.defaults.cap_drop,
                        cap_add=settings.defaults.cap_add,
                    )

                    async def raw_round(spec: ContainerSpec = spec) -> tuple[float, float]:
                        body = _service_spec(spec, (PIN,))
                        cold_s, service = await raw_cold(docker, http, body, addresses)
                        await _stopped(docker, service)
                        wake_s = await raw_wake(docker, http, service, addresses)
                        await docker.services.delete(service)
                        return cold_s, wake_s

                    async def roost_round(name: str = f"a{i}") -> tuple[float, float]:
                        agent = common.agent_spec(settings, name, placement=[PIN])
                        await engine.agents.register(agent)
                        t0 = time.monotonic()
                        record = await engine.supervisor.ensure_running(name, timeout=TIMEOUT)
                        cold_s = time.monotonic() - t0
                        assert record.state is AgentState.RUNNING
                        await engine.agents.act(name, "stop")
                        await roost_exit_seen(engine, name)
                        t0 = time.monotonic()
                        woken = await engine.supervisor.ensure_running(name, timeout=TIMEOUT)
                        wake_s = time.monotonic() - t0
                        assert woken.container_id == record.container_id  # scaled up again
                        await engine.agents.delete(name)
                        return cold_s, wake_s

                    # In turns, so neither side always meets the other's leftovers.
                    if i % 2:
                        roost_s, raw_s = await roost_round(), await raw_round()
                    else:
                        raw_s, roost_s = await raw_round(), await roost_round()
                    if i:
                        cold["raw"].append(raw_s[0])
                        cold["roost"].append(roost_s[0])
                        wake["raw"].append(raw_s[1])
                        wake["roost"].append(roost_s[1])
                for i in range(losses):
                    moves.append(await node_loss(engine, settings, docker, nodes, i))
            finally:
                await cleanup_services(docker, raw_run)
                await engine.stop(remove=True)
    load_after = os.getloadavg()
    rows = []
    for label, runs in (("cold start", cold), ("wake (scaled 0 → 1)", wake)):
        raw, roost = common.median(runs["raw"]), common.median(runs["roost"])
        rows.append(
            {
                "": label,
                "raw median ms (p90)": f"{common.ms(raw)} ({common.ms(common.p90(runs['raw']))})",
                "Roost median ms (p90)": (
                    f"{common.ms(roost)} ({common.ms(common.p90(runs['roost']))})"
                ),
                "Roost - raw ms": common.ms(roost - raw),
                "ratio": f"{roost / raw:.3f}",
                "≤ 50 ms": "met" if roost - raw <= TARGET_OVERHEAD else "MISSED",
            }
        )
    common.record(f"Swarm: through Roost vs raw ({rounds} interleaved rounds)", rows)
    common.record(
        f"Swarm: node loss → answering on another node ({losses} runs)",
        [
            {
                "run": i + 1,
                "node marked down after s": f"{down:.1f}",
                "agent answering again after s": f"{answering:.1f}",
                "Roost's part (after down) s": f"{answering - down:.1f}",
            }
            for i, (down, answering) in enumerate(moves)
        ],
    )
    print(
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {common.machine()}"
    )


async def node_loss(
    engine: Engine,
    settings: Any,
    docker: aiodocker.Docker,
    nodes: dict[str, dict[str, Any]],
    i: int,
) -> tuple[float, float]:
    """(seconds until Swarm marks the node down, seconds until the agent answers
    again on another node), both from the moment the node was cut off."""
    name = f"mover{i}"
    await engine.agents.register(common.agent_spec(settings, name, placement=["node.role==worker"]))
    record = await engine.supervisor.ensure_running(name, timeout=TIMEOUT)
    assert record.container_id is not None
    tasks = await docker._query_json(
        "tasks", params={"filters": json.dumps({"service": [record.container_id]})}
    )
    [node_id] = {t["NodeID"] for t in tasks if t["Status"]["State"] == "running"}
    node = nodes[node_id]["name"]
    fixture("isolate", node)
    cut = time.monotonic()
    down_at = answering_at = 0.0
    try:
        async with aiohttp.ClientSession() as http:
            while not (down_at and answering_at):
                now = time.monotonic() - cut
                if now > TIMEOUT:
                    raise TimeoutError(f"{name} did not move within {TIMEOUT:g}s")
                if not down_at:
                    state = (await docker._query_json(f"nodes/{node_id}"))["Status"]["State"]
                    if state == "down":
                        down_at = now
                current = engine.agents.get(name)
                if (
                    not answering_at
                    and current.state is AgentState.RUNNING
                    and current.container_id != record.container_id
                    and current.url is not None
                ):
                    await common.poll_health(http, current.url + "/health", timeout=TIMEOUT)
                    answering_at = time.monotonic() - cut
                await asyncio.sleep(0.05)
    finally:
        fixture("rejoin", node)
    await engine.agents.delete(name)
    return down_at, answering_at


if __name__ == "__main__":
    asyncio.run(main(common.parse_args(__doc__ or "").quick))

"""P8: agents that talk back — message → reply in pull and WebSocket mode against push
mode, and pull-mode throughput at 1, 4 and 16 concurrent pullers.

Roost runs as a child process (``roost up``), with four agents:

- ``push``: the mimic agent in push mode (Roost POSTs each message to it);
- ``pull``: the mimic in pull mode (one poller long-polling the agent listener);
- ``ws``: the mimic in WebSocket mode (connected to the agent listener);
- ``queue``: a pull agent whose container only sleeps (busybox): the pullers are
  this script's own tasks, on the agent listener with the container's own token,
  ``max_concurrent_messages = 16`` (up to 16 leases at once).

Latency: ``ROUNDS`` rounds; each sends one message to each of push, pull and ws
(in turn, so drift hits all alike) with ``POST .../messages?wait=true`` and times
the reply; a raw direct POST to the push agent's container is timed in the same
round as the floor. Reported: p50/p90 and each mode's overhead per message over
push mode.

Throughput: ``MESSAGES`` messages are stored for ``queue`` first, then 1, 4 or 16
pullers take (``queue/next``) and complete (``queue/{id}/complete``) them until
none is left; messages/s from the first take to the last complete.

Run: ``.venv/bin/python bench/bench_p8_talkback.py [--quick]``
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import common

PULLERS = (1, 4, 16)


def write_config(directory: Path, instance: str, port: int, *, mimic: str, busybox: str) -> Path:
    return common.write_roost_config(
        directory,
        instance,
        port,
        f"""
[defaults]
memory = "128m"
idle_timeout = 3600
stop_timeout = 1
queue_limit = 1000000

[agents.push]
image = "{mimic}"

[agents.pull]
image = "{mimic}"
delivery = "pull"
env = {{ DELIVERY = "pull", POLL_WAIT = "20" }}

[agents.ws]
image = "{mimic}"
delivery = "websocket"
env = {{ DELIVERY = "websocket" }}

[agents.queue]
image = "{busybox}"
command = ["sleep", "86400"]
delivery = "pull"
max_concurrent_messages = 16
lease_timeout = 60
""",
        server='agent_listen = ":0"',
    )


async def timed_message(http: aiohttp.ClientSession, base: str, agent: str, n: int) -> float:
    started = time.perf_counter()
    async with http.post(
        f"{base}/api/agents/{agent}/messages",
        params={"wait": "true"},
        data=json.dumps({"n": n}),
        headers={"Content-Type": "application/json"},
    ) as response:
        body = await response.json()
    elapsed = time.perf_counter() - started
    if response.status != 200 or body.get("status") != "delivered":
        raise RuntimeError(f"{agent}: {response.status} {body}")
    return elapsed


async def timed_raw(http: aiohttp.ClientSession, url: str, n: int) -> float:
    started = time.perf_counter()
    async with http.post(
        url + "/messages",
        data=json.dumps({"n": n}),
        headers={"Content-Type": "application/json", "Roost-Message-Id": f"raw-{n}"},
    ) as response:
        await response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"raw: {response.status}")
    return elapsed


async def latency(http: aiohttp.ClientSession, base: str, rounds: int) -> dict[str, list[float]]:
    async with http.get(f"{base}/api/agents/push") as response:
        push_url = (await response.json())["url"]
    times: dict[str, list[float]] = {"raw": [], "push": [], "pull": [], "ws": []}
    for n in range(-5, rounds):  # five warm-up rounds first
        round_times = {"raw": await timed_raw(http, push_url, n)}
        for agent in ("push", "pull", "ws"):
            round_times[agent] = await timed_message(http, base, agent, n)
        if n >= 0:
            for key, value in round_times.items():
                times[key].append(value)
    return times


def container_token(container_id: str) -> str:
    """The agent container's ROOST_AGENT_TOKEN (the bench plays that agent)."""
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .Config.Env}}", container_id],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for entry in json.loads(out):
        if entry.startswith("ROOST_AGENT_TOKEN="):
            return str(entry.split("=", 1)[1])
    raise RuntimeError("the queue agent's container has no ROOST_AGENT_TOKEN")


async def throughput(
    http: aiohttp.ClientSession, base: str, agent_url: str, token: str, pullers: int, count: int
) -> dict[str, Any]:
    for n in range(count):
        async with http.post(
            f"{base}/api/agents/queue/messages",
            data=json.dumps({"n": n}),
            headers={"Content-Type": "application/json"},
        ) as response:
            if response.status != 202:
                raise RuntimeError(f"store: {response.status}")
    queue = f"{agent_url}/api/agents/queue/queue"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    done = 0
    leases = 0

    async def puller() -> None:
        nonlocal done, leases
        while done < count:
            async with http.post(f"{queue}/next", params={"wait": "1"}, headers=headers) as resp:
                if resp.status == 204:
                    continue
                lease = await resp.json()
            leases += 1
            async with http.post(
                f"{queue}/{lease['id']}/complete",
                data=json.dumps({"reply": {"n": lease["body"]["n"]}}),
                headers=headers,
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1
                else:
                    raise RuntimeError(f"complete: {resp.status}")

    started = time.perf_counter()
    await asyncio.gather(*(puller() for _ in range(pullers)))
    elapsed = time.perf_counter() - started
    return {"rate": count / elapsed, "seconds": elapsed, "leases": leases}


async def main() -> None:
    args = common.parse_args(__doc__ or "")
    rounds = 40 if args.quick else 300
    count = 500 if args.quick else 4000
    images = common.pinned_images()
    mimic = images.get(common.MIMIC_IMAGE, common.MIMIC_IMAGE)
    busybox = images.get("roost-busybox:latest", "roost-busybox:latest")
    instance = common.run_id("p8")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        port = common.free_port()
        base = f"http://127.0.0.1:{port}"
        config = write_config(directory, instance, port, mimic=mimic, busybox=busybox)
        async with common.cleaned_up((common.INSTANCE_LABEL, instance)):
            process = await common.start_roost(config, directory / "roost.log")
            connector = aiohttp.TCPConnector(limit=64)
            try:
                async with aiohttp.ClientSession(connector=connector) as http:
                    await common.poll_health(http, base + "/healthz", timeout=30)
                    for agent in ("push", "pull", "ws", "queue"):
                        async with http.post(f"{base}/api/agents/{agent}/start") as response:
                            started = await response.json()
                            if response.status != 200:
                                raise RuntimeError(f"start {agent}: {started}")
                    times = await latency(http, base, rounds)
                    token = container_token(started["container_id"])
                    agent_url = agent_listener_url(directory / "roost.log", started)
                    rates = {
                        n: await throughput(http, base, agent_url, token, n, count) for n in PULLERS
                    }
            finally:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
                if process.returncode not in (0, -15):
                    print((directory / "roost.log").read_text()[-3000:], file=sys.stderr)
    push50 = common.median(times["push"])
    rows = []
    for mode, label in (
        ("raw", "raw direct POST to the push agent"),
        ("push", "push (POST .../messages?wait=true)"),
        ("pull", "pull (a long-polling mimic)"),
        ("ws", "websocket (a connected mimic)"),
    ):
        values = times[mode]
        rows.append(
            {
                "message → reply": label,
                "p50 ms": common.ms(common.median(values)),
                "p90 ms": common.ms(common.p90(values)),
                "overhead vs push, p50 ms": "—"
                if mode in ("raw", "push")
                else f"{(common.median(values) - push50) * 1000:+.1f}",
                "vs push, p50": f"{common.median(values) / push50:.2f}×",
            }
        )
    common.record(f"P8 message → reply, {rounds} rounds ({common.machine()})", rows)
    common.record(
        f"P8 pull throughput, {count} messages, max_concurrent_messages 16",
        [
            {
                "pullers": n,
                "messages/s": f"{r['rate']:.0f}",
                "seconds": f"{r['seconds']:.2f}",
                "leases taken": r["leases"],
                "vs 1 puller": f"{r['rate'] / rates[1]['rate']:.2f}×",
            }
            for n, r in rates.items()
        ],
    )


def agent_listener_url(log: Path, agent: dict[str, Any]) -> str:
    """The agent listener's URL: the ROOST_URL given to the agent's container."""
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .Config.Env}}", agent["container_id"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for entry in json.loads(out):
        if entry.startswith("ROOST_URL="):
            return str(entry.split("=", 1)[1])
    raise RuntimeError(f"no ROOST_URL in the container's env (see {log})")


if __name__ == "__main__":
    asyncio.run(main())

"""P6: durable messages accepted and delivered to echo agents, through the HTTP API.

Roost runs as a child process (``roost up``, its own CPU and GIL, like in use) with
mimic echo agents. A concurrent client (``CONCURRENCY`` connections) POSTs N
messages to ``/api/agents/{name}/messages``; each 202 means the message is committed
to SQLite. The clock stops when Roost reports no pending message (every one
delivered, one at a time per agent, in order, each outcome committed before that
agent's next send). Order is then checked against each agent's own record
(``GET /seen``): the ids it received must be its messages in acceptance (``seq``)
order, each once.

Three cases:

- ``echo``: one agent, ``max_concurrent_messages = 1`` (target ≥ 2000 msg/s);
- ``echo4``: one agent with ``max_concurrent_messages = 4``: Roost still starts
  deliveries in ``seq`` order, but four are in flight at once, so arrival order at
  the agent may differ locally; its row reports the share of ids that arrived in
  order (longest in-order subsequence) instead of a strict check;
- ``fan``: ``FAN_AGENTS`` agents (``max_concurrent_messages = 1`` each), message
  *i* to agent *i* mod ``FAN_AGENTS``; strict order checked per agent (target
  ≥ 5000 msg/s over all of them).

Raw baseline, same run, same kind of agent: sequential POSTs straight to one
agent's container (what Roost's delivery lane does, without the durability), once
through its published port (Docker's port proxy) and once to its address on the
bridge network (no proxy; "n/a" where the host cannot reach it). For the fan case
also ``FAN_AGENTS`` such sequential streams at once, one per container: what this
machine's client, agents and network path do together with no Roost at all.

Run: ``.venv/bin/python bench/bench_p6_durable_messages.py [--quick]``
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import common

TARGET_RATE = 2000.0
TARGET_FAN_RATE = 5000.0
CONCURRENCY = 64
#: The wait for the queues to drain polls their depth: every poll is a request
#: Roost serves on the loop that delivers (at a fixed 10 ms it took ~15 % of that
#: loop's time, measured with py-spy), so it waits a quarter of the time the
#: depth left would take at TARGET_RATE, between 5 ms and 100 ms (the end is
#: seen within ~6 ms: near it fewer than 50 messages are left).
POLL_MIN, POLL_MAX = 0.005, 0.1
FAN_AGENTS = 50
#: Agents started at once (Docker saturates near 7 starts/s here).
START_POOL = 6
#: Seconds the client keeps an idle connection (below Roost's keep_alive_timeout).
CLIENT_KEEPALIVE = 2.0


def fan_name(i: int) -> str:
    return f"fan-{i:02d}"


def write_config(directory: Path, instance: str, port: int, mimic: str) -> Path:
    fan = "\n".join(f'[agents.{fan_name(i)}]\nimage = "{mimic}"\n' for i in range(FAN_AGENTS))
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

[agents.echo]
image = "{mimic}"

[agents.echo4]
image = "{mimic}"
max_concurrent_messages = 4

{fan}
""",
        server='max_body_size = "64k"',
    )


async def raw_sequential(http: aiohttp.ClientSession, url: str, count: int, tag: str) -> float:
    """Messages/s of sequential direct POSTs to the agent."""
    started = time.perf_counter()
    for i in range(count):
        async with http.post(
            url + "/messages",
            data=json.dumps({"raw": i}),
            headers={"Content-Type": "application/json", "Roost-Message-Id": f"raw-{tag}-{i}"},
        ) as response:
            await response.read()
            assert response.status == 200
    return count / (time.perf_counter() - started)


async def raw_parallel(http: aiohttp.ClientSession, urls: Sequence[str], count: int) -> float:
    """Messages/s of one sequential stream per container, all at once (``count`` in all)."""
    per = max(1, count // len(urls))
    started = time.perf_counter()
    await asyncio.gather(*(raw_sequential(http, url, per, "par") for url in urls))
    return per * len(urls) / (time.perf_counter() - started)


async def pending(http: aiohttp.ClientSession, base: str, agent: str) -> int:
    """The agent's queue depth. Asked with a status filter so that the listing part
    of the answer is one index lookup, whatever the inbox holds."""
    async with http.get(
        base + f"/api/agents/{agent}/messages", params={"status": "delivering", "limit": "1"}
    ) as response:
        return int((await response.json())["pending"])


async def through_roost(
    http: aiohttp.ClientSession, base: str, agents: Sequence[str], count: int
) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def sender() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            url = base + f"/api/agents/{agents[i % len(agents)]}/messages"
            async with http.post(
                url, data=json.dumps({"n": i}), headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                if response.status != 202:
                    raise RuntimeError(f"POST answered {response.status}")

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    accepted = time.perf_counter()
    # Every message is accepted: an agent whose queue is empty stays empty.
    for agent in agents:
        while left := await pending(http, base, agent):  # noqa: ASYNC110 (another process)
            await asyncio.sleep(min(POLL_MAX, max(POLL_MIN, left / (TARGET_RATE * 4))))
    delivered = time.perf_counter()
    return {
        "accept_rate": count / (accepted - started),
        "rate": count / (delivered - started),
        "seconds": delivered - started,
    }


async def accepted_order(
    http: aiohttp.ClientSession, base: str, agent: str
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    after = 0
    while True:
        async with http.get(
            base + f"/api/agents/{agent}/messages", params={"limit": "1000", "after": str(after)}
        ) as response:
            page = (await response.json())["messages"]
        if not page:
            return messages
        messages.extend(page)
        after = page[-1]["seq"]


def in_order_share(arrived: list[str], expected: list[str]) -> float:
    """Length of the longest increasing run of positions (patience sort) / count."""
    position = {message_id: i for i, message_id in enumerate(expected)}
    tails: list[int] = []
    for message_id in arrived:
        value = position[message_id]
        low, high = 0, len(tails)
        while low < high:
            middle = (low + high) // 2
            if tails[middle] < value:
                low = middle + 1
            else:
                high = middle
        if low == len(tails):
            tails.append(value)
        else:
            tails[low] = value
    return len(tails) / max(len(expected), 1)


async def start_agents(
    http: aiohttp.ClientSession, docker: aiodocker.Docker, base: str, agents: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    """Start the agents (``START_POOL`` at a time); name → (published URL, bridge URL)."""
    slots = asyncio.Semaphore(START_POOL)

    async def start(name: str) -> tuple[str, tuple[str, str | None]]:
        async with slots, http.post(base + f"/api/agents/{name}/start") as response:
            body = await response.json()
            if response.status != 200:
                raise RuntimeError(f"start {name}: {body}")
        shown = await docker.containers.container(body["container_id"]).show()
        networks = shown["NetworkSettings"].get("Networks") or {}
        address = next((n.get("IPAddress") for n in networks.values() if n.get("IPAddress")), None)
        bridge = f"http://{address}:{common.MIMIC_PORT}" if address else None
        return name, (body["url"], bridge)

    return dict(await asyncio.gather(*(start(name) for name in agents)))


async def bridge_reachable(http: aiohttp.ClientSession, url: str | None) -> bool:
    if url is None:
        return False
    try:
        async with http.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as response:
            return response.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def measure(
    http: aiohttp.ClientSession,
    base: str,
    urls: dict[str, tuple[str, str | None]],
    agents: Sequence[str],
    count: int,
    raw_count: int,
) -> dict[str, Any]:
    published, bridge = urls[agents[0]]
    if not await bridge_reachable(http, bridge):
        bridge = None
    raw = [await raw_sequential(http, published, raw_count, "pub")]
    raw_bridge = [await raw_sequential(http, bridge, raw_count, "ip")] if bridge else []
    raw_all: list[float] = []
    if len(agents) > 1:
        raw_all.append(await raw_parallel(http, [urls[a][0] for a in agents], raw_count * 4))
    result = await through_roost(http, base, agents, count)
    raw.append(await raw_sequential(http, published, raw_count, "pub"))
    if bridge:
        raw_bridge.append(await raw_sequential(http, bridge, raw_count, "ip"))
    if len(agents) > 1:
        raw_all.append(await raw_parallel(http, [urls[a][0] for a in agents], raw_count * 4))
    strict = True
    complete = True
    shares: list[float] = []
    numbers: list[int] = []
    for agent in agents:
        order = sorted(await accepted_order(http, base, agent), key=lambda m: m["seq"])
        async with http.get(urls[agent][0] + "/seen") as response:
            seen = await response.json()
        arrived = [i for i in seen["ids"] if not i.startswith("raw-")]
        expected = [m["id"] for m in order]
        numbers.extend(m["body"]["n"] for m in order)
        complete = (
            complete
            and {m["status"] for m in order} <= {"delivered"}
            and set(arrived) == set(expected)
        )
        strict = strict and arrived == expected
        shares.append(in_order_share(list(dict.fromkeys(arrived)), expected))
    complete = complete and sorted(numbers) == list(range(count))
    return {
        "raw": raw,
        "raw_bridge": raw_bridge,
        "raw_all": raw_all,
        "result": result,
        "strict": strict,
        "share": min(shares),
        "complete": complete,
    }


def rates(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in values) if values else "n/a"


async def main() -> None:
    args = common.parse_args(__doc__ or "")
    count = 2000 if args.quick else 20000
    raw_count = 1000 if args.quick else 5000
    images = common.pinned_images()
    mimic = images.get(common.MIMIC_IMAGE, common.MIMIC_IMAGE)
    instance = common.run_id("p6")
    cases: list[tuple[str, list[str], int]] = [
        ("echo", ["echo"], 1),
        ("echo4", ["echo4"], 4),
        (f"{FAN_AGENTS} agents", [fan_name(i) for i in range(FAN_AGENTS)], 1),
    ]
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        base = f"http://127.0.0.1:{common.free_port()}"
        config = write_config(directory, instance, int(base.rsplit(":", 1)[1]), mimic)
        async with common.cleaned_up((common.INSTANCE_LABEL, instance)):
            process = await common.start_roost(config, directory / "roost.log")
            # Idle connections closed before the server's keep-alive timeout (5 s) can
            # close them under a request being sent on them.
            connector = aiohttp.TCPConnector(
                limit=CONCURRENCY + FAN_AGENTS + 4, keepalive_timeout=CLIENT_KEEPALIVE
            )
            try:
                async with (
                    aiohttp.ClientSession(connector=connector) as http,
                    aiodocker.Docker() as docker,
                ):
                    await common.wait_roost(http, base, process, directory / "roost.log")
                    for label, agents, _ in cases:
                        urls = await start_agents(http, docker, base, agents)
                        measured[label] = await measure(http, base, urls, agents, count, raw_count)
            finally:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
                if process.returncode not in (0, -15):
                    print((directory / "roost.log").read_text()[-3000:], file=sys.stderr)
    rows = []
    for label, agents, concurrency in cases:
        m = measured[label]
        result = m["result"]
        ordered = m["strict"] if concurrency == 1 else m["share"] == 1.0
        target = TARGET_RATE if len(agents) == 1 else TARGET_FAN_RATE
        raw_mean = sum(m["raw"]) / len(m["raw"])
        rows.append(
            {
                "case (max_concurrent_messages)": f"{label} ({concurrency})",
                "N": count,
                "raw sequential POST, published port (msg/s)": rates(m["raw"]),
                "raw, bridge address": rates(m["raw_bridge"]),
                f"raw, {FAN_AGENTS} streams at once": rates(m["raw_all"]),
                "Roost accepted (msg/s)": f"{result['accept_rate']:.0f}",
                "Roost accepted + delivered (msg/s)": f"{result['rate']:.0f}",
                "Roost / raw published": f"{result['rate'] / raw_mean:.2f}",
                "all delivered once": "yes" if m["complete"] else "NO",
                "arrived in order": "yes (strict)" if m["strict"] else f"{m['share']:.1%}",
                "target": f"≥ {target:.0f}/s: "
                + ("met" if result["rate"] >= target and ordered and m["complete"] else "MISSED"),
            }
        )
    common.record(f"P6 durable messages ({common.machine()})", rows)


if __name__ == "__main__":
    asyncio.run(main())

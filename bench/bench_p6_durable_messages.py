"""P6: durable messages accepted and delivered to an echo agent, through the HTTP API.

Roost runs as a child process (``roost up``, its own CPU and GIL, like in use) with
one mimic echo agent. A concurrent client (``CONCURRENCY`` connections) POSTs N
messages to ``/api/agents/echo/messages``; each 202 means the message is committed
to SQLite. The clock stops when Roost reports no pending message (every one
delivered, one at a time, in order, each outcome committed before the next send).
Order is then checked against the agent's own record (``GET /seen``): the ids it
received must be the messages in acceptance (``seq``) order, each once.

Raw baseline, same run, same agent: sequential POSTs straight to the container's
published port (what Roost's delivery lane does, without the durability).

A second agent, ``echo4``, has ``max_concurrent_messages = 4``: Roost still starts
deliveries in ``seq`` order, but four are in flight at once, so arrival order at
the agent may differ locally; its row reports the share of ids that arrived in
order (longest in-order subsequence) instead of a strict check.

Target: ≥ 2000 messages/s accepted and delivered, order kept.

Run: ``.venv/bin/python bench/bench_p6_durable_messages.py [--quick]``
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import common

TARGET_RATE = 2000.0
CONCURRENCY = 64
POLL_INTERVAL = 0.01


def write_config(directory: Path, instance: str, port: int) -> Path:
    return common.write_roost_config(
        directory,
        instance,
        port,
        f"""
[defaults]
memory = "128m"
idle_timeout = 3600
stop_timeout = 1

[agents.echo]
image = "{common.MIMIC_IMAGE}"
queue_limit = 1000000

[agents.echo4]
image = "{common.MIMIC_IMAGE}"
queue_limit = 1000000
max_concurrent_messages = 4
""",
        server='max_body_size = "64k"',
    )


async def raw_sequential(http: aiohttp.ClientSession, url: str, count: int) -> float:
    """Messages/s of sequential direct POSTs to the agent."""
    started = time.perf_counter()
    for i in range(count):
        async with http.post(
            url + "/messages",
            data=json.dumps({"raw": i}),
            headers={"Content-Type": "application/json", "Roost-Message-Id": f"raw-{i}"},
        ) as response:
            await response.read()
            assert response.status == 200
    return count / (time.perf_counter() - started)


async def through_roost(
    http: aiohttp.ClientSession, base: str, agent: str, count: int
) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    url = base + f"/api/agents/{agent}/messages"

    async def sender() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            async with http.post(
                url, data=json.dumps({"n": i}), headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                if response.status != 202:
                    raise RuntimeError(f"POST answered {response.status}")

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    accepted = time.perf_counter()
    while True:
        async with http.get(url, params={"limit": "1"}) as resp:
            pending = (await resp.json())["pending"]
        if pending == 0:
            break
        await asyncio.sleep(POLL_INTERVAL)
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


async def measure(
    http: aiohttp.ClientSession, base: str, agent: str, count: int, raw_count: int
) -> dict[str, Any]:
    async with http.post(base + f"/api/agents/{agent}/start") as response:
        url = (await response.json())["url"]
    raw_rate = await raw_sequential(http, url, raw_count)
    result = await through_roost(http, base, agent, count)
    raw_again = await raw_sequential(http, url, raw_count)
    order = sorted(await accepted_order(http, base, agent), key=lambda m: m["seq"])
    async with http.get(url + "/seen") as response:
        seen = await response.json()
    arrived = [i for i in seen["ids"] if not i.startswith("raw-")]
    expected = [m["id"] for m in order]
    complete = (
        len(order) == count
        and {m["status"] for m in order} == {"delivered"}
        and sorted(m["body"]["n"] for m in order) == list(range(count))
        and set(arrived) == set(expected)
    )
    return {
        "raw": (raw_rate, raw_again),
        "result": result,
        "strict": arrived == expected,
        "share": in_order_share(list(dict.fromkeys(arrived)), expected),
        "complete": complete,
    }


async def main() -> None:
    args = common.parse_args(__doc__ or "")
    count = 2000 if args.quick else 20000
    raw_count = 1000 if args.quick else 5000
    common.ensure_images()
    instance = common.run_id("p6")
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        base = f"http://127.0.0.1:{common.free_port()}"
        config = write_config(directory, instance, int(base.rsplit(":", 1)[1]))
        async with common.cleaned_up((common.INSTANCE_LABEL, instance)):
            process = await common.start_roost(config, directory / "roost.log")
            connector = aiohttp.TCPConnector(limit=CONCURRENCY + 4)
            try:
                async with aiohttp.ClientSession(connector=connector) as http:
                    await common.poll_health(http, base + "/healthz", timeout=30)
                    for agent in ("echo", "echo4"):
                        measured[agent] = await measure(http, base, agent, count, raw_count)
            finally:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
                if process.returncode not in (0, -15):
                    print((directory / "roost.log").read_text()[-3000:], file=sys.stderr)
    rows = []
    for agent, concurrency in (("echo", 1), ("echo4", 4)):
        m = measured[agent]
        raw_rate, raw_again = m["raw"]
        result = m["result"]
        ordered = m["strict"] if concurrency == 1 else m["share"] == 1.0
        rows.append(
            {
                "agent (max_concurrent_messages)": f"{agent} ({concurrency})",
                "N": count,
                "raw direct POST, sequential (msg/s)": f"{raw_rate:.0f} / {raw_again:.0f}",
                "Roost accepted (msg/s)": f"{result['accept_rate']:.0f}",
                "Roost accepted + delivered (msg/s)": f"{result['rate']:.0f}",
                "Roost / raw": f"{result['rate'] / ((raw_rate + raw_again) / 2):.2f}",
                "all delivered once": "yes" if m["complete"] else "NO",
                "arrived in order": "yes (strict)" if m["strict"] else f"{m['share']:.1%}",
                "target ≥ 2000/s": "met"
                if result["rate"] >= TARGET_RATE and ordered and m["complete"]
                else "MISSED",
            }
        )
    common.record(f"P6 durable messages ({common.machine()})", rows)


if __name__ == "__main__":
    asyncio.run(main())

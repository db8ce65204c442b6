"""P2: a message to a paused agent → its reply, Roost vs raw unpause + direct POST.

Roost runs as a child process (``roost up``) with one mimic echo agent. Each Roost
round pauses the agent through the API (and waits until Docker reports it paused),
then times ``POST /api/agents/echo/messages?wait=true`` until the reply arrives:
store the message (SQLite commit), wake (state change persisted, unpause; a
container Roost paused while healthy needs no readiness probe), deliver, commit the
outcome, answer.

Raw baseline, same run: a container created with the same body Roost sends,
paused with aiodocker (and, like Roost's, left frozen until Docker reports it
paused); each round times aiodocker ``unpause`` + one POST of the message straight
to the container: at its address on the bridge network when this host reaches it
(as Roost's deliveries go), else at its published port.

Rounds alternate raw / Roost after one unmeasured warm-up each. Docker's unpause
alone varies by 10-60 ms from one call to the next on a busy machine, so the
overhead is reported two ways: the difference of the medians, and the median of
the per-round differences (Roost round i minus raw round i), with the spread of
the latter (p25-p75).

Target: Roost's median overhead ≤ 2 ms (issue 13; the first goal was 5 ms).

Run: ``.venv/bin/python bench/bench_p2_paused_message.py [--quick]``
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import common

TARGET_OVERHEAD = 0.002


def write_config(directory: Path, instance: str, port: int, image: str) -> Path:
    return common.write_roost_config(
        directory,
        instance,
        port,
        f"""
[defaults]
memory = "64m"
idle_timeout = 3600
stop_timeout = 1

[agents.echo]
image = "{image}"
""",
    )


async def wait_paused(docker: aiodocker.Docker, cid: str) -> None:
    container = docker.containers.container(cid)
    deadline = time.monotonic() + 10
    while not (await container.show())["State"]["Paused"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"container {cid[:12]} did not pause")
        await asyncio.sleep(0.01)


async def roost_round(
    http: aiohttp.ClientSession, docker: aiodocker.Docker, base: str, cid: str, i: int
) -> float:
    async with http.post(base + "/api/agents/echo/pause") as response:
        assert response.status == 200, await response.text()
    await wait_paused(docker, cid)
    started = time.perf_counter()
    async with http.post(
        base + "/api/agents/echo/messages", params={"wait": "true"}, json={"round": i}
    ) as response:
        body = await response.json()
    elapsed = time.perf_counter() - started
    assert response.status == 200, body
    assert body["status"] == "delivered", body
    assert body["reply"]["echo"] == {"round": i}
    return elapsed


async def reachable(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as response:
            return response.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def raw_agent(
    docker: aiodocker.Docker, http: aiohttp.ClientSession, run: str, name: str, image: str
) -> tuple[Any, str, str]:
    """The raw baseline's container, started and answering: (container, the URL to
    POST to, which path that is). The URL is its bridge address when this host
    reaches it (as Roost delivers), else its published port."""
    raw_config = common.raw_create_config(run, name)
    raw_config["Image"] = image
    container = await docker.containers.create(raw_config)
    await container.start()
    shown = await container.show()
    binding = shown["NetworkSettings"]["Ports"]["8000/tcp"][0]
    published = f"http://127.0.0.1:{binding['HostPort']}"
    await common.poll_health(http, published + "/health", timeout=30)
    networks = shown["NetworkSettings"].get("Networks") or {}
    address = next((n["IPAddress"] for n in networks.values() if n.get("IPAddress")), "")
    bridge = f"http://{address}:{common.MIMIC_PORT}"
    if address and await reachable(http, bridge):
        return container, bridge, "bridge address"
    return container, published, "published port"


async def raw_round(
    http: aiohttp.ClientSession, docker: aiodocker.Docker, container: Any, url: str, i: int
) -> float:
    await container.pause()
    await wait_paused(docker, container.id)  # as long frozen as Roost's agent is
    started = time.perf_counter()
    await container.unpause()
    async with http.post(
        url + "/messages",
        data=json.dumps({"round": i}),
        headers={"Content-Type": "application/json", "Roost-Message-Id": f"raw-{i}"},
    ) as response:
        body = await response.json()
    elapsed = time.perf_counter() - started
    assert body["echo"] == {"round": i}
    return elapsed


async def main() -> None:
    args = common.parse_args(__doc__ or "")
    rounds = 10 if args.quick else 200
    images = common.pinned_images()
    mimic = images.get(common.MIMIC_IMAGE, common.MIMIC_IMAGE)
    instance = common.run_id("p2")
    raw_run = common.run_id("p2raw")
    roost_times: list[float] = []
    raw_times: list[float] = []
    raw_path = ""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        port = common.free_port()
        base = f"http://127.0.0.1:{port}"
        config = write_config(directory, instance, port, mimic)
        async with common.cleaned_up(
            (common.INSTANCE_LABEL, instance), (common.BENCH_LABEL, raw_run)
        ):
            process = await common.start_roost(config, directory / "roost.log")
            try:
                async with aiodocker.Docker() as docker, aiohttp.ClientSession() as http:
                    container, raw_url, raw_path = await raw_agent(
                        docker, http, raw_run, "p2raw", mimic
                    )

                    await common.wait_roost(http, base, process, directory / "roost.log")
                    async with http.post(base + "/api/agents/echo/start") as response:
                        cid = (await response.json())["container_id"]
                    await raw_round(http, docker, container, raw_url, -1)  # warm-ups
                    await roost_round(http, docker, base, cid, -1)
                    for i in range(rounds):
                        raw_times.append(await raw_round(http, docker, container, raw_url, i))
                        roost_times.append(await roost_round(http, docker, base, cid, i))
            finally:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
                if process.returncode not in (0, -15):
                    print((directory / "roost.log").read_text()[-3000:], file=sys.stderr)
    raw_median, roost_median = common.median(raw_times), common.median(roost_times)
    overhead = roost_median - raw_median
    paired = sorted(r - w for r, w in zip(roost_times, raw_times, strict=True))
    quarter = len(paired) // 4
    common.record(
        f"P2 message to a paused agent → reply ({common.machine()})",
        [
            {
                "rounds": rounds,
                "raw POST to": raw_path,
                "raw unpause + POST p50": common.ms(raw_median),
                "raw p90": common.ms(common.p90(raw_times)),
                "Roost POST ?wait=true p50": common.ms(roost_median),
                "Roost p90": common.ms(common.p90(roost_times)),
                "overhead: difference of p50s": common.ms(overhead),
                "p50 of per-round differences (p25-p75)": f"{common.ms(common.median(paired))} "
                f"({common.ms(paired[quarter])} to {common.ms(paired[-quarter - 1])})",
                "Roost / raw": f"{roost_median / raw_median:.2f}",
                "target ≤ 2 ms": "met"
                if max(overhead, common.median(paired)) <= TARGET_OVERHEAD
                else "MISSED",
            }
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())

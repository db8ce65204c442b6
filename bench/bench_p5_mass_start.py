"""P5: N agents cold-started at once through Roost vs raw concurrent create + start.

Raw: ``asyncio.gather`` of N aiodocker create + start + inspect + 5 ms polling of
GET /health, all at once (aiodocker's default pool of 100 connections), creating
**the same container** Roost creates (the agents' network, the hardening, the
token env: ``common.same_create_config``). Roost: N registered agents,
``ensure_running`` of all of them at once; Roost feeds them to Docker through
its start pool (``docker.max_concurrent_starts``, default 4), which can be tried
at other sizes (``--pools``).

The agent: ``busybox`` (default; busybox ``httpd`` serving /health from a file:
the smallest agent, ~1 MB of its own) or ``mimic`` (the Python test agent: each
boots an interpreter, ~22 MB RSS plus ~18 MB of docker-proxy and shim per
container, so 500 of them need ~20 GB). Between runs every container is removed,
so each run starts from the same empty engine; runs alternate raw / Roost with
a settle pause between them (removing hundreds of containers leaves the kernel
tearing down network namespaces for a while, which slows the next run's
creates), and each Roost run is compared with the mean of the raw runs around it.

Per run: total wall time (all ready), each agent's ready latency (from the
common start instant), and CPU seconds of this process (Roost's, or the raw
baseline's own polling) and of dockerd over the run. Targets: total ≤ 1.0× raw;
median agent ready ≤ 0.55× the raw median.

Run: ``.venv/bin/python bench/bench_p5_mass_start.py [--quick] [--count N]
[--agent busybox|mimic] [--pools 4,8]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import common

from roost.config import ResolvedAgent
from roost.engine import Engine

TARGET_TOTAL_RATIO = 1.0
TARGET_MEDIAN_RATIO = 0.55
SETTLE = 15.0


class Run:
    def __init__(
        self, label: str, latencies: list[float], total: float, cpu: float, dockerd_cpu: float
    ) -> None:
        self.label = label
        self.latencies = latencies
        self.total = total
        self.cpu = cpu
        self.dockerd_cpu = dockerd_cpu


def _dockerd_pid() -> int | None:
    found = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True).stdout.split()
    # The shared daemon is the oldest; the fixtures' private ones come later.
    return min((int(p) for p in found), default=None)


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _agent_spec(settings: Any, name: str, agent: str, images: dict[str, str]) -> ResolvedAgent:
    if agent == "busybox":
        return common.agent_spec(
            settings,
            name,
            image=images["roost-busybox:latest"],
            command=list(common.BUSYBOX_COMMAND),
        )
    return common.agent_spec(settings, name, image=images["roost-mimic:latest"])


def _settings(tmp: Path, instance: str) -> Any:
    return common.make_settings(
        tmp, instance, defaults={"idle_timeout": 3600, "startup_timeout": 600}
    )


async def raw_run(count: int, agent: str, images: dict[str, str], network: str) -> Run:
    run = common.run_id("bp5raw")
    with tempfile.TemporaryDirectory(prefix="roost-bench-p5raw-") as tmp:
        settings = _settings(Path(tmp), run)
        spec = _agent_spec(settings, "raw", agent, images)
    dockerd = _dockerd_pid()
    async with (
        common.cleaned_up((common.BENCH_LABEL, run)),
        aiodocker.Docker() as docker,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        cpu0, dockerd0 = _own_cpu(), _cpu(dockerd)
        t0 = time.time()

        async def one(i: int) -> float:
            name = f"raw-{i}"
            body = common.same_create_config(run, name, spec, network=network)
            marks = await common.raw_cold_start(docker, http, body, f"{run}-{name}", timeout=600)
            return marks.ready - t0

        latencies = await asyncio.gather(*(one(i) for i in range(count)))
        total = time.time() - t0
        cpu, dockerd_cpu = _own_cpu() - cpu0, _cpu(dockerd) - dockerd0
    return Run("raw aiodocker, all at once", list(latencies), total, cpu, dockerd_cpu)


async def roost_run(
    count: int, slots: int, agent: str, images: dict[str, str], network: str
) -> Run:
    instance = common.run_id("bp5")
    dockerd = _dockerd_pid()
    with tempfile.TemporaryDirectory(prefix="roost-bench-p5-") as tmp:
        settings = common.make_settings(
            Path(tmp),
            instance,
            defaults={"idle_timeout": 3600, "startup_timeout": 600},
            docker={"max_concurrent_starts": slots, "agent_network": network},
        )
        async with common.cleaned_up((common.INSTANCE_LABEL, instance)):
            engine = Engine(settings)
            await engine.start()
            try:
                names = [f"a{i}" for i in range(count)]
                for name in names:
                    await engine.agents.register(_agent_spec(settings, name, agent, images))
                cpu0, dockerd0 = _own_cpu(), _cpu(dockerd)
                t0 = time.time()

                async def one(name: str) -> float:
                    await engine.supervisor.ensure_running(name, timeout=600)
                    return time.time() - t0

                latencies = await asyncio.gather(*(one(n) for n in names))
                total = time.time() - t0
                cpu, dockerd_cpu = _own_cpu() - cpu0, _cpu(dockerd) - dockerd0
            finally:
                await engine.stop(leave_running=True)
    return Run(f"Roost, start pool {slots}", list(latencies), total, cpu, dockerd_cpu)


async def settle(quick: bool) -> None:
    """Let the kernel finish tearing down the last run's network namespaces (it
    holds the lock new veths need) before the next run starts."""
    await asyncio.sleep(1.0 if quick else SETTLE)


async def main(quick: bool, count: int, agent: str, pools: tuple[int, ...]) -> None:
    images = common.pinned_images()
    common.neighbour_room(count)
    load_before = os.getloadavg()
    # raw, Roost, raw, Roost, ..., raw: each Roost run is compared with the mean
    # of the raw runs just before and after it, which cancels the engine's drift.
    async with common.bench_network(common.run_id("bp5net")) as network:
        raws = [await raw_run(count, agent, images, network)]
        roosts: list[Run] = []
        for slots in pools:
            await settle(quick)
            roosts.append(await roost_run(count, slots, agent, images, network))
            await settle(quick)
            raws.append(await raw_run(count, agent, images, network))
    rows = []
    verdicts = []
    for i, raw in enumerate(raws):
        rows.append(_row(f"raw aiodocker, all at once (#{i + 1})", raw, None))
        if i < len(roosts):
            run = roosts[i]
            around = raws[i : i + 2]
            base_total = statistics.mean(r.total for r in around)
            base_median = statistics.mean(common.median(r.latencies) for r in around)
            total_ratio = run.total / base_total
            median_ratio = common.median(run.latencies) / base_median
            rows.append(_row(run.label, run, (total_ratio, median_ratio)))
            verdicts.append(
                f"{run.label}: total {total_ratio:.3f}× raw (target ≤ {TARGET_TOTAL_RATIO}: "
                f"{'met' if total_ratio <= TARGET_TOTAL_RATIO else 'MISSED'}), median "
                f"{median_ratio:.3f}× raw (target ≤ {TARGET_MEDIAN_RATIO}: "
                f"{'met' if median_ratio <= TARGET_MEDIAN_RATIO else 'MISSED'})"
            )
    common.record(f"P5 {count} {agent} agents cold-started at once", rows)
    print("ratios are against the mean of the raw runs just before and after")
    for verdict in verdicts:
        print(verdict)
    print(f"load average {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}")


def _row(label: str, run: Run, ratios: tuple[float, float] | None) -> dict[str, str]:
    return {
        "": label,
        "total s": f"{run.total:.2f}",
        "starts/s": f"{len(run.latencies) / run.total:.2f}",
        "median ready s": f"{common.median(run.latencies):.2f}",
        "p90 ready s": f"{common.p90(run.latencies):.2f}",
        "median / total": f"{common.median(run.latencies) / run.total:.2f}",
        "own CPU s": f"{run.cpu:.1f}",
        "dockerd CPU s": f"{run.dockerd_cpu:.1f}",
        "total / raw": f"{ratios[0]:.3f}" if ratios else "",
        "median / raw": f"{ratios[1]:.3f}" if ratios else "",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 agents, one pool: a smoke run")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--agent", choices=("busybox", "mimic"), default="busybox")
    parser.add_argument("--pools", default="4", help="start pool sizes to try, e.g. 4,8")
    args = parser.parse_args()
    pools = tuple(int(p) for p in args.pools.split(","))
    asyncio.run(
        main(
            args.quick,
            20 if args.quick else args.count,
            args.agent,
            pools[:1] if args.quick else pools,
        )
    )

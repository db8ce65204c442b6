"""P5: N agents cold-started at once through Roost vs raw concurrent create + start.

Raw: ``asyncio.gather`` of N aiodocker create + start + inspect + 5 ms polling of
GET /health, all at once (aiodocker's default pool of 100 connections). Roost:
N registered agents, ``ensure_running`` of all of them at once; Roost feeds them
to Docker through its start pool (``max_concurrent_starts``, default 4), which
is also tried at other sizes. Between runs every container is removed, so each
run starts from the same empty engine; runs alternate raw / Roost with a settle
pause between them (removing 100 containers leaves the kernel tearing down
network namespaces for a while, which slows the next run's creates), and each
Roost run is compared with the mean of the raw runs around it. Memory limit 64m
per container.

Per run: total wall time (all ready) and each agent's ready latency (from the
common start instant). Targets: total ≤ 1.1× raw; median agent ready ≤ 0.6× the
raw median.

Run: ``.venv/bin/python bench/bench_p5_mass_start.py [--quick]``
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiodocker
import aiohttp
import common

from roost.engine import Engine

TARGET_TOTAL_RATIO = 1.1
TARGET_MEDIAN_RATIO = 0.6
SETTLE = 15.0


class Run:
    def __init__(self, label: str, latencies: list[float], total: float) -> None:
        self.label = label
        self.latencies = latencies
        self.total = total


async def raw_run(count: int) -> Run:
    run = common.run_id("bp5raw")
    async with (
        common.cleaned_up((common.BENCH_LABEL, run)),
        aiodocker.Docker() as docker,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        t0 = time.time()

        async def one(i: int) -> float:
            name = f"raw-{i}"
            marks = await common.raw_cold_start(
                docker, http, common.raw_create_config(run, name), f"{run}-{name}", timeout=300
            )
            return marks.ready - t0

        latencies = await asyncio.gather(*(one(i) for i in range(count)))
        total = time.time() - t0
    return Run("raw aiodocker, all at once", list(latencies), total)


async def roost_run(count: int, slots: int) -> Run:
    instance = common.run_id("bp5")
    with tempfile.TemporaryDirectory(prefix="roost-bench-p5-") as tmp:
        settings = common.make_settings(
            Path(tmp), instance, defaults={"idle_timeout": 3600, "startup_timeout": 300}
        )
        async with common.cleaned_up((common.INSTANCE_LABEL, instance)):
            engine = Engine(settings)
            await engine.start()
            try:
                engine.supervisor.start_slots = asyncio.Semaphore(slots)
                names = [f"a{i}" for i in range(count)]
                for name in names:
                    await engine.agents.register(common.agent_spec(settings, name))
                t0 = time.time()

                async def one(name: str) -> float:
                    await engine.supervisor.ensure_running(name, timeout=300)
                    return time.time() - t0

                latencies = await asyncio.gather(*(one(n) for n in names))
                total = time.time() - t0
            finally:
                await engine.stop(leave_running=True)
    return Run(f"Roost, start pool {slots}", list(latencies), total)


async def settle(quick: bool) -> None:
    """Let the kernel finish tearing down the last run's network namespaces (it
    holds the lock new veths need) before the next run starts."""
    await asyncio.sleep(1.0 if quick else SETTLE)


async def main(quick: bool) -> None:
    count = 10 if quick else 100
    pools = (4,) if quick else (4, 3, 6)
    common.ensure_images()
    # raw, Roost, raw, Roost, ..., raw: each Roost run is compared with the mean
    # of the raw runs just before and after it, which cancels the engine's drift.
    raws = [await raw_run(count)]
    roosts: list[Run] = []
    for slots in pools:
        await settle(quick)
        roosts.append(await roost_run(count, slots))
        await settle(quick)
        raws.append(await raw_run(count))
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
    common.record(f"P5 {count} agents cold-started at once", rows)
    print("ratios are against the mean of the raw runs just before and after")
    for verdict in verdicts:
        print(verdict)


def _row(label: str, run: Run, ratios: tuple[float, float] | None) -> dict[str, str]:
    return {
        "": label,
        "total s": f"{run.total:.2f}",
        "starts/s": f"{len(run.latencies) / run.total:.2f}",
        "median ready s": f"{common.median(run.latencies):.2f}",
        "p90 ready s": f"{common.p90(run.latencies):.2f}",
        "total / raw": f"{ratios[0]:.3f}" if ratios else "",
        "median / raw": f"{ratios[1]:.3f}" if ratios else "",
    }


if __name__ == "__main__":
    asyncio.run(main(common.parse_args(__doc__ or "").quick))

"""P1: cold start of a fresh agent until its URL answers, Roost vs raw aiodocker.

Roost: ``engine.supervisor.ensure_running`` of a newly registered agent (ensure
image → create → start → HTTP readiness polled every 5 ms, with every state
change persisted). Raw: aiodocker create + start + inspect for the published
port + GET /health every 5 ms until 200, with the same create body.

The two are interleaved (raw, Roost, raw, Roost, ...) after one unmeasured warm-up
each, and every container is removed right after its measurement, so both see
the same engine load. Target: Roost's median overhead ≤ 15 ms.

Run: ``.venv/bin/python bench/bench_p1_cold_start.py [--quick]``
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import aiodocker
import aiohttp
import common

from roost.engine import Engine

TARGET_OVERHEAD = 0.015


Phases = dict[str, float]


def _phases(t0: float, create: float, created: float, started: float, ready: float) -> Phases:
    return {
        "total": ready - t0,
        "request → create call": create - t0,
        "create call": created - create,
        "create return → start return": started - created,
        "start return → ready": ready - started,
    }


async def main(quick: bool) -> None:
    rounds = 3 if quick else 20
    common.ensure_images()
    instance = common.run_id("bp1")
    raw_run = common.run_id("bp1raw")
    roost_runs: list[Phases] = []
    raw_runs: list[Phases] = []
    with tempfile.TemporaryDirectory(prefix="roost-bench-p1-") as tmp:
        settings = common.make_settings(
            Path(tmp), instance, defaults={"idle_timeout": 3600, "restart_backoff": 0}
        )
        runtime = common.InstrumentedRuntime()
        async with (
            common.cleaned_up((common.INSTANCE_LABEL, instance), (common.BENCH_LABEL, raw_run)),
            aiodocker.Docker() as docker,
            aiohttp.ClientSession() as http,
            Engine(settings, runtime=runtime) as engine,
        ):
            for i in range(rounds + 1):  # round 0 is the warm-up
                name = f"raw-{i}"
                t0 = time.time()
                raw = await common.raw_cold_start(
                    docker, http, common.raw_create_config(raw_run, name), f"{raw_run}-{name}"
                )
                await docker.containers.container(raw.cid).delete(force=True, v=True)
                if i:
                    raw_runs.append(
                        _phases(
                            t0,
                            raw.create_called,
                            raw.create_returned,
                            raw.start_returned,
                            raw.ready,
                        )
                    )

                agent = f"a{i}"
                await engine.agents.register(common.agent_spec(settings, agent))
                t0 = time.time()
                record = await engine.supervisor.ensure_running(agent, timeout=60)
                ready = time.time()
                assert record.url is not None
                assert record.container_id is not None
                create = runtime.first("create", after=t0, arg=record.container_id)
                start = runtime.first("start", after=t0, arg=record.container_id)
                assert create is not None
                assert start is not None
                await engine.agents.delete(agent)
                if i:
                    roost_runs.append(
                        _phases(t0, create.called, create.returned, start.returned, ready)
                    )
            await engine.stop(leave_running=True)

    rows = []
    for phase in roost_runs[0]:
        raw_median = common.median([r[phase] for r in raw_runs])
        roost_median = common.median([r[phase] for r in roost_runs])
        rows.append(
            {
                "phase (medians)": phase,
                "raw ms": common.ms(raw_median),
                "Roost ms": common.ms(roost_median),
                "Roost - raw ms": common.ms(roost_median - raw_median),
            }
        )
    common.record(f"P1 cold start → ready URL ({rounds} interleaved rounds)", rows)
    raw_totals = [r["total"] for r in raw_runs]
    roost_totals = [r["total"] for r in roost_runs]
    overhead = common.median(roost_totals) - common.median(raw_totals)
    met = "met" if overhead <= TARGET_OVERHEAD else "MISSED"
    print(
        f"raw median {common.ms(common.median(raw_totals))} ms (p90 {common.ms(common.p90(raw_totals))}); "
        f"Roost median {common.ms(common.median(roost_totals))} ms (p90 {common.ms(common.p90(roost_totals))})"
    )
    print(
        f"overhead (median Roost - median raw): {common.ms(overhead)} ms; "
        f"ratio {common.median(roost_totals) / common.median(raw_totals):.3f}; "
        f"target ≤ {common.ms(TARGET_OVERHEAD)} ms: {met}"
    )


if __name__ == "__main__":
    asyncio.run(main(common.parse_args(__doc__ or "").quick))

"""Jobs: N short jobs (``true``) through Roost's job runner vs raw aiodocker, and a
job started from a snapshot vs from its base image. Same run, ratios printed.

Part 1, throughput. Raw: create + start + wait + remove per job with aiodocker,
sequentially (concurrency 1) and ``asyncio.gather`` bounded by a semaphore of 4
and 8. Roost: N jobs submitted at once to an engine with ``max_workers`` 1, 4
and 8; done when every job is final and every worker has finished (its
container removed). Roost does more per job than the raw loop (ensure_image,
four SQLite writes, inspect and the log tail before removing, events); that is
the overhead measured. Per concurrency the runs go raw, Roost, Roost, raw and
the table shows the means.

Part 2, snapshots. Sequential single jobs ``true`` with a snapshot key vs without,
alternating: "start" is submit → container started (``started_at -
created_at``), "total" submit → final. A snapshot job's total includes its own
commit (it succeeds, so it saves a new snapshot, and the superseded one is
evicted after its container is removed).

Every container carries a label unique to the run and is removed at the end;
snapshot images of the run's key are removed too.

Run: ``.venv/bin/python bench/bench_jobs.py [--quick]``
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiodocker
import common

from roost.config import Settings, parse_settings
from roost.core.jobs import FINAL_STATUSES, JobStatus, snapshot_repository
from roost.engine import Engine
from roost.ports.jobs import Job

BUSYBOX_IMAGE = "roost-busybox:latest"
MEMORY = 64 * 1024 * 1024
CONCURRENCY = (1, 4, 8)


class Finals:
    """A job listener: one event per job, set when the job reaches a final state."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}

    def __call__(self, job: Job) -> None:
        if job.status in FINAL_STATUSES:
            self.event(job.id).set()

    def event(self, job_id: str) -> asyncio.Event:
        return self.events.setdefault(job_id, asyncio.Event())

    async def wait(self, job_ids: list[str]) -> None:
        await asyncio.gather(*(self.event(job_id).wait() for job_id in job_ids))


def raw_config(run: str, index: int) -> dict[str, Any]:
    """What Roost's adapter sends for a job ``true`` with a 64m limit."""
    return {
        "Image": BUSYBOX_IMAGE,
        "Cmd": ["true"],
        "Labels": {common.BENCH_LABEL: run, "roost.bench.job": str(index)},
        "Env": [],
        "HostConfig": {
            "Memory": MEMORY,
            "MemorySwap": MEMORY,
            "PidsLimit": 512,
            "SecurityOpt": ["no-new-privileges"],
        },
    }


async def raw_run(count: int, concurrency: int) -> float:
    run = common.run_id("bjraw")
    async with common.cleaned_up((common.BENCH_LABEL, run)), aiodocker.Docker() as docker:
        slots = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with slots:
                container = await docker.containers.create(raw_config(run, index))
                await container.start()
                result = await container.wait()
                assert result["StatusCode"] == 0
                await container.delete(force=True, v=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - t0


def settings_for(state_dir: Path, instance: str, max_workers: int) -> Settings:
    document = {
        "server": {"state_dir": str(state_dir)},
        "docker": {"instance": instance},
        "defaults": {"memory": "64m"},
        "jobs": {"max_workers": max_workers, "kill_grace": 1, "orphan_scan_interval": 3600},
    }
    return parse_settings(document, file=str(state_dir / "roost.toml"), base_dir=state_dir)


async def roost_run(count: int, max_workers: int) -> float:
    instance = common.run_id("bjobs")
    with tempfile.TemporaryDirectory(prefix="roost-bench-jobs-") as tmp:
        async with common.cleaned_up((common.INSTANCE_LABEL, instance)):
            engine = Engine(settings_for(Path(tmp), instance, max_workers))
            await engine.start()
            try:
                finals = Finals()
                engine.jobs.add_listener(finals)
                t0 = time.perf_counter()
                jobs = [
                    await engine.jobs.submit(image=BUSYBOX_IMAGE, command=["true"], timeout=120)
                    for _ in range(count)
                ]
                await finals.wait([j.id for j in jobs])
                await engine.jobs.wait_idle()  # the last containers are removed
                elapsed = time.perf_counter() - t0
                statuses = {(await engine.jobs.get(j.id)).status for j in jobs}
                assert statuses == {JobStatus.SUCCEEDED}, statuses
            finally:
                await engine.stop()
    return elapsed


async def snapshot_run(rounds: int) -> tuple[list[Job], list[Job]]:
    instance = common.run_id("bjsnap")
    key = f"{instance}-bench"
    base: list[Job] = []
    snap: list[Job] = []
    try:
        with tempfile.TemporaryDirectory(prefix="roost-bench-jobs-") as tmp:
            async with (
                common.cleaned_up((common.INSTANCE_LABEL, instance)),
                Engine(settings_for(Path(tmp), instance, 1)) as engine,
            ):
                finals = Finals()
                engine.jobs.add_listener(finals)

                async def one(snapshot_key: str | None, command: list[str]) -> Job:
                    job = await engine.jobs.submit(
                        image=BUSYBOX_IMAGE, command=command, timeout=120, snapshot_key=snapshot_key
                    )
                    await finals.wait([job.id])
                    await engine.jobs.wait_idle()
                    job = await engine.jobs.get(job.id)
                    assert job.status is JobStatus.SUCCEEDED, job.error
                    return job

                seed = await one(key, ["sh", "-c", "head -c 1048576 /dev/zero > /blob"])
                assert not seed.snapshot_used
                await one(None, ["true"])  # warm-up
                for _ in range(rounds):
                    base.append(await one(None, ["true"]))
                    job = await one(key, ["true"])
                    assert job.snapshot_used
                    snap.append(job)
    finally:
        await asyncio.to_thread(remove_images, snapshot_repository(key))
    return base, snap


def remove_images(repository: str) -> None:
    refs = subprocess.run(
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", repository],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if refs:
        subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True, check=False)


def start_latency(job: Job) -> float:
    assert job.started_at is not None
    return job.started_at - job.created_at


def total_latency(job: Job) -> float:
    assert job.finished_at is not None
    return job.finished_at - job.created_at


async def main() -> None:
    args = common.parse_args(__doc__ or "")
    count = 10 if args.quick else 50
    rounds = 3 if args.quick else 10
    common.ensure_images()
    print(f"# bench_jobs: {count} jobs `true`, {common.machine()}\n", flush=True)

    rows: list[dict[str, Any]] = []
    for concurrency in CONCURRENCY:
        # ABBA order (raw, Roost, Roost, raw): a linear drift of the machine
        # affects both means alike.
        raw_first = await raw_run(count, concurrency)
        roost_runs = [await roost_run(count, concurrency) for _ in range(2)]
        raw = (raw_first + await raw_run(count, concurrency)) / 2
        roost = sum(roost_runs) / 2
        rows.append(
            {
                "concurrency": concurrency,
                "raw total s": f"{raw:.2f}",
                "roost total s": f"{roost:.2f}",
                "raw jobs/s": f"{count / raw:.1f}",
                "roost jobs/s": f"{count / roost:.1f}",
                "roost / raw": f"{roost / raw:.2f}",
            }
        )
    common.record(f"{count} short jobs: Roost max_workers=N vs raw with N in flight", rows)

    base, snap = await snapshot_run(rounds)
    base_start = statistics.median(start_latency(j) for j in base)
    snap_start = statistics.median(start_latency(j) for j in snap)
    base_total = statistics.median(total_latency(j) for j in base)
    snap_total = statistics.median(total_latency(j) for j in snap)
    common.record(
        f"start from snapshot vs base ({rounds} alternating rounds, medians)",
        [
            {
                "phase": "submit → started",
                "base ms": common.ms(base_start),
                "snapshot ms": common.ms(snap_start),
                "snapshot / base": f"{snap_start / base_start:.2f}",
            },
            {
                "phase": "submit → final (snapshot: incl. its commit)",
                "base ms": common.ms(base_total),
                "snapshot ms": common.ms(snap_total),
                "snapshot / base": f"{snap_total / base_total:.2f}",
            },
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())

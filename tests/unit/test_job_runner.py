"""JobRunner on FakeRuntime and FakeClock (timeouts run on fake time), with the real
SQLite job store. Store writes run on the database's writer thread, so tests wait for
their effects by polling with a deadline (``wait_until``), never by sleeping."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from roost import errors
from roost.adapters.sqlite_database import Database
from roost.adapters.sqlite_jobs import SqliteJobStore
from roost.config import JobsConfig
from roost.core import labels
from roost.core.backoff import Backoff
from roost.core.jobs import (
    MAX_SNAPSHOT_GENERATIONS,
    JobStatus,
    SnapshotRecord,
    snapshot_repository,
)
from roost.ports.jobs import Job
from roost.ports.runtime import ContainerSpec
from roost.reactor.jobbing import JobRunner
from roost.testing import FakeClock, FakeRuntime
from tests.conftest import wait_until

BASE = "base:1"
INSTANCE = "unit"
J = JobStatus


class RecordingRuntime(FakeRuntime):
    """FakeRuntime that records stop graces and can fail chosen operations."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stop_graces: list[float] = []
        #: the roost.job label of every container created, in order.
        self.created_jobs: list[str] = []
        #: operation name → errors to raise on its next calls, in order.
        self.failures: dict[str, list[Exception]] = {}

    def _maybe_fail(self, operation: str) -> None:
        queued = self.failures.get(operation)
        if queued:
            raise queued.pop(0)

    async def create(self, spec: ContainerSpec) -> str:
        self._maybe_fail("create")
        container_id = await super().create(spec)
        self.created_jobs.append(spec.labels.get(labels.JOB, ""))
        return container_id

    async def stop(self, container_id: str, *, grace: float) -> None:
        self.stop_graces.append(grace)
        await super().stop(container_id, grace=grace)

    async def commit(self, container_id: str, **kwargs: Any) -> str:
        self._maybe_fail("commit")
        return await super().commit(container_id, **kwargs)


@dataclasses.dataclass
class Rig:
    clock: FakeClock
    runtime: RecordingRuntime
    database: Database
    store: SqliteJobStore
    runner: JobRunner
    config: JobsConfig

    async def job(self, job_id: str) -> Job:
        job = await self.store.get_job(job_id)
        assert job is not None
        return job

    async def until(self, job_id: str, predicate: Callable[[Job], bool], what: str) -> Job:
        async def check() -> bool:
            return predicate(await self.job(job_id))

        await wait_until(check, timeout=10, what=f"{job_id}: {what}")
        return await self.job(job_id)

    async def started(self, job_id: str) -> Job:
        """Wait until the job's container runs and its timer is armed."""
        job = await self.until(job_id, lambda j: j.started_at is not None, "container started")
        # Sleepers: the orphan-scan loop, plus one timer per supervised job.
        await wait_until(
            lambda: self.clock.sleepers >= 1 + self.runner.running,
            timeout=10,
            what="timers armed",
        )
        return job

    async def final(self, job_id: str) -> Job:
        return await self.until(job_id, lambda j: j.status not in (J.QUEUED, J.RUNNING), "end")

    def new_runner(self, **config: Any) -> JobRunner:
        return JobRunner(
            store=self.store,
            runtime=self.runtime,
            clock=self.clock,
            instance=INSTANCE,
            config=self.config.model_copy(update=config),
            default_memory=64 * 1024 * 1024,
            retry=Backoff((1.0, 2.0)),
        )


def _config(**overrides: Any) -> JobsConfig:
    values: dict[str, Any] = {
        "max_workers": 2,
        "kill_grace": 5.0,
        "default_timeout": 100.0,
        "orphan_scan_interval": 100_000.0,
        "secret_env": ("EXTRA_SECRET_NAME",),
    }
    values.update(overrides)
    return JobsConfig.model_validate(values)


async def _rig(tmp_path: Path, **config: Any) -> AsyncIterator[Rig]:
    clock = FakeClock()
    runtime = RecordingRuntime(images=[BASE], clock=clock.now)
    database = Database(tmp_path / "roost.db")
    await database.open()
    store = SqliteJobStore(database, secret_env=("EXTRA_SECRET_NAME",), wall_clock=clock.now)
    jobs_config = _config(**config)
    runner = JobRunner(
        store=store,
        runtime=runtime,
        clock=clock,
        instance=INSTANCE,
        config=jobs_config,
        default_memory=64 * 1024 * 1024,
        retry=Backoff((1.0, 2.0)),
    )
    await runner.start()
    rig = Rig(clock, runtime, database, store, runner, jobs_config)
    try:
        yield rig
    finally:
        await rig.runner.stop(leave_running=True)
        await database.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for r in _rig(tmp_path):
        yield r


def _job_containers(runtime: FakeRuntime) -> list[str]:
    return [c for op, c in runtime.calls if op == "create" and c]


# --------------------------------------------------------------------------- basics


async def test_job_succeeds_with_exit_info_and_logs_when_container_exits_zero(rig: Rig) -> None:
    job = await rig.runner.submit(image=BASE, command=["true"], timeout=60)
    assert job.status is J.QUEUED
    job = await rig.started(job.id)
    assert job.status is J.RUNNING
    assert job.container_id is not None
    cid = job.container_id
    spec = rig.runtime.container_spec(cid)
    assert spec.labels[labels.JOB] == job.id
    assert spec.labels[labels.INSTANCE] == INSTANCE
    assert spec.labels[labels.MANAGED] == "true"
    assert spec.labels[labels.SNAPSHOT] == "false"
    assert spec.memory == 64 * 1024 * 1024
    assert spec.memory_swap is None  # = memory: no swap
    assert spec.command == ("true",)

    rig.runtime.log_lines[cid] = [f"line {n}" for n in range(60)]
    await rig.clock.advance(7)
    rig.runtime.crash(cid, 0)
    done = await rig.final(job.id)

    assert done.status is J.SUCCEEDED
    assert done.exit_code == 0
    assert done.error == ""
    assert done.duration == pytest.approx(7)
    assert done.log_tail.splitlines() == [f"line {n}" for n in range(10, 60)]
    assert await rig.runtime.list(labels.ownership(INSTANCE)) == []
    ops = [op for op, target in rig.runtime.calls if target == cid]
    assert ops.index("inspect") < ops.index("remove")
    assert ops.index("logs_tail") < ops.index("remove")


async def test_job_fails_naming_exit_code_when_container_exits_nonzero(rig: Rig) -> None:
    job = await rig.started((await rig.runner.submit(image=BASE)).id)
    assert job.container_id is not None
    rig.runtime.log_lines[job.container_id] = ["boom"]
    rig.runtime.crash(job.container_id, 3)
    done = await rig.final(job.id)
    assert done.status is J.FAILED
    assert done.exit_code == 3
    assert done.error == "exited with code 3"
    assert done.log_tail == "boom\n"


async def test_job_fails_with_oom_recorded_when_killed_for_memory(rig: Rig) -> None:
    job = await rig.started((await rig.runner.submit(image=BASE)).id)
    assert job.container_id is not None
    rig.runtime.crash(job.container_id, 137, oom=True)
    done = await rig.final(job.id)
    assert done.status is J.FAILED
    assert done.oom_killed is True
    assert "out-of-memory" in done.error
    assert "64 MiB" in done.error


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("exit_after_stop", [0, 137])
async def test_job_times_out_with_term_then_kill_when_timeout_passes(
    rig: Rig, exit_after_stop: int
) -> None:
    rig.runtime.stop_exit_code = exit_after_stop
    job = await rig.started((await rig.runner.submit(image=BASE, timeout=30)).id)
    await rig.clock.advance(29.5)
    assert (await rig.job(job.id)).status is J.RUNNING
    assert rig.runtime.stop_graces == []
    await rig.clock.advance(1)
    done = await rig.final(job.id)
    assert done.status is J.TIMED_OUT  # the exit never overwrites it
    assert done.exit_code == exit_after_stop
    assert rig.runtime.stop_graces == [rig.config.kill_grace]
    assert "timed out after 30 s" in done.error


# --------------------------------------------------------------------------- queue


async def test_jobs_run_fifo_and_never_more_than_max_workers_when_many_queued(rig: Rig) -> None:
    submitted = [(await rig.runner.submit(image=BASE, command=[str(n)])).id for n in range(5)]
    for job_id in submitted[:2]:
        await rig.started(job_id)
    assert [(await rig.job(j)).status for j in submitted[2:]] == [J.QUEUED] * 3
    finished: list[str] = []
    for _ in range(5):
        running = await rig.runtime.list(labels.ownership(INSTANCE))
        assert 1 <= len(running) <= rig.config.max_workers
        oldest = min(running, key=lambda c: rig.runtime.created_jobs.index(c.labels[labels.JOB]))
        finished.append(oldest.labels[labels.JOB])
        rig.runtime.crash(oldest.id, 0)
        await rig.final(finished[-1])
        await wait_until(lambda: rig.runner.running == min(2, 5 - len(finished)), what="refilled")
    assert rig.runtime.created_jobs == submitted
    assert finished == submitted


async def test_queued_job_is_cancelled_without_container_when_cancelled_before_start(
    tmp_path: Path,
) -> None:
    async for rig in _rig(tmp_path, max_workers=1):
        first = await rig.runner.submit(image=BASE)
        second = await rig.runner.submit(image=BASE)
        await rig.started(first.id)
        cancelled = await rig.runner.cancel(second.id)
        assert cancelled.status is J.CANCELLED
        assert cancelled.container_id is None
        with pytest.raises(errors.StateError, match="already ended: cancelled"):
            await rig.runner.cancel(second.id)
        assert len(_job_containers(rig.runtime)) == 1


async def test_running_job_is_stopped_and_cancelled_when_cancel_requested(rig: Rig) -> None:
    rig.runtime.stop_exit_code = 143
    job = await rig.started((await rig.runner.submit(image=BASE)).id)
    done = await rig.runner.cancel(job.id)
    assert done.status is J.CANCELLED
    assert done.exit_code == 143
    assert rig.runtime.stop_graces == [rig.config.kill_grace]
    with pytest.raises(errors.NotFound):
        await rig.runner.cancel("job-nope")


# --------------------------------------------------------------------------- errors


async def test_transient_errors_are_retried_when_within_budget(rig: Rig) -> None:
    rig.runtime.failures["create"] = [
        errors.DockerUnavailable("engine restarting"),
        errors.ContainerError("500 server error"),
    ]
    job = await rig.runner.submit(image=BASE)
    await wait_until(lambda: rig.clock.sleepers >= 2, what="first retry delay")
    await rig.clock.advance(1)
    await wait_until(lambda: rig.clock.sleepers >= 2, what="second retry delay")
    await rig.clock.advance(2)
    job = await rig.started(job.id)
    assert job.status is J.RUNNING
    assert rig.runtime.failures["create"] == []


async def test_job_fails_naming_error_when_transient_budget_is_spent(rig: Rig) -> None:
    rig.runtime.failures["create"] = [errors.DockerUnavailable(f"down {n}") for n in range(3)]
    job = await rig.runner.submit(image=BASE)
    for delay in (1, 2):
        await wait_until(lambda: rig.clock.sleepers >= 2, what="retry delay")
        await rig.clock.advance(delay)
    done = await rig.final(job.id)
    assert done.status is J.FAILED
    assert "down 2" in done.error
    assert done.container_id is None


async def test_job_fails_at_once_when_image_cannot_be_had(rig: Rig) -> None:
    job = await rig.runner.submit(image="nowhere:404")
    done = await rig.final(job.id)
    assert done.status is J.FAILED
    assert "cannot run the job's container" in done.error
    assert "nowhere:404" in done.error
    assert [t for op, t in rig.runtime.calls if op == "ensure_image"] == ["nowhere:404"]


# --------------------------------------------------------------------------- snapshots


async def _run_to_success(rig: Rig, job: Job) -> Job:
    started = await rig.started(job.id)
    assert started.container_id is not None
    rig.runtime.crash(started.container_id, 0)
    return await rig.final(job.id)


async def test_next_job_starts_from_scrubbed_snapshot_when_key_succeeded_before(rig: Rig) -> None:
    env = {"API_TOKEN": "supersecret", "EXTRA_SECRET_NAME": "hidden", "MODE": "x"}
    first = await rig.runner.submit(image=BASE, env=env, snapshot_key="Repo/42")
    done = await _run_to_success(rig, first)
    assert done.status is J.SUCCEEDED
    assert done.snapshot_used is False
    snapshot = await rig.store.current_snapshot("Repo/42")
    assert snapshot is not None
    assert snapshot.image == f"{snapshot_repository('Repo/42')}:{first.id}"
    assert snapshot.image == snapshot.image.lower()
    image_env = rig.runtime._image_meta[snapshot.image].env
    assert "MODE=x" in image_env
    assert not any("supersecret" in e or "hidden" in e for e in image_env)
    # the stored job keeps names, not secret values, once it is over
    rows = await rig.database.fetch_all("SELECT env FROM jobs WHERE id = ?", (first.id,))
    assert json.loads(rows[0][0]) == {"API_TOKEN": "", "EXTRA_SECRET_NAME": "", "MODE": "x"}

    second = await rig.runner.submit(image=BASE, snapshot_key="Repo/42")
    started = await rig.started(second.id)
    assert started.snapshot_used is True
    assert started.container_id is not None
    spec = rig.runtime.container_spec(started.container_id)
    assert spec.image == snapshot.image
    assert spec.labels[labels.SNAPSHOT] == "true"
    assert snapshot.generation == 1
    rig.runtime.crash(started.container_id, 0)
    await rig.final(second.id)
    newest = await rig.store.current_snapshot("Repo/42")
    assert newest is not None
    assert newest.image.endswith(second.id)
    assert newest.generation == 2


async def test_job_starts_from_base_and_restarts_chain_when_snapshot_is_too_deep(
    rig: Rig,
) -> None:
    deep = SnapshotRecord(
        key="k",
        image="roost-snapshot/k:job-old",
        job_id="job-old",
        size=1,
        created_at=rig.clock.now(),
        last_used_at=rig.clock.now(),
        generation=MAX_SNAPSHOT_GENERATIONS,
    )
    rig.runtime.images.add(deep.image)
    await rig.store.put_snapshot(deep)
    job = await rig.runner.submit(image=BASE, snapshot_key="k")
    started = await rig.started(job.id)
    assert started.snapshot_used is False
    assert started.container_id is not None
    assert rig.runtime.container_spec(started.container_id).image == BASE
    rig.runtime.crash(started.container_id, 0)
    await rig.final(job.id)
    await wait_until(lambda: deep.image not in rig.runtime.images, what="evicted")
    fresh = await rig.store.current_snapshot("k")
    assert fresh is not None
    assert fresh.generation == 1


async def test_job_runs_from_base_and_forgets_snapshot_when_snapshot_image_is_gone(
    rig: Rig,
) -> None:
    await _run_to_success(rig, await rig.runner.submit(image=BASE, snapshot_key="k"))
    snapshot = await rig.store.current_snapshot("k")
    assert snapshot is not None
    await rig.runtime.remove_image(snapshot.image)

    second = await rig.runner.submit(image=BASE, snapshot_key="k")
    started = await rig.started(second.id)
    assert started.snapshot_used is False
    assert started.container_id is not None
    assert rig.runtime.container_spec(started.container_id).image == BASE
    assert (await rig.store.list_snapshots()) == []


async def test_job_still_succeeds_when_snapshot_commit_fails(rig: Rig) -> None:
    rig.runtime.failures["commit"] = [errors.ContainerError("disk full")]
    done = await _run_to_success(rig, await rig.runner.submit(image=BASE, snapshot_key="k"))
    assert done.status is J.SUCCEEDED
    assert await rig.store.list_snapshots() == []


async def test_superseded_and_excess_snapshots_are_evicted_when_limits_exceeded(
    tmp_path: Path,
) -> None:
    async for rig in _rig(tmp_path, snapshot_max_count=1):
        first = await _run_to_success(rig, await rig.runner.submit(image=BASE, snapshot_key="a"))
        await rig.clock.advance(1)
        second = await _run_to_success(rig, await rig.runner.submit(image=BASE, snapshot_key="a"))
        await rig.clock.advance(1)
        await _run_to_success(rig, await rig.runner.submit(image=BASE, snapshot_key="b"))
        snapshots = await rig.store.list_snapshots()
        assert [s.key for s in snapshots] == ["b"]
        removed = [t for op, t in rig.runtime.calls if op == "remove_image"]
        repo_a = snapshot_repository("a")
        assert f"{repo_a}:{first.id}" in removed
        assert f"{repo_a}:{second.id}" in removed
        assert not await rig.runtime.image_exists(f"{repo_a}:{second.id}")


# --------------------------------------------------------------------------- shutdown


async def test_running_job_is_reattached_with_its_timeout_when_left_running(rig: Rig) -> None:
    job = await rig.started((await rig.runner.submit(image=BASE, timeout=50)).id)
    await rig.clock.advance(30)
    await rig.runner.stop(leave_running=True)
    assert job.container_id is not None
    assert (await rig.runtime.inspect(job.container_id)).running
    assert (await rig.job(job.id)).status is J.RUNNING

    rig.runner = rig.new_runner()
    await rig.runner.start()
    await wait_until(lambda: rig.clock.sleepers >= 2, what="re-armed timer")
    await rig.clock.advance(19)
    assert (await rig.job(job.id)).status is J.RUNNING
    await rig.clock.advance(2)  # 51 s after the original start
    done = await rig.final(job.id)
    assert done.status is J.TIMED_OUT
    assert done.container_id == job.container_id


async def test_exited_job_is_finalised_from_inspect_when_reattached_after_its_deadline(
    rig: Rig,
) -> None:
    job = await rig.started((await rig.runner.submit(image=BASE, timeout=50)).id)
    await rig.runner.stop(leave_running=True)
    assert job.container_id is not None
    rig.runtime.log_lines[job.container_id] = ["done while away"]
    await rig.clock.advance(10)
    rig.runtime.crash(job.container_id, 0)
    await rig.clock.advance(200)  # Roost comes back long after the deadline

    rig.runner = rig.new_runner()
    await rig.runner.start()
    done = await rig.final(job.id)
    assert done.status is J.SUCCEEDED  # it ended on its own, in time
    assert done.duration == pytest.approx(10, abs=1e-3)  # Docker's finish time
    assert done.log_tail == "done while away\n"
    assert await rig.runtime.list(labels.ownership(INSTANCE)) == []


async def test_job_without_container_is_queued_again_when_roost_restarts(rig: Rig) -> None:
    await rig.runner.stop(leave_running=True)
    job = await rig.store.insert_job(Job(id="job-stranded", image=BASE, status=J.RUNNING))
    rig.runner = rig.new_runner()
    await rig.runner.start()
    started = await rig.started(job.id)
    assert started.status is J.RUNNING
    assert started.container_id is not None


async def test_running_jobs_are_stopped_and_cancelled_when_shutdown_without_leave_running(
    rig: Rig,
) -> None:
    job = await rig.started((await rig.runner.submit(image=BASE)).id)
    await rig.runner.stop(leave_running=False)
    done = await rig.job(job.id)
    assert done.status is J.CANCELLED
    assert "shut down" in done.error
    assert await rig.runtime.list(labels.ownership(INSTANCE)) == []
    with pytest.raises(errors.StateError, match="shutting down"):
        await rig.runner.submit(image=BASE)


# --------------------------------------------------------------------------- orphans, logs


async def test_orphan_scan_removes_only_this_instances_unowned_job_containers_when_run(
    rig: Rig,
) -> None:
    live = await rig.started((await rig.runner.submit(image=BASE)).id)
    old_done = await rig.store.insert_job(
        Job(id="job-old", image=BASE, status=J.SUCCEEDED, timeout=10)
    )
    young_done = await rig.store.insert_job(
        Job(id="job-young", image=BASE, status=J.FAILED, timeout=1000)
    )

    async def make(instance: str, job_id: str) -> str:
        return await rig.runtime.create(
            ContainerSpec(
                image=BASE,
                labels={**labels.ownership(instance), labels.JOB: job_id},
            )
        )

    no_record = await make(INSTANCE, "job-unknown")
    other_instance = await make("someone-else", "job-unknown")
    old = await make(INSTANCE, old_done.id)
    await rig.clock.advance(20)
    young = await make(INSTANCE, young_done.id)

    removed = await rig.runner.scan_orphans()
    assert sorted(removed) == sorted([no_record, old])
    left = {c.id for c in await rig.runtime.list({labels.MANAGED: "true"})}
    assert left == {live.container_id, other_instance, young}


async def test_logs_are_live_and_redacted_while_running_and_stored_after(rig: Rig) -> None:
    job = await rig.runner.submit(image=BASE, env={"API_TOKEN": "supersecret"})
    started = await rig.started(job.id)
    assert started.container_id is not None
    rig.runtime.log_lines[started.container_id] = ["using supersecret now", "working"]
    assert await rig.runner.logs(job.id) == "using [redacted] now\nworking\n"
    rig.runtime.crash(started.container_id, 0)
    done = await rig.final(job.id)
    assert "supersecret" not in done.log_tail
    assert await rig.runner.logs(job.id, tail=1) == "working\n"

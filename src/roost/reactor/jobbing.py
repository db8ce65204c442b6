"""The job runner: runs queued one-shot jobs in containers, at most ``max_workers``
at a time, with hard timeouts, exit capture, snapshots and orphan cleanup.

How a job runs (one worker task per running job)::

    claim (queued → running, compare-and-set) → ensure image → create
    → record container id → start → record started_at
    → wait for: exit | timeout | stop request (cancel, shutdown)
    → on timeout/stop: record the stop reason, then stop (SIGTERM, kill_grace, SIGKILL)
    → inspect (exit code, OOM, error) and read the log tail, *before* removing
    → on success with a snapshot key: commit a scrubbed snapshot (never fails the job)
    → record the final state → remove the container

Invariants:
- FIFO and the cap: only the dispatcher claims jobs, oldest first, and only
  while fewer than ``max_workers`` workers exist. A worker is registered before
  its claim is written, so a cancel always finds it.
- The stop reason is persisted before the container is stopped, so the exit that
  follows (137 after SIGKILL) and a Roost restart in between both end the job
  ``timed_out``/``cancelled``, never ``failed`` (``core.jobs.decide_outcome``).
- The container id is persisted right after ``create`` and before ``start``: a
  container whose id was never recorded was never started by Roost.
- Re-attach: on ``start``, every job stored as ``running`` is resumed: with no
  container it is queued again (at its old FIFO position); with a running
  container its timeout is enforced from the stored ``started_at``; with an
  exited one it is finalised from ``inspect``.
- Shutdown with ``leave_running`` cancels the worker tasks only: containers keep
  running and rows stay ``running`` for the next start. Without it, running jobs
  are stopped and end ``cancelled``.
- Snapshots: a job with a snapshot key starts from its key's newest snapshot
  image; if that image is gone the record is dropped and the job runs from its
  base image instead (once). Committed images carry no secret env values.
- Secrets travel only in the container's env: never in labels (the config-hash
  label hashes env *names*), log messages, or stored log tails (redacted).
- Only this instance's labelled job containers are ever removed by the orphan
  scan (``core.jobs.plan_orphans``), and never one of a live job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from roost import errors
from roost.config import JobsConfig
from roost.core import labels
from roost.core.backoff import Backoff
from roost.core.jobs import (
    FINAL_STATUSES,
    LOG_TAIL_LINES,
    TRANSIENT_RETRY,
    ErrorKind,
    EvictionPolicy,
    JobContainer,
    JobStatus,
    SnapshotRecord,
    StopReason,
    check_transition,
    classify_error,
    decide_outcome,
    job_config_hash,
    job_labels,
    plan_eviction,
    plan_orphans,
    redact,
    reusable_snapshot,
    scrub_env,
    secret_values,
    snapshot_repository,
    validate_env_names,
    validate_extra_labels,
    validate_snapshot_key,
)
from roost.ports.clock import Clock
from roost.ports.jobs import Job, JobStore
from roost.ports.runtime import ContainerRuntime, ContainerSpec, ContainerState

__all__ = ["JobListener", "JobRunner", "new_job_id"]

log = logging.getLogger("roost.jobs")

JobListener = Callable[[Job], None]
T = TypeVar("T")

#: How long shutdown (without leave_running) waits beyond kill_grace for workers.
_SHUTDOWN_MARGIN = 10.0
#: Delay before the dispatcher retries after the store failed.
_DISPATCH_RETRY_DELAY = 1.0
#: Labels of a committed snapshot image. Commit merges the container's labels
#: into the image and cannot drop one, so these override the ones that would make
#: a container someone starts from the image look like one of Roost's.
_SNAPSHOT_IMAGE_LABELS = {labels.MANAGED: "false", labels.JOB: "", labels.SNAPSHOT: "true"}


def new_job_id() -> str:
    """``job-`` and 12 hex digits: lowercase, usable as an image tag."""
    return f"job-{secrets.token_hex(6)}"


@dataclasses.dataclass(eq=False)
class _Worker:
    """One running job's worker: its task and how to ask it to stop."""

    job_id: str
    stop_requested: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    stop_reason: StopReason | None = None
    finished: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def request_stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_requested.set()


class JobRunner:
    """Runs one-shot jobs (see the module docstring).

    ``default_memory``/``pids_limit``/``network`` apply to jobs that name none
    (None: no limit / Docker's default bridge). ``retry`` is the budget
    for transient Docker errors.
    """

    def __init__(
        self,
        *,
        store: JobStore,
        runtime: ContainerRuntime,
        clock: Clock,
        instance: str,
        config: JobsConfig,
        default_memory: int | None = 512 * 1024 * 1024,
        pids_limit: int | None = 512,
        network: str | None = None,
        retry: Backoff = TRANSIENT_RETRY,
        cap_drop: tuple[str, ...] = ("ALL",),
        cap_add: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.clock = clock
        self.instance = instance
        self.config = config
        self.default_memory = default_memory
        self.pids_limit = pids_limit
        self.network = network
        self.retry = retry
        #: job containers are hardened like agents (``[defaults]`` cap_drop/cap_add).
        self.cap_drop = cap_drop
        self.cap_add = cap_add
        self._workers: dict[str, _Worker] = {}
        #: set while no worker exists (see ``wait_idle``).
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: list[JobListener] = []
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._scanner: asyncio.Task[None] | None = None
        self._eviction_lock = asyncio.Lock()
        self._started = False
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attach to jobs left running, then start dispatching and scanning."""
        if self._started:
            return
        self._started = True
        await self._recover()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="roost.jobs.dispatch")
        self._scanner = asyncio.create_task(self._scan_loop(), name="roost.jobs.orphan-scan")
        self._wakeup.set()

    async def stop(self, *, leave_running: bool) -> None:
        """Stop dispatching. ``leave_running``: leave job containers running for the
        next start to re-attach; otherwise stop them (jobs end ``cancelled``)."""
        if self._closing:
            return
        self._closing = True
        for task in (self._dispatcher, self._scanner):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._dispatcher, self._scanner) if t is not None),
            return_exceptions=True,
        )
        workers = [w for w in self._workers.values() if w.task is not None]
        if leave_running:
            for worker in workers:
                assert worker.task is not None
                worker.task.cancel()
        else:
            for worker in workers:
                worker.request_stop(StopReason.SHUTDOWN)
        tasks = [w.task for w in workers if w.task is not None]
        if tasks:
            _, pending = await asyncio.wait(
                tasks, timeout=None if leave_running else self.config.kill_grace + _SHUTDOWN_MARGIN
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def add_listener(self, listener: JobListener) -> None:
        """``listener(job)`` is called after every persisted status change."""
        self._listeners.append(listener)

    @property
    def running(self) -> int:
        """Jobs with a worker right now."""
        return len(self._workers)

    async def wait_idle(self) -> None:
        """Return once no worker runs (every started job ended and its container
        was removed). Jobs still queued may start right after."""
        await self._idle.wait()

    def _add_worker(self, worker: _Worker) -> None:
        self._workers[worker.job_id] = worker
        self._idle.clear()

    def _drop_worker(self, worker: _Worker) -> None:
        if self._workers.get(worker.job_id) is worker:
            del self._workers[worker.job_id]
        if not self._workers:
            self._idle.set()

    # -- requests -------------------------------------------------------------------

    async def submit(
        self,
        *,
        image: str,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        memory: int | None = None,
        cpus: float | None = None,
        network: str | None = None,
        labels: Mapping[str, str] | None = None,
        project: str = "",
        snapshot_key: str | None = None,
    ) -> Job:
        """Queue a job; it runs when a worker is free (FIFO).

        ``timeout`` None: ``default_timeout``. ``memory`` None: the default limit;
        0: no limit. Raises ValueError on a bad value (naming it)."""
        if self._closing:
            raise errors.StateError("the job runner is shutting down; no new jobs")
        if not image or not image.strip():
            raise ValueError("image: must be a non-empty image reference")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout!r}")
        if snapshot_key is not None:
            validate_snapshot_key(snapshot_key)
        job = Job(
            id=new_job_id(),
            image=image.strip(),
            command=tuple(command) if command is not None else None,
            env=validate_env_names(env or {}),
            timeout=timeout if timeout is not None else self.config.default_timeout,
            memory=self.default_memory if memory is None else (memory or None),
            cpus=cpus or None,
            network=network or None,
            labels=validate_extra_labels(labels or {}),
            project=project,
            snapshot_key=snapshot_key,
            created_at=self.clock.now(),
        )
        job = await self.store.insert_job(job)
        log.info("job %s queued (image %s)", job.id, job.image)
        self._notify(job)
        self._wakeup.set()
        return job

    async def get(self, job_id: str) -> Job:
        job = await self.store.get_job(job_id)
        if job is None:
            raise errors.NotFound(f"no job {job_id!r}")
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued job, or stop a running one (SIGTERM, grace, SIGKILL) and
        wait until it has ended. StateError if it already ended."""
        job = await self.get(job_id)
        check_transition(job.id, job.status, JobStatus.CANCELLED)
        worker = self._workers.get(job_id)
        if worker is None and job.status is JobStatus.QUEUED:
            try:
                job = await self._update(
                    job,
                    status=JobStatus.CANCELLED,
                    finished_at=self.clock.now(),
                    error="cancelled on request before it started",
                )
            except errors.Conflict:
                worker = self._workers.get(job_id)  # claimed in between
            else:
                return job
        if worker is None:
            current = await self.get(job_id)
            check_transition(current.id, current.status, JobStatus.CANCELLED)
            raise errors.StateError(
                f"job {job_id} is {current.status.value} but no worker of this Roost runs it"
            )
        worker.request_stop(StopReason.CANCEL)
        await worker.finished.wait()
        return await self.get(job_id)

    async def logs(self, job_id: str, *, tail: int = LOG_TAIL_LINES) -> str:
        """Live output of a running job's container; the stored tail after it ended."""
        job = await self.get(job_id)
        if job.status is JobStatus.RUNNING and job.container_id is not None:
            with contextlib.suppress(errors.ContainerNotFound):
                text = await self.runtime.logs_tail(job.container_id, lines=tail)
                return redact(text, secret_values(job.env, self.config.secret_env))
            job = await self.get(job_id)
        lines = job.log_tail.splitlines(keepends=True)
        return "".join(lines[-tail:]) if tail > 0 else ""

    async def follow_logs(self, job_id: str, *, poll: float = 0.1) -> AsyncIterator[str]:
        """The job's output as it comes, whole lines with secrets redacted: waits while
        the job is queued, follows its container until it ends, or gives the stored
        tail of a job that already ended."""
        job = await self.get(job_id)
        while job.status is JobStatus.QUEUED or (
            job.status is JobStatus.RUNNING and job.container_id is None
        ):
            await self.clock.sleep(poll)
            job = await self.get(job_id)
        if job.status is not JobStatus.RUNNING or job.container_id is None:
            if job.log_tail:
                yield job.log_tail
            return
        secrets_ = secret_values(job.env, self.config.secret_env)
        pending = ""
        try:
            async for chunk in self.runtime.logs(job.container_id, follow=True):
                pending += chunk
                lines, _, pending = pending.rpartition("\n")
                if lines:
                    yield redact(lines + "\n", secrets_)
        except errors.ContainerNotFound:
            pass  # removed at its end: what it printed last is in the stored tail
        if pending:
            yield redact(pending, secrets_)

    # -- dispatching ----------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._fill_slots()
            except errors.RoostError as exc:
                log.warning("job dispatch failed, retrying: %s", exc)
                await self.clock.sleep(_DISPATCH_RETRY_DELAY)
                self._wakeup.set()

    async def _fill_slots(self) -> None:
        while not self._closing:
            free = self.config.max_workers - len(self._workers)
            if free <= 0:
                return
            queued = await self.store.queued_jobs(free)
            if not queued:
                return
            for job in queued:
                # Registered before the claim is written, so a cancel finds it.
                worker = _Worker(job.id)
                self._add_worker(worker)
                try:
                    claimed = await self._update(job, status=JobStatus.RUNNING)
                except errors.Conflict:
                    self._drop_worker(worker)  # cancelled in between
                    worker.finished.set()
                    continue
                except BaseException:
                    self._drop_worker(worker)
                    worker.finished.set()
                    raise
                self._spawn(worker, claimed)

    def _spawn(self, worker: _Worker, job: Job, *, exited: bool = False) -> None:
        self._add_worker(worker)
        worker.task = asyncio.create_task(
            self._work(worker, job, exited=exited), name=f"roost.job[{job.id}]"
        )

    async def _work(self, worker: _Worker, job: Job, *, exited: bool) -> None:
        """``exited``: re-attached to a container that ended while Roost was away:
        only finish it (its own exit counts, and Docker's finish time)."""
        try:
            if exited:
                await self._finish(job)
                return
            attached = job.container_id is not None
            if not attached:
                launched = await self._launch(worker, job)
                if launched is None:
                    return
                job = launched
            job, exited_at = await self._supervise(worker, job)
            # Re-attached: Docker's finish time (Roost may have missed the exit).
            await self._finish(job, exited_at=None if attached else exited_at)
        except asyncio.CancelledError:
            raise  # shutdown with leave_running: the container is left as it is
        except Exception as exc:
            log.exception("job %s: the runner failed", job.id)
            await self._abandon(job, f"Roost failed while running the job: {exc}")
        finally:
            worker.finished.set()
            self._drop_worker(worker)
            self._wakeup.set()

    # -- launching ------------------------------------------------------------------

    async def _launch(self, worker: _Worker, job: Job) -> Job | None:
        """Create and start the container; the job with its container and start time,
        or None when the job ended before a container ran."""
        snapshot = await self._retrying(lambda: self._usable_snapshot(job))
        failures = 0
        while True:
            if worker.stop_requested.is_set():
                await self._end_without_container(job, worker.stop_reason)
                return None
            image = snapshot.image if snapshot is not None else job.image
            container_id: str | None = None
            try:
                if snapshot is None:
                    await self.runtime.ensure_image(image, pull_timeout=self.config.pull_timeout)
                container_id = await self.runtime.create(
                    self._container_spec(job, image, from_snapshot=snapshot is not None)
                )
                # Recorded before start: an unrecorded container never ran (re-attach).
                job = await self._update(
                    job, container_id=container_id, snapshot_used=snapshot is not None
                )
                if not worker.stop_requested.is_set():
                    await self.runtime.start(container_id)
            except errors.RoostError as exc:
                if container_id is not None:
                    await self._remove_quietly(container_id)
                    if job.container_id is not None:
                        job = await self._update(job, container_id=None, snapshot_used=False)
                if snapshot is not None and await self._snapshot_gone(snapshot, exc):
                    log.warning(
                        "job %s: snapshot image %s is gone; forgetting it, running from %s",
                        job.id,
                        snapshot.image,
                        job.image,
                    )
                    await self.store.delete_snapshot(snapshot.image)
                    snapshot = None
                    continue
                delay = self.retry.delay(failures)
                if classify_error(exc) is ErrorKind.TRANSIENT and delay is not None:
                    failures += 1
                    log.warning("job %s: %s; retrying in %.1f s", job.id, exc, delay)
                    await self.clock.sleep(delay)
                    continue
                await self._end_without_container(
                    job, None, error=f"cannot run the job's container: {exc}"
                )
                return None
            if worker.stop_requested.is_set():  # asked to stop before it started
                await self._remove_quietly(container_id)
                await self._end_without_container(job, worker.stop_reason)
                return None
            job = await self._update(job, started_at=self.clock.now())
            log.info("job %s started in container %s", job.id, container_id[:12])
            if snapshot is not None:
                try:
                    await self.store.touch_snapshot(snapshot.image, at=self.clock.now())
                except errors.RoostError as exc:
                    log.warning("job %s: cannot record the snapshot's use: %s", job.id, exc)
            return job

    async def _usable_snapshot(self, job: Job) -> SnapshotRecord | None:
        if job.snapshot_key is None:
            return None
        snapshot = await self.store.current_snapshot(job.snapshot_key)
        if snapshot is None:
            return None
        if not reusable_snapshot(snapshot):
            log.info(
                "job %s: snapshot %s is %d commits deep; starting from %s to restart the chain",
                job.id,
                snapshot.image,
                snapshot.generation,
                job.image,
            )
            return None
        if await self.runtime.image_exists(snapshot.image):
            return snapshot
        log.warning(
            "job %s: snapshot image %s is gone; forgetting it and running from %s",
            job.id,
            snapshot.image,
            job.image,
        )
        await self.store.delete_snapshot(snapshot.image)
        return None

    async def _snapshot_gone(self, snapshot: SnapshotRecord, exc: errors.RoostError) -> bool:
        """Did ``exc`` happen because the snapshot image vanished (not the spec)?"""
        if not isinstance(exc, errors.ImageUnavailable | errors.ContainerNotFound):
            return False
        try:
            return not await self.runtime.image_exists(snapshot.image)
        except errors.RoostError:
            return False

    def _container_spec(self, job: Job, image: str, *, from_snapshot: bool) -> ContainerSpec:
        config_hash = job_config_hash(
            image=job.image,
            command=job.command,
            env_names=job.env,
            memory=job.memory,
            cpus=job.cpus,
            network=job.network,
            timeout=job.timeout,
            snapshot_key=job.snapshot_key,
        )
        return ContainerSpec(
            image=image,
            labels=job_labels(
                instance=self.instance,
                job_id=job.id,
                project=job.project,
                from_snapshot=from_snapshot,
                config_hash=config_hash,
                extra=job.labels,
            ),
            env=dict(job.env),
            command=job.command,
            network=job.network or self.network,
            memory=job.memory,
            memory_swap=None,  # = memory: no swap
            cpus=job.cpus,
            pids_limit=self.pids_limit,
            no_new_privileges=True,
            cap_drop=self.cap_drop,
            cap_add=self.cap_add,
        )

    # -- supervising ----------------------------------------------------------------

    async def _supervise(self, worker: _Worker, job: Job) -> tuple[Job, float]:
        """Wait for the container to exit, enforcing the timeout and stop requests.
        Returns the job (with its stop reason, if Roost stopped it) and when it exited."""
        container_id = job.container_id
        assert container_id is not None
        started_at = job.started_at
        if started_at is None:  # crashed between start and recording it
            started_at = self.clock.now()
            job = await self._update(job, started_at=started_at)
        remaining = max(0.0, started_at + job.timeout - self.clock.now())
        exited = asyncio.create_task(
            self._wait_exit(container_id), name=f"roost.job-wait[{job.id}]"
        )
        stop = asyncio.create_task(worker.stop_requested.wait())
        timer = asyncio.create_task(self.clock.sleep(remaining))
        try:
            if job.stop_reason is None:
                done, _ = await asyncio.wait(
                    {exited, stop, timer}, return_when=asyncio.FIRST_COMPLETED
                )
                if exited not in done:
                    reason = worker.stop_reason if stop in done else StopReason.TIMEOUT
                    job = await self._update(job, stop_reason=reason)
            if not exited.done():
                assert job.stop_reason is not None
                log.info(
                    "job %s: stopping its container (%s): SIGTERM, SIGKILL after %g s",
                    job.id,
                    job.stop_reason.value,
                    self.config.kill_grace,
                )
                await self._stop_container(container_id)
            await exited
        finally:
            for task in (exited, stop, timer):
                task.cancel()
            await asyncio.gather(exited, stop, timer, return_exceptions=True)
        return job, self.clock.now()

    async def _wait_exit(self, container_id: str) -> None:
        with contextlib.suppress(errors.ContainerNotFound):
            await self._retrying(lambda: self.runtime.wait(container_id))

    async def _stop_container(self, container_id: str) -> None:
        try:
            await self._retrying(
                lambda: self.runtime.stop(container_id, grace=self.config.kill_grace)
            )
        except errors.RoostError as exc:
            log.warning("stopping container %s failed (%s); killing it", container_id[:12], exc)
            with contextlib.suppress(errors.RoostError):
                await self.runtime.kill(container_id)

    # -- finishing ------------------------------------------------------------------

    async def _finish(self, job: Job, *, exited_at: float | None = None) -> Job:
        """Inspect and read logs (before removing), snapshot, record, remove."""
        container_id = job.container_id
        assert container_id is not None
        state: ContainerState | None = None
        log_tail = ""
        with contextlib.suppress(errors.ContainerNotFound):
            state = await self._retrying(lambda: self.runtime.inspect(container_id))
        if state is not None:
            try:
                raw = await self.runtime.logs_tail(container_id, lines=LOG_TAIL_LINES)
                log_tail = redact(raw, secret_values(job.env, self.config.secret_env))
            except errors.RoostError as exc:
                log.warning("job %s: cannot read its logs: %s", job.id, exc)
        exit_info = state.exit if state is not None else None
        outcome = decide_outcome(
            exit_code=exit_info.exit_code if exit_info is not None else None,
            oom_killed=exit_info.oom_killed if exit_info is not None else False,
            docker_error=exit_info.error if exit_info is not None else "",
            stop_reason=job.stop_reason,
            timeout=job.timeout,
            kill_grace=self.config.kill_grace,
            memory=job.memory,
        )
        if exited_at is None:
            exited_at = _docker_time(exit_info.finished_at if exit_info else None)
        if exited_at is None:
            exited_at = self.clock.now()
        snapshotted = False
        if outcome.status is JobStatus.SUCCEEDED and job.snapshot_key and state is not None:
            snapshotted = await self._take_snapshot(job, state)
        job = await self._update(
            job,
            status=outcome.status,
            error=outcome.error,
            exit_code=exit_info.exit_code if exit_info is not None else None,
            oom_killed=exit_info.oom_killed if exit_info is not None else False,
            finished_at=exited_at,
            log_tail=log_tail,
        )
        log.info("job %s %s%s", job.id, job.status.value, f": {job.error}" if job.error else "")
        await self._remove_quietly(container_id)
        if snapshotted:
            # After the removal: Docker refuses to remove an image a container
            # (even an exited one) was created from, e.g. the superseded snapshot.
            try:
                await self.evict_snapshots()
            except errors.RoostError as exc:
                log.warning("snapshot eviction failed: %s", exc)
        return job

    async def _take_snapshot(self, job: Job, state: ContainerState) -> bool:
        """Commit the container as the key's new snapshot; True if it was recorded.
        Never raises: a failed snapshot is logged and the job still succeeds."""
        assert job.snapshot_key is not None
        assert job.container_id is not None
        repository = snapshot_repository(job.snapshot_key)
        image = f"{repository}:{job.id}"
        try:
            await self.runtime.commit(
                job.container_id,
                repository=repository,
                tag=job.id,
                labels=_SNAPSHOT_IMAGE_LABELS,
                env=scrub_env(state.env, self.config.secret_env),
            )
            size = await self.runtime.image_size(image)
            now = self.clock.now()
            # An over-estimate when jobs of one key overlap, which is the safe side.
            previous = await self.store.current_snapshot(job.snapshot_key)
            generation = 1
            if job.snapshot_used and previous is not None:
                generation = previous.generation + 1
            await self.store.put_snapshot(
                SnapshotRecord(
                    key=job.snapshot_key,
                    image=image,
                    job_id=job.id,
                    size=size,
                    created_at=now,
                    last_used_at=now,
                    generation=generation,
                )
            )
            log.info("job %s: snapshot %s committed (%d bytes)", job.id, image, size)
        except errors.RoostError as exc:
            log.warning("job %s: snapshot failed (the job still succeeded): %s", job.id, exc)
            return False
        return True

    async def _end_without_container(
        self, job: Job, reason: StopReason | None, *, error: str = ""
    ) -> Job:
        """End a job that has no container (any more): stopped on request before it
        ran, or it could not be started."""
        if reason is not None:
            outcome = decide_outcome(
                exit_code=None,
                oom_killed=False,
                docker_error="",
                stop_reason=reason,
                timeout=job.timeout,
                kill_grace=self.config.kill_grace,
                memory=job.memory,
            )
            status, error = outcome.status, outcome.error
        else:
            status = JobStatus.FAILED
        log.info("job %s %s: %s", job.id, status.value, error)
        return await self._update(
            job,
            status=status,
            error=error,
            stop_reason=reason,
            container_id=None,
            finished_at=self.clock.now(),
        )

    async def _abandon(self, job: Job, error: str) -> None:
        """After an unexpected failure: end the job ``failed`` and remove its container."""
        with contextlib.suppress(Exception):
            current = await self.store.get_job(job.id)
            if current is None or current.status in FINAL_STATUSES:
                return
            if current.container_id is not None:
                await self._remove_quietly(current.container_id)
            await self._update(
                current, status=JobStatus.FAILED, error=error, finished_at=self.clock.now()
            )

    # -- re-attach ------------------------------------------------------------------

    async def _recover(self) -> None:
        """Resume every job stored as running (see the module docstring)."""
        stranded = await self.store.list_jobs(statuses=[JobStatus.RUNNING], limit=1_000_000)
        for job in sorted(stranded, key=lambda j: j.seq):
            state: ContainerState | None = None
            if job.container_id is not None:
                with contextlib.suppress(errors.ContainerNotFound):
                    state = await self.runtime.inspect(job.container_id)
            if state is None or state.status == "created":
                # Never (knowingly) started: remove any container of it and run it again.
                for container in await self.runtime.list(
                    {**labels.ownership(self.instance), labels.JOB: job.id}
                ):
                    await self._remove_quietly(container.id)
                if job.container_id is not None and state is None and job.started_at is not None:
                    await self._end_lost(job)
                    continue
                log.info("job %s: never started before the restart; queued again", job.id)
                await self._update(
                    job,
                    status=JobStatus.QUEUED,
                    container_id=None,
                    snapshot_used=False,
                    started_at=None,
                    stop_reason=None,
                )
                continue
            log.info(
                "job %s: re-attached to container %s (%s)",
                job.id,
                state.id[:12],
                state.status,
            )
            self._spawn(_Worker(job.id), job, exited=not state.running)

    async def _end_lost(self, job: Job) -> None:
        """A job that had started, whose container vanished while Roost was away."""
        outcome = decide_outcome(
            exit_code=None,
            oom_killed=False,
            docker_error="",
            stop_reason=job.stop_reason,
            timeout=job.timeout,
            kill_grace=self.config.kill_grace,
            memory=job.memory,
        )
        await self._update(
            job,
            status=outcome.status,
            error=outcome.error,
            finished_at=self.clock.now(),
        )

    # -- orphans and eviction -------------------------------------------------------

    async def _scan_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.orphan_scan_interval)
            try:
                await self.scan_orphans()
                await self.evict_snapshots()
            except errors.DockerUnavailable as exc:
                # The engine's outage is announced once (reactor.health, from the
                # event stream); a line per scan would repeat it every interval.
                log.debug("job orphan scan skipped: %s", exc)
            except errors.RoostError as exc:
                log.warning("job orphan scan failed: %s", exc)

    async def scan_orphans(self) -> list[str]:
        """Remove this instance's job containers that no live job owns and that are
        older than their job's timeout (or have no job at all). Returns their ids."""
        containers = [
            JobContainer(c.id, c.labels[labels.JOB], c.created_at)
            for c in await self.runtime.list(labels.ownership(self.instance))
            if c.labels.get(labels.JOB)
        ]
        timeouts: dict[str, float] = {}
        for job_id in {c.job_id for c in containers}:
            job = await self.store.get_job(job_id)
            if job is not None:
                timeouts[job_id] = job.timeout
        live = set(self._workers)
        orphans = plan_orphans(containers, timeouts=timeouts, live_jobs=live, now=self.clock.now())
        for container_id in orphans:
            log.info("removing orphan job container %s", container_id[:12])
            await self._remove_quietly(container_id)
        return list(orphans)

    async def evict_snapshots(self) -> list[str]:
        """Remove superseded, expired and excess snapshot images; returns their names.
        An image Docker refuses to remove (a container still uses it) keeps its
        record and is tried again next time."""
        async with self._eviction_lock:
            snapshots = await self.store.list_snapshots()
            plan = plan_eviction(
                snapshots,
                now=self.clock.now(),
                policy=EvictionPolicy(
                    ttl=self.config.snapshot_ttl,
                    max_count=self.config.snapshot_max_count,
                    max_bytes=self.config.snapshot_max_bytes,
                ),
            )
            removed: list[str] = []
            for snapshot in plan:
                try:
                    await self.runtime.remove_image(snapshot.image)
                except errors.ContainerError as exc:
                    log.info("snapshot %s not removed yet: %s", snapshot.image, exc)
                    continue
                await self.store.delete_snapshot(snapshot.image)
                removed.append(snapshot.image)
            return removed

    # -- helpers --------------------------------------------------------------------

    async def _update(self, job: Job, **changes: Any) -> Job:
        """Persist ``job`` with ``changes``, compare-and-set on ``job.status`` (the
        status it had when read); tell listeners when the status changed."""
        updated = job.replace(**changes)
        if updated.status is not job.status:
            check_transition(job.id, job.status, updated.status)
        stored = await self._retrying(lambda: self.store.update_job(updated, expected=job.status))
        if stored.status is not job.status:
            self._notify(stored)
        return stored

    def _notify(self, job: Job) -> None:
        for listener in self._listeners:
            try:
                listener(job)
            except Exception:
                log.exception("job listener failed")

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation``, retrying transient errors within the budget."""
        failures = 0
        while True:
            try:
                return await operation()
            except errors.RoostError as exc:
                delay = self.retry.delay(failures)
                if classify_error(exc) is not ErrorKind.TRANSIENT or delay is None:
                    raise
                failures += 1
                log.warning("transient error (%s); retrying in %.1f s", exc, delay)
                await self.clock.sleep(delay)

    async def _remove_quietly(self, container_id: str) -> None:
        try:
            await self._retrying(lambda: self.runtime.remove(container_id, force=True))
        except errors.RoostError as exc:
            log.warning(
                "cannot remove job container %s (the orphan scan will): %s",
                container_id[:12],
                exc,
            )


def _docker_time(text: str | None) -> float | None:
    """Seconds since the epoch from Docker's RFC 3339 time (nanoseconds allowed)."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None

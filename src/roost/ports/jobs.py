"""The job store port, and the ``Job`` record it keeps.

Invariants every implementation keeps:
- Jobs are dequeued in submission order: ``queued_jobs`` returns the oldest
  queued jobs first (FIFO by ``seq``, which the store assigns on insert).
- ``update_job`` is compare-and-set on ``status``: it writes only while the
  stored status equals ``expected``, and raises ``Conflict`` (changing nothing)
  when another writer moved the job first, ``NotFound`` when there is no such job.
- ``Job.to_json`` never contains ``env``: environment values may be secrets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from roost.core.jobs import JobStatus, SnapshotRecord, StopReason

__all__ = ["Job", "JobStore", "SnapshotRecord"]


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One one-shot container run: what to run, and what happened."""

    id: str
    image: str
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: hard limit in seconds from the container's start.
    timeout: float = 3600.0
    #: bytes; None: no limit. Swap always equals memory (no swap).
    memory: int | None = None
    cpus: float | None = None
    network: str | None = None
    #: the user's extra container labels (never in the ``roost.`` namespace).
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    project: str = ""
    snapshot_key: str | None = None
    status: JobStatus = JobStatus.QUEUED
    #: the job started from its key's snapshot image (not the base image).
    snapshot_used: bool = False
    container_id: str | None = None
    #: why Roost stopped the container, recorded before stopping it.
    stop_reason: StopReason | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    log_tail: str = ""
    #: FIFO position, assigned by the store.
    seq: int = 0

    def replace(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    def to_json(self) -> dict[str, Any]:
        """The job as the API shows it (contract fields first). No env."""
        return {
            "id": self.id,
            "status": self.status.value,
            "image": self.image,
            "command": list(self.command) if self.command is not None else None,
            "project": self.project,
            "snapshot_key": self.snapshot_key,
            "snapshot_used": self.snapshot_used,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration": self.duration,
            "exit_code": self.exit_code,
            "oom_killed": self.oom_killed,
            "error": self.error or None,
            "log_tail": self.log_tail,
            "container_id": self.container_id,
            "timeout": self.timeout,
            "memory": self.memory,
            "cpus": self.cpus,
            "network": self.network,
            "labels": dict(self.labels),
            "env_names": sorted(self.env),
        }


class JobStore(Protocol):
    async def insert_job(self, job: Job) -> Job:
        """Store a new job; return it with ``seq`` assigned. Conflict if the id exists."""
        ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def list_jobs(
        self,
        *,
        statuses: Collection[JobStatus] = (),
        project: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Newest first; empty ``statuses`` means any."""
        ...

    async def queued_jobs(self, limit: int) -> list[Job]:
        """The ``limit`` oldest queued jobs, oldest first."""
        ...

    async def update_job(self, job: Job, *, expected: JobStatus) -> Job:
        """Write every field of ``job`` if the stored status is ``expected``."""
        ...

    async def put_snapshot(self, snapshot: SnapshotRecord) -> None:
        """Insert or replace the record of ``snapshot.image``."""
        ...

    async def current_snapshot(self, key: str) -> SnapshotRecord | None:
        """The newest snapshot of ``key`` (by ``created_at``, then recording order)."""
        ...

    async def list_snapshots(self) -> list[SnapshotRecord]:
        """Oldest first (by ``created_at``, then recording order)."""
        ...

    async def touch_snapshot(self, image: str, *, at: float) -> None:
        """Record that a job started from ``image``."""
        ...

    async def delete_snapshot(self, image: str) -> bool:
        """Forget ``image``; False if there was no record."""
        ...

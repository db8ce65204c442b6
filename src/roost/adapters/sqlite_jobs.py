"""``SqliteJobStore``: the ``JobStore`` port (jobs and snapshots) on Roost's ``Database``.

Role: the durable job queue and the snapshot records. A repository on
``roost.adapters.sqlite_database.Database``'s public methods (schema step 3,
"jobs and snapshots"): every write is one write of its group-commit writer
(committed whole, in order, or not at all), every read sees the last committed
state.

Invariants:
- FIFO: ``seq`` is an ``AUTOINCREMENT`` key, so it only grows, even after
  deletes; ``queued_jobs`` orders by it.
- ``insert_job`` refuses a taken id (``Conflict``) through the unique index.
- ``update_job`` is compare-and-set on ``status`` (``WHERE id = ? AND status = ?``),
  with the refusal (``Conflict`` / ``NotFound``) decided in the same write.
- Once a job is final its stored env keeps the variable names but not the
  values of secret ones (Roost needs them only to start the container), so
  the database does not hold secrets of jobs that are over.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final

from roost.adapters.sqlite_database import Database
from roost.core.jobs import FINAL_STATUSES, JobStatus, SnapshotRecord, StopReason, is_secret_name
from roost.errors import Conflict, NotFound
from roost.ports.jobs import Job

__all__ = ["SqliteJobStore"]

_JOB_COLUMNS: Final = (
    "seq, id, status, image, command, env, timeout, memory, cpus, network, labels, project, "
    "snapshot_key, snapshot_used, container_id, stop_reason, created_at, started_at, "
    "finished_at, exit_code, oom_killed, error, log_tail"
)
_SNAPSHOT_COLUMNS: Final = "key, image, job_id, size, created_at, last_used_at, generation"
_UPDATE_JOB: Final = (
    "UPDATE jobs SET "
    + ", ".join(f"{column} = ?" for column in _JOB_COLUMNS.split(", ")[2:])
    + ", updated_at = ? WHERE id = ? AND status = ?"
)


class SqliteJobStore:
    """Jobs and snapshots in ``database`` (which its owner opens and closes).

    ``secret_env``: extra variable names treated as secret when a job ends (see
    ``roost.core.jobs.is_secret_name``). ``wall_clock`` stamps ``updated_at``.
    """

    def __init__(
        self,
        database: Database,
        *,
        secret_env: Collection[str] = (),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = database
        self._secret_env = tuple(secret_env)
        self._wall_clock = wall_clock

    # -- jobs ------------------------------------------------------------------------

    async def insert_job(self, job: Job) -> Job:
        values = _job_values(job, self._secret_env)
        rows = await self._db.execute_returning(
            "insert job",
            f"INSERT INTO jobs ({_JOB_COLUMNS.removeprefix('seq, ')}, updated_at) "
            f"VALUES ({', '.join('?' * (len(values) + 1))}) ON CONFLICT (id) DO NOTHING "
            "RETURNING seq",
            (*values, self._wall_clock()),
        )
        if not rows:
            raise Conflict(f"job {job.id!r} already exists")
        return job.replace(seq=int(rows[0][0]))

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._db.fetch_one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row is not None else None

    async def list_jobs(
        self,
        *,
        statuses: Collection[JobStatus] = (),
        project: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        where: list[str] = []
        parameters: list[Any] = []
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            parameters.extend(status.value for status in statuses)
        if project is not None:
            where.append("project = ?")
            parameters.append(project)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self._db.fetch_all(
            f"SELECT {_JOB_COLUMNS} FROM jobs {clause}ORDER BY seq DESC LIMIT ?",
            (*parameters, max(limit, 0)),
        )
        return [_job(row) for row in rows]

    async def queued_jobs(self, limit: int) -> list[Job]:
        rows = await self._db.fetch_all(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = ? ORDER BY seq LIMIT ?",
            (JobStatus.QUEUED.value, max(limit, 0)),
        )
        return [_job(row) for row in rows]

    async def update_job(self, job: Job, *, expected: JobStatus) -> Job:
        values = (
            *_job_values(job, self._secret_env)[1:],
            self._wall_clock(),
            job.id,
            expected.value,
        )

        def compare_and_set(db: sqlite3.Connection) -> None:  # on the writer thread
            if db.execute(_UPDATE_JOB, values).rowcount == 0:
                row = db.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone()
                if row is None:
                    raise NotFound(f"no job {job.id!r}")
                raise Conflict(
                    f"job {job.id} changed underneath this write: it is {row[0]}, "
                    f"the write expected {expected.value}"
                )

        await self._db.write("update job", compare_and_set)
        return job

    # -- snapshots -------------------------------------------------------------------

    async def put_snapshot(self, snapshot: SnapshotRecord) -> None:
        await self._db.execute(
            "record snapshot",
            f"INSERT OR REPLACE INTO snapshots ({_SNAPSHOT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                snapshot.key,
                snapshot.image,
                snapshot.job_id,
                snapshot.size,
                snapshot.created_at,
                snapshot.last_used_at,
                snapshot.generation,
            ),
        )

    async def current_snapshot(self, key: str) -> SnapshotRecord | None:
        row = await self._db.fetch_one(
            f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE key = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (key,),
        )
        return _snapshot(row) if row is not None else None

    async def list_snapshots(self) -> list[SnapshotRecord]:
        rows = await self._db.fetch_all(
            f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots ORDER BY created_at, rowid"
        )
        return [_snapshot(row) for row in rows]

    async def touch_snapshot(self, image: str, *, at: float) -> None:
        await self._db.execute(
            "touch snapshot", "UPDATE snapshots SET last_used_at = ? WHERE image = ?", (at, image)
        )

    async def delete_snapshot(self, image: str) -> bool:
        rows = await self._db.execute_returning(
            "forget snapshot", "DELETE FROM snapshots WHERE image = ? RETURNING image", (image,)
        )
        return bool(rows)


def _job_values(job: Job, secret_env: Sequence[str]) -> tuple[Any, ...]:
    """Column values in ``_JOB_COLUMNS`` order without ``seq``."""
    env = dict(job.env)
    if job.status in FINAL_STATUSES:
        env = {name: "" if is_secret_name(name, secret_env) else v for name, v in env.items()}
    return (
        job.id,
        job.status.value,
        job.image,
        json.dumps(list(job.command)) if job.command is not None else None,
        json.dumps(env),
        job.timeout,
        job.memory,
        job.cpus,
        job.network,
        json.dumps(dict(job.labels)),
        job.project,
        job.snapshot_key,
        int(job.snapshot_used),
        job.container_id,
        job.stop_reason.value if job.stop_reason is not None else None,
        job.created_at,
        job.started_at,
        job.finished_at,
        job.exit_code,
        int(job.oom_killed),
        job.error,
        job.log_tail,
    )


def _job(row: Sequence[Any]) -> Job:
    (
        seq,
        job_id,
        status,
        image,
        command,
        env,
        timeout,
        memory,
        cpus,
        network,
        labels,
        project,
        snapshot_key,
        snapshot_used,
        container_id,
        stop_reason,
        created_at,
        started_at,
        finished_at,
        exit_code,
        oom_killed,
        error,
        log_tail,
    ) = tuple(row)
    return Job(
        id=job_id,
        image=image,
        command=tuple(json.loads(command)) if command is not None else None,
        env=json.loads(env),
        timeout=timeout,
        memory=memory,
        cpus=cpus,
        network=network,
        labels=json.loads(labels),
        project=project,
        snapshot_key=snapshot_key,
        status=JobStatus(status),
        snapshot_used=bool(snapshot_used),
        container_id=container_id,
        stop_reason=StopReason(stop_reason) if stop_reason is not None else None,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        exit_code=exit_code,
        oom_killed=bool(oom_killed),
        error=error,
        log_tail=log_tail,
        seq=seq,
    )


def _snapshot(row: Sequence[Any]) -> SnapshotRecord:
    key, image, job_id, size, created_at, last_used_at, generation = tuple(row)
    return SnapshotRecord(
        key=key,
        image=image,
        job_id=job_id,
        size=size,
        created_at=created_at,
        last_used_at=last_used_at,
        generation=generation,
    )

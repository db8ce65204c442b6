"""``SqliteStore``: the ``Store`` port on one SQLite file, through aiosqlite.

Role: durable intent and history. Docker is the truth about what runs; this
file is the truth about what Roost meant to happen and why.

Invariants:
- Every write of this class is one ``BEGIN IMMEDIATE … COMMIT`` transaction on
  its writer connection, serialised by an ``asyncio.Lock`` (the inbox writes the
  same file through a connection of its own; SQLite's write lock and
  ``busy_timeout`` serialise the two); a write
  that fails (Conflict, NotFound, SQLite error, cancellation) is rolled back,
  so nothing already stored is lost or half-changed.
- ``update_agent`` is compare-and-set on ``version``: ``UPDATE … WHERE name=?
  AND version=?``; the history rows of the same change commit in the same
  transaction; the stored and returned version is the base version + 1.
- Reads go through a second, ``query_only`` connection. In WAL mode it reads
  the last committed snapshot without waiting for the writer and can never see
  a write that is still in flight (or about to be rolled back).
- Durability: ``journal_mode=WAL`` with ``synchronous=NORMAL``. A transaction
  is appended to the WAL file with ``write()`` before ``COMMIT`` returns, so it
  lives in the kernel's page cache and survives the Roost process being
  SIGKILLed at any instant after that; only an OS crash or power loss can drop
  the last few commits (never corrupting the file), because the WAL is fsynced
  at checkpoints rather than at every commit. That trade is SQLite's
  recommended setting for WAL and costs no fsync per state change.
- Schema versions live in ``PRAGMA user_version``; ``MIGRATIONS`` is an
  ordered tuple whose step *n* takes the schema from version *n-1* to *n*,
  each applied in its own transaction together with the new ``user_version``.
  A database written by a newer Roost is refused (``StoreError`` naming both
  versions) rather than misread.
- Every ``sqlite3.Error`` is translated to ``StoreError`` (naming the file)
  with ``raise … from exc``; CAS losses are ``Conflict``, missing agents
  ``NotFound``.
- ``update_spec`` does not bump ``version``: the spec is not part of the
  ``AgentRecord`` the supervisor compares and sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

import aiosqlite

from roost.core.records import AgentRecord, ExitInfo, StateChange
from roost.core.states import AgentState
from roost.errors import Conflict, NotFound, StoreError
from roost.ports.store import HistoryEntry, StoredAgent

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "SqliteStore"]

#: ``PRAGMA application_id`` of a Roost database ("Rost" in ASCII): lets us
#: refuse some other program's SQLite file instead of adding tables to it.
ROOST_APPLICATION_ID: Final = 0x526F7374
#: How long a statement waits for another connection's lock before failing.
BUSY_TIMEOUT: Final = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One schema step. Step at index *i* of ``MIGRATIONS`` produces version *i+1*."""

    description: str
    statements: tuple[str, ...]


#: Append-only. Never edit a step that has shipped; add the next one as the last
#: entry (its index + 1 is the version it produces).
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        "agents and their state history",
        (
            """
            CREATE TABLE agents (
                name              TEXT    NOT NULL PRIMARY KEY,
                state             TEXT    NOT NULL,
                container_id      TEXT,
                url               TEXT,
                config_hash       TEXT    NOT NULL DEFAULT '',
                restart_count     INTEGER NOT NULL DEFAULT 0,
                last_exit         TEXT,             -- JSON: ExitInfo.to_json() + log_tail
                last_error        TEXT    NOT NULL DEFAULT '',
                last_activity_at  REAL,
                state_since       REAL    NOT NULL DEFAULT 0,
                running_since     REAL,
                restart_at        REAL,
                expected_exit     INTEGER NOT NULL DEFAULT 0,
                liveness_failures INTEGER NOT NULL DEFAULT 0,
                version           INTEGER NOT NULL,
                spec              TEXT    NOT NULL, -- JSON object, as given
                source            TEXT    NOT NULL,
                created_at        REAL    NOT NULL,
                updated_at        REAL    NOT NULL
            ) STRICT
            """,
            """
            CREATE TABLE agent_history (
                seq        INTEGER PRIMARY KEY AUTOINCREMENT,
                agent      TEXT    NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
                from_state TEXT    NOT NULL,
                to_state   TEXT    NOT NULL,
                reason     TEXT    NOT NULL,
                at         REAL    NOT NULL
            ) STRICT
            """,
            "CREATE INDEX agent_history_by_agent ON agent_history (agent, seq)",
        ),
    ),
    # Step 2 (version 2): the durable inbox. Owned by roost.adapters.sqlite_inbox.
    Migration(
        "messages: durable inbox",
        (
            # seq is the rowid: acceptance order, assigned by the one writer.
            # No foreign key to agents: messages outlive a deleted agent (kept, listed).
            """
            CREATE TABLE messages (
                seq             INTEGER PRIMARY KEY,
                id              TEXT    NOT NULL UNIQUE,
                agent           TEXT    NOT NULL,
                body            TEXT    NOT NULL, -- JSON value
                status          TEXT    NOT NULL,
                attempts        INTEGER NOT NULL DEFAULT 0,
                reply           TEXT,             -- JSON value
                error           TEXT    NOT NULL DEFAULT '',
                idempotency_key TEXT,
                created_at      REAL    NOT NULL,
                updated_at      REAL    NOT NULL,
                next_attempt_at REAL,
                delivered_at    REAL
            ) STRICT
            """,
            # NULL keys are distinct in a UNIQUE index: only given keys are unique.
            "CREATE UNIQUE INDEX messages_by_key ON messages (agent, idempotency_key)",
            "CREATE INDEX messages_by_status ON messages (agent, status, seq)",
        ),
    ),
    # Step 3 (version 3): one-shot jobs and snapshots. Owned by roost.adapters.sqlite_jobs.
    Migration(
        "jobs and snapshots",
        (
            """
            CREATE TABLE jobs (
                seq           INTEGER PRIMARY KEY AUTOINCREMENT,  -- FIFO order
                id            TEXT    NOT NULL UNIQUE,
                status        TEXT    NOT NULL,
                image         TEXT    NOT NULL,
                command       TEXT,             -- JSON list, or NULL: the image's own
                env           TEXT    NOT NULL, -- JSON object; secrets blanked once final
                timeout       REAL    NOT NULL,
                memory        INTEGER,
                cpus          REAL,
                network       TEXT,
                labels        TEXT    NOT NULL, -- JSON object: the user's extra labels
                project       TEXT    NOT NULL DEFAULT '',
                snapshot_key  TEXT,
                snapshot_used INTEGER NOT NULL DEFAULT 0,
                container_id  TEXT,
                stop_reason   TEXT,             -- why Roost stopped it: timeout/cancel/shutdown
                created_at    REAL    NOT NULL,
                started_at    REAL,
                finished_at   REAL,
                exit_code     INTEGER,
                oom_killed    INTEGER NOT NULL DEFAULT 0,
                error         TEXT    NOT NULL DEFAULT '',
                log_tail      TEXT    NOT NULL DEFAULT '',
                updated_at    REAL    NOT NULL
            ) STRICT
            """,
            "CREATE INDEX jobs_by_status ON jobs (status, seq)",
            "CREATE INDEX jobs_by_project ON jobs (project, seq)",
            """
            CREATE TABLE snapshots (
                image        TEXT NOT NULL PRIMARY KEY,  -- repository:tag
                key          TEXT NOT NULL,
                job_id       TEXT NOT NULL,
                size         INTEGER NOT NULL,
                created_at   REAL NOT NULL,
                last_used_at REAL NOT NULL,
                generation   INTEGER NOT NULL DEFAULT 1  -- commits in its layer chain
            ) STRICT
            """,
            "CREATE INDEX snapshots_by_key ON snapshots (key, created_at)",
        ),
    ),
)

#: The schema version this code writes and understands.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_AGENT_COLUMNS: Final = (
    "name, state, container_id, url, config_hash, restart_count, last_exit, last_error, "
    "last_activity_at, state_since, running_since, restart_at, expected_exit, "
    "liveness_failures, version, spec, source"
)


class SqliteStore:
    """The ``Store`` port on the SQLite file at ``path`` (see the module docstring).

    ``wall_clock`` stamps ``created_at``/``updated_at`` (seconds since the epoch);
    pass ``clock.now`` to run on fake time.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.path = pathlib.Path(path)
        self._wall_clock = wall_clock
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Open both connections and migrate the schema. Idempotent."""
        async with self._write_lock:
            if self._writer is not None:
                return
            opened: list[aiosqlite.Connection] = []
            try:
                writer = await self._connect()
                opened.append(writer)
                await self._configure_writer(writer)
                await self._migrate(writer)
                reader = await self._connect()
                opened.append(reader)
                await reader.execute("PRAGMA query_only = ON")
            except BaseException as exc:
                for connection in reversed(opened):
                    await _close_quietly(connection)
                if isinstance(exc, sqlite3.Error):
                    raise self._error("cannot open", exc) from exc
                raise
            self._writer, self._reader = writer, reader

    async def close(self) -> None:
        """Close both connections. Idempotent; waits for a write in flight."""
        async with self._write_lock:
            writer, reader = self._writer, self._reader
            self._writer = self._reader = None
        for connection in (reader, writer):
            if connection is not None:
                await _close_quietly(connection)

    async def schema_version(self) -> int:
        """The ``user_version`` of the open database."""
        rows = await self._read("PRAGMA user_version", ())
        return int(rows[0][0])

    # -- reads -----------------------------------------------------------------------

    async def get_agent(self, name: str) -> StoredAgent | None:
        rows = await self._read(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE name = ?", (name,))
        return _stored_agent(rows[0]) if rows else None

    async def list_agents(self) -> list[StoredAgent]:
        rows = await self._read(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY name", ())
        return [_stored_agent(row) for row in rows]

    async def history(self, name: str, *, limit: int = 100) -> list[HistoryEntry]:
        """The newest ``limit`` entries, newest last."""
        rows = await self._read(
            "SELECT seq, agent, from_state, to_state, reason, at FROM agent_history "
            "WHERE agent = ? ORDER BY seq DESC LIMIT ?",
            (name, max(limit, 0)),
        )
        return [
            HistoryEntry(
                agent=row[1],
                change=StateChange(
                    from_state=AgentState(row[2]),
                    to_state=AgentState(row[3]),
                    reason=row[4],
                    at=row[5],
                ),
                seq=row[0],
            )
            for row in reversed(rows)
        ]

    # -- writes ----------------------------------------------------------------------

    async def insert_agent(
        self, record: AgentRecord, spec: dict[str, Any], *, source: str = "config"
    ) -> AgentRecord:
        """Insert a new agent at version 1; ``Conflict`` if the name is taken."""
        stored = record.replace(version=1)
        now = self._wall_clock()
        values = (*_record_values(stored), json.dumps(spec), source, now, now)
        async with self._transaction("insert agent") as db:
            cursor = await db.execute(
                f"INSERT INTO agents ({_AGENT_COLUMNS}, created_at, updated_at) "
                f"VALUES ({', '.join('?' * len(values))}) ON CONFLICT (name) DO NOTHING",
                values,
            )
            if cursor.rowcount == 0:
                raise Conflict(f"agent {record.name!r} already exists")
        return stored

    async def update_agent(
        self, record: AgentRecord, *, changes: Sequence[StateChange] = ()
    ) -> AgentRecord:
        """Compare-and-set ``record`` against its ``version``; append ``changes``."""
        base_version = record.version
        stored = record.replace(version=base_version + 1)
        async with self._transaction("update agent") as db:
            cursor = await db.execute(
                "UPDATE agents SET state = ?, container_id = ?, url = ?, config_hash = ?, "
                "restart_count = ?, last_exit = ?, last_error = ?, last_activity_at = ?, "
                "state_since = ?, running_since = ?, restart_at = ?, expected_exit = ?, "
                "liveness_failures = ?, version = ?, updated_at = ? "
                "WHERE name = ? AND version = ?",
                (
                    *_record_values(stored)[1:],
                    self._wall_clock(),
                    record.name,
                    base_version,
                ),
            )
            if cursor.rowcount == 0:
                current = await db.execute_fetchall(
                    "SELECT version FROM agents WHERE name = ?", (record.name,)
                )
                rows = list(current)
                if not rows:
                    raise NotFound(f"agent {record.name!r} does not exist")
                raise Conflict(
                    f"agent {record.name!r} changed underneath this write: stored version "
                    f"{rows[0][0]}, write based on version {base_version}"
                )
            if changes:
                await db.executemany(
                    "INSERT INTO agent_history (agent, from_state, to_state, reason, at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            record.name,
                            change.from_state.value,
                            change.to_state.value,
                            change.reason,
                            change.at,
                        )
                        for change in changes
                    ],
                )
        return stored

    async def update_spec(self, name: str, spec: dict[str, Any], *, source: str) -> None:
        """Replace the spec and source; ``NotFound`` if the agent does not exist."""
        async with self._transaction("update spec") as db:
            cursor = await db.execute(
                "UPDATE agents SET spec = ?, source = ?, updated_at = ? WHERE name = ?",
                (json.dumps(spec), source, self._wall_clock(), name),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"agent {name!r} does not exist")

    async def delete_agent(self, name: str) -> bool:
        """Delete the agent and (by cascade) its history; False if it did not exist."""
        async with self._transaction("delete agent") as db:
            cursor = await db.execute("DELETE FROM agents WHERE name = ?", (name,))
            return cursor.rowcount > 0

    # -- internals -------------------------------------------------------------------

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: no implicit BEGINs; every transaction here is explicit.
        connection = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            await connection.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            await _close_quietly(connection)
            raise
        return connection

    async def _configure_writer(self, writer: aiosqlite.Connection) -> None:
        try:
            # The first real read of the file: a non-SQLite file fails here.
            rows = list(await writer.execute_fetchall("PRAGMA application_id"))
            application_id = int(rows[0][0])
            if application_id not in (0, ROOST_APPLICATION_ID):
                raise StoreError(
                    f"state database {self.path} belongs to another program "
                    f"(application_id {application_id:#x}); refusing to touch it"
                )
            rows = list(await writer.execute_fetchall("PRAGMA journal_mode = WAL"))
            if str(rows[0][0]).lower() != "wal":
                raise StoreError(
                    f"state database {self.path} cannot use WAL journaling "
                    f"(got {rows[0][0]!r}); it must be a file on a local filesystem"
                )
            await writer.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise self._error("is not a usable SQLite database", exc) from exc

    async def _migrate(self, writer: aiosqlite.Connection) -> None:
        """Apply every missing step of ``MIGRATIONS``, one transaction each."""
        while True:
            try:
                try:
                    await writer.execute("BEGIN IMMEDIATE")
                    # Read inside the write lock: another opener may have migrated.
                    rows = list(await writer.execute_fetchall("PRAGMA user_version"))
                    version = int(rows[0][0])
                    if version > SCHEMA_VERSION:
                        raise StoreError(
                            f"state database {self.path} has schema version {version}, "
                            f"newer than this Roost understands (version {SCHEMA_VERSION}); "
                            "upgrade Roost or use another state_dir"
                        )
                    if version == SCHEMA_VERSION:
                        await writer.execute("COMMIT")
                        return
                    for statement in MIGRATIONS[version].statements:
                        await writer.execute(statement)
                    # PRAGMAs take no parameters; both values are our own integers.
                    await writer.execute(f"PRAGMA user_version = {version + 1}")
                    await writer.execute(f"PRAGMA application_id = {ROOST_APPLICATION_ID}")
                    await writer.execute("COMMIT")
                except BaseException:
                    await _rollback_quietly(writer)
                    raise
            except sqlite3.Error as exc:
                raise self._error("schema migration failed", exc) from exc

    @contextlib.asynccontextmanager
    async def _transaction(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """One serialised write transaction; rolled back on any exception.

        Cancellation is safe without ``shield``: aiosqlite enqueues a statement
        on its one worker thread synchronously, at the first step of the
        ``await``. So the ROLLBACK is enqueued while this task still holds the
        lock, runs after whatever statement was interrupted (even a BEGIN that
        had not run yet), and before the next writer's BEGIN. (``shield`` would
        break that: it starts a task that enqueues only on a later loop turn.)
        """
        async with self._write_lock:
            writer = self._writer
            if writer is None:
                raise StoreError(f"state database {self.path} is not open")
            try:
                try:
                    await writer.execute("BEGIN IMMEDIATE")
                    yield writer
                    await writer.execute("COMMIT")
                except BaseException:
                    await _rollback_quietly(writer)
                    raise
            except sqlite3.Error as exc:
                raise self._error(f"{operation} failed", exc) from exc

    async def _read(self, sql: str, parameters: Sequence[Any]) -> list[sqlite3.Row]:
        reader = self._reader
        if reader is None:
            raise StoreError(f"state database {self.path} is not open")
        try:
            return list(await reader.execute_fetchall(sql, parameters))
        except sqlite3.Error as exc:
            raise self._error("read failed", exc) from exc

    def _error(self, what: str, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"state database {self.path}: {what}: {exc}")


def _record_values(record: AgentRecord) -> tuple[Any, ...]:
    """Column values in ``_AGENT_COLUMNS`` order, up to and including ``version``."""
    last_exit = record.last_exit
    return (
        record.name,
        record.state.value,
        record.container_id,
        record.url,
        record.config_hash,
        record.restart_count,
        None
        if last_exit is None
        else json.dumps({**last_exit.to_json(), "log_tail": last_exit.log_tail}),
        record.last_error,
        record.last_activity_at,
        record.state_since,
        record.running_since,
        record.restart_at,
        int(record.expected_exit),
        record.liveness_failures,
        record.version,
    )


def _stored_agent(row: sqlite3.Row) -> StoredAgent:
    (
        name,
        state,
        container_id,
        url,
        config_hash,
        restart_count,
        last_exit,
        last_error,
        last_activity_at,
        state_since,
        running_since,
        restart_at,
        expected_exit,
        liveness_failures,
        version,
        spec,
        source,
    ) = tuple(row)
    record = AgentRecord(
        name=name,
        state=AgentState(state),
        container_id=container_id,
        url=url,
        config_hash=config_hash,
        restart_count=restart_count,
        last_exit=None if last_exit is None else ExitInfo.from_json(json.loads(last_exit)),
        last_error=last_error,
        last_activity_at=last_activity_at,
        state_since=state_since,
        running_since=running_since,
        restart_at=restart_at,
        expected_exit=bool(expected_exit),
        liveness_failures=liveness_failures,
        version=version,
    )
    return StoredAgent(record=record, spec=json.loads(spec), source=source)


async def _rollback_quietly(connection: aiosqlite.Connection) -> None:
    # Always enqueue the ROLLBACK, even if ``in_transaction`` reads False: a
    # BEGIN whose await was cancelled may still be queued on aiosqlite's thread,
    # and FIFO order runs it first. "No transaction is active" is harmless.
    with contextlib.suppress(sqlite3.Error):
        await connection.execute("ROLLBACK")


async def _close_quietly(connection: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error, ValueError):
        await connection.close()

"""``SqliteStore``: the ``Store`` port (agents and their history) on Roost's ``Database``.

Role: durable intent and history. Docker is the truth about what runs; this
file is the truth about what Roost meant to happen and why. A repository on
``roost.adapters.sqlite_database.Database``'s public methods: that object owns
the file, its schema (``MIGRATIONS``), its connections and the one
group-commit writer this shares with the inbox and the job store.

Invariants:
- Every write is one write of the ``Database``: committed whole, in order with
  every other write of the file, or not at all (a failed transaction stores
  nothing and fails every write in it; a cancelled caller only stops waiting).
- ``update_agent`` is compare-and-set on ``version``: ``UPDATE … WHERE name=?
  AND version=?``, and the history rows of the same change, in one write
  function, so they commit together or not at all; a lost CAS raises
  ``Conflict`` (or ``NotFound``) and changes nothing. The stored and returned
  version is the base version + 1.
- ``insert_agent`` refuses a taken name (``Conflict``) through the primary key
  (``ON CONFLICT DO NOTHING RETURNING``), never by a read before the write.
- Reads see the last committed state, never a write in flight.
- Every ``sqlite3.Error`` reaches callers as ``StoreError`` naming the file
  (the ``Database`` translates it, ``from`` the sqlite error).
- ``update_spec`` does not bump ``version``: the spec is not part of the
  ``AgentRecord`` the supervisor compares and sets.
- ``open`` and ``close`` neither open nor close the ``Database``: its owner does.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from roost.adapters.sqlite_database import Database
from roost.core.records import AgentRecord, ExitInfo, StateChange
from roost.core.states import AgentState
from roost.errors import Conflict, NotFound, StoreError
from roost.ports.store import HistoryEntry, StoredAgent

__all__ = ["SqliteStore"]

_AGENT_COLUMNS: Final = (
    "name, state, container_id, url, config_hash, restart_count, last_exit, last_error, "
    "last_activity_at, state_since, running_since, restart_at, expected_exit, "
    "liveness_failures, version, spec, source"
)
_INSERT_AGENT: Final = (
    f"INSERT INTO agents ({_AGENT_COLUMNS}, created_at, updated_at) "
    f"VALUES ({', '.join('?' * 19)}) ON CONFLICT (name) DO NOTHING RETURNING name"
)
_UPDATE_AGENT: Final = (
    "UPDATE agents SET state = ?, container_id = ?, url = ?, config_hash = ?, "
    "restart_count = ?, last_exit = ?, last_error = ?, last_activity_at = ?, "
    "state_since = ?, running_since = ?, restart_at = ?, expected_exit = ?, "
    "liveness_failures = ?, version = ?, updated_at = ? "
    "WHERE name = ? AND version = ?"
)
_INSERT_HISTORY: Final = (
    "INSERT INTO agent_history (agent, from_state, to_state, reason, at) VALUES (?, ?, ?, ?, ?)"
)
#: Exits kept per agent (older ones are deleted as new ones arrive).
EXITS_KEPT: Final = 10
_UPDATE_EXIT: Final = (
    "UPDATE agent_exits SET exit = ? WHERE agent = ? AND container_id = ? "
    "AND seq = (SELECT MAX(seq) FROM agent_exits WHERE agent = ? AND container_id = ?)"
)
_INSERT_EXIT: Final = "INSERT INTO agent_exits (agent, container_id, exit, at) VALUES (?, ?, ?, ?)"
_TRIM_EXITS: Final = (
    "DELETE FROM agent_exits WHERE agent = ? AND seq NOT IN "
    "(SELECT seq FROM agent_exits WHERE agent = ? ORDER BY seq DESC LIMIT ?)"
)


class SqliteStore:
    """The ``Store`` port on ``database`` (see the module docstring).

    ``wall_clock`` stamps ``created_at``/``updated_at`` (seconds since the epoch);
    pass ``clock.now`` to run on fake time.
    """

    def __init__(self, database: Database, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._db = database
        self._wall_clock = wall_clock

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Check that the database is open (its owner opens and migrates it)."""
        if not self._db.is_open:
            raise StoreError(f"state database {self._db.path} is not open")

    async def close(self) -> None:
        """Nothing to release: every write has committed when its call returned,
        and the database is closed by its owner."""

    # -- reads -----------------------------------------------------------------------

    async def get_agent(self, name: str) -> StoredAgent | None:
        row = await self._db.fetch_one(
            f"SELECT {_AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)
        )
        return _stored_agent(row) if row is not None else None

    async def list_agents(self) -> list[StoredAgent]:
        rows = await self._db.fetch_all(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY name")
        return [_stored_agent(row) for row in rows]

    async def history(self, name: str, *, limit: int = 100) -> list[HistoryEntry]:
        """The newest ``limit`` entries, newest last."""
        rows = await self._db.fetch_all(
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
        inserted = await self._db.execute_returning("insert agent", _INSERT_AGENT, values)
        if not inserted:
            raise Conflict(f"agent {record.name!r} already exists")
        return stored

    async def exits(self, name: str, *, limit: int = EXITS_KEPT) -> list[ExitInfo]:
        """The agent's latest exits, newest first."""
        rows = await self._db.fetch_all(
            "SELECT exit, container_id FROM agent_exits WHERE agent = ? ORDER BY seq DESC LIMIT ?",
            (name, max(limit, 0)),
        )
        found = []
        for row in rows:
            info = ExitInfo.from_json(json.loads(row[0]))
            if info is not None:
                found.append(dataclasses.replace(info, container_id=row[1]))
        return found

    async def update_agent(
        self,
        record: AgentRecord,
        *,
        changes: Sequence[StateChange] = (),
        exit: ExitInfo | None = None,
    ) -> AgentRecord:
        """Compare-and-set ``record`` against its ``version``; append ``changes``;
        keep ``exit`` in the agent's exit history (the row of the same container is
        completed, e.g. with its log tail read later)."""
        base_version = record.version
        stored = record.replace(version=base_version + 1)
        columns = _record_values(stored)
        values = (*columns[1:], self._wall_clock(), record.name, base_version)
        # The exit kept in the history is, as a rule, the record's own new last_exit:
        # its JSON is made once (here, not again on the writer thread).
        document = (
            columns[_LAST_EXIT_COLUMN]
            if exit is not None and exit is record.last_exit
            else _exit_document(exit)
        )
        history = [
            (record.name, change.from_state.value, change.to_state.value, change.reason, change.at)
            for change in changes
        ]

        def compare_and_set(db: sqlite3.Connection) -> None:  # on the writer thread
            if db.execute(_UPDATE_AGENT, values).rowcount == 0:
                row = db.execute(
                    "SELECT version FROM agents WHERE name = ?", (record.name,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"agent {record.name!r} does not exist")
                raise Conflict(
                    f"agent {record.name!r} changed underneath this write: stored version "
                    f"{row[0]}, write based on version {base_version}"
                )
            if history:
                db.executemany(_INSERT_HISTORY, history)
            if exit is not None:
                cid = exit.container_id
                updated = cid is not None and (
                    db.execute(
                        _UPDATE_EXIT, (document, record.name, cid, record.name, cid)
                    ).rowcount
                    > 0
                )
                if not updated:
                    db.execute(_INSERT_EXIT, (record.name, cid, document, self._wall_clock()))
                    db.execute(_TRIM_EXITS, (record.name, record.name, EXITS_KEPT))

        await self._db.write("update agent", compare_and_set)
        return stored

    async def update_spec(self, name: str, spec: dict[str, Any], *, source: str) -> None:
        """Replace the spec and source; ``NotFound`` if the agent does not exist."""
        updated = await self._db.execute_returning(
            "update spec",
            "UPDATE agents SET spec = ?, source = ?, updated_at = ? WHERE name = ? RETURNING name",
            (json.dumps(spec), source, self._wall_clock(), name),
        )
        if not updated:
            raise NotFound(f"agent {name!r} does not exist")

    async def delete_agent(self, name: str) -> bool:
        """Delete the agent and (by cascade) its history; False if it did not exist."""
        deleted = await self._db.execute_returning(
            "delete agent", "DELETE FROM agents WHERE name = ? RETURNING name", (name,)
        )
        return bool(deleted)


#: Where ``last_exit`` (its JSON document) is in ``_record_values``.
_LAST_EXIT_COLUMN: Final = 6


def _exit_document(exit: ExitInfo | None) -> str | None:
    """An exit as stored (the ``last_exit`` column, a row of ``agent_exits``)."""
    if exit is None:
        return None
    return json.dumps({**exit.to_json(), "log_tail": exit.log_tail})


def _record_values(record: AgentRecord) -> tuple[Any, ...]:
    """Column values in ``_AGENT_COLUMNS`` order, up to and including ``version``."""
    return (
        record.name,
        record.state.value,
        record.container_id,
        record.url,
        record.config_hash,
        record.restart_count,
        _exit_document(record.last_exit),
        record.last_error,
        record.last_activity_at,
        record.state_since,
        record.running_since,
        record.restart_at,
        int(record.expected_exit),
        record.liveness_failures,
        record.version,
    )


def _stored_agent(row: Sequence[Any]) -> StoredAgent:
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

"""``SqliteInbox``: the ``Inbox`` port on the ``messages`` table of Roost's ``Database``.

Role: durable messages. A repository on
``roost.adapters.sqlite_database.Database``'s public methods: that object owns
the file and its schema (migration step 2 creates the table) and commits every
write through its one group-commit writer, shared with the store and the job
store. This module keeps the inbox's own state (next ``seq``, pending sets).

Invariants:
- Group commit (the ``Database``'s): writes queued while a commit runs are
  committed together in one ``BEGIN IMMEDIATE … COMMIT``, runs of the same
  statement as one ``executemany``. A caller's await returns only after *its*
  write has committed; if the transaction fails, every write in it fails (and
  nothing of it is stored). Durability: WAL with ``synchronous=NORMAL`` (a
  commit survives the process being killed).
- Writes are applied in the order they were queued, so a message's status
  updates can never overtake its insert or each other. ``mark_delivering`` is
  lazy: it does not wake the writer, it joins the next commit (normally the
  attempt's outcome), or commits alone after the database's
  ``lazy_commit_delay`` (50 ms). That halves the commits per delivery and
  changes no outcome: after a crash a ``queued`` message is redelivered
  exactly like a ``delivering`` one.
- ``seq`` (the rowid) is assigned here, in acceptance order, by the only
  writer of the table; a failed insert leaves a gap, never a reordering.
- The per-agent set of pending (queued/delivering) ids is kept in memory,
  loaded at ``open``: ``pending_count`` and ``limit`` cost no query. An
  insert reserves its place before it commits and releases it if it fails.
- Idempotency is enforced by the unique index on ``(agent, idempotency_key)``:
  a keyed insert that loses a race is a no-op (``ON CONFLICT DO NOTHING``) and
  the caller gets the stored message instead.
- ``close`` returns once every write already queued has committed; the
  ``Database`` itself is opened and closed by its owner.
- Bodies and replies are bytes in and bytes out, never parsed here: stored in the
  ``TEXT`` columns as the very bytes given (``CAST(? AS TEXT)``, valid UTF-8: the
  API checked them) and read back as bytes (``CAST(... AS BLOB)``). Rows written
  by older versions (``json.dumps`` of the parsed value) read back the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from roost import errors
from roost.adapters.sqlite_database import Database
from roost.ports.inbox import Message, MessageStatus, QueueFull

__all__ = ["SqliteInbox"]

M = MessageStatus

# Body and reply as the bytes stored (TEXT columns of a STRICT table: a blob is
# stored as text with CAST, and read back as the same bytes).
_COLUMNS: Final = (
    "id, agent, seq, CAST(body AS BLOB), status, attempts, CAST(reply AS BLOB), error, "
    "idempotency_key, created_at, updated_at, next_attempt_at, delivered_at, event_type"
)
_INSERT: Final = (
    "INSERT INTO messages (seq, id, agent, body, status, attempts, error, idempotency_key, "
    "created_at, updated_at, event_type) "
    "VALUES (?, ?, ?, CAST(? AS TEXT), 'queued', 0, '', ?, ?, ?, ?) "
    "ON CONFLICT (agent, idempotency_key) DO NOTHING"
)
_MARK_DELIVERING: Final = (
    "UPDATE messages SET status = 'delivering', attempts = ?, updated_at = ? "
    "WHERE id = ? AND status IN ('queued', 'delivering')"
)
_MARK_DELIVERED: Final = (
    "UPDATE messages SET status = 'delivered', reply = CAST(? AS TEXT), error = '', "
    "updated_at = ?, "
    "delivered_at = ?, next_attempt_at = NULL WHERE id = ?"
)
_MARK_FAILED: Final = (
    "UPDATE messages SET status = 'failed', error = ?, updated_at = ?, next_attempt_at = NULL "
    "WHERE id = ?"
)
# A retry never resurrects a message that was made dead meanwhile.
_MARK_RETRY: Final = (
    "UPDATE messages SET status = 'queued', error = ?, updated_at = ?, next_attempt_at = ? "
    "WHERE id = ? AND status IN ('queued', 'delivering')"
)
_MARK_DEAD: Final = (
    "UPDATE messages SET status = 'dead', error = ?, updated_at = ?, next_attempt_at = NULL "
    "WHERE id = ? AND status IN ('queued', 'delivering') RETURNING id"
)
_KILL: Final = (
    "UPDATE messages SET status = 'dead', error = ?, updated_at = ?, next_attempt_at = NULL "
    "WHERE agent = ? AND status IN ('queued', 'delivering') RETURNING id"
)
_REQUEUE: Final = (
    "UPDATE messages SET status = 'queued', updated_at = ?, next_attempt_at = NULL "
    "WHERE agent = ? AND status = 'dead' RETURNING id"
)


class SqliteInbox:
    """The ``Inbox`` port on ``database`` (opened by its owner before ``open``).

    ``wall_clock`` stamps the ``*_at`` columns (seconds since the epoch).
    """

    def __init__(self, database: Database, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._db = database
        self._wall_clock = wall_clock
        self._open = False
        self._next_seq = 1
        self._pending: dict[str, set[str]] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Load the next seq and the pending sets. Idempotent. The database must be
        open (its migrations create the table)."""
        if self._open:
            return
        row = await self._db.fetch_one("SELECT COALESCE(MAX(seq), 0) FROM messages")
        assert row is not None
        rows = await self._db.fetch_all(
            "SELECT agent, id FROM messages WHERE status IN ('queued', 'delivering')"
        )
        self._next_seq = int(row[0]) + 1
        self._pending = {}
        for agent, message_id in rows:
            self._pending.setdefault(agent, set()).add(message_id)
        self._open = True

    async def close(self) -> None:
        """Commit every write already queued (lazy ones too), then stop. Idempotent."""
        if not self._open:
            return
        self._open = False
        await self._db.flush()

    async def recover(self) -> list[str]:
        self._require_open()
        await self._db.execute(
            "requeue delivering messages",
            "UPDATE messages SET status = 'queued' WHERE status = 'delivering'",
        )
        return sorted(agent for agent, ids in self._pending.items() if ids)

    # -- writes ----------------------------------------------------------------------

    async def enqueue(
        self,
        agent: str,
        body: bytes,
        *,
        idempotency_key: str | None = None,
        limit: int | None = None,
        event_type: str | None = None,
    ) -> tuple[Message, bool]:
        self._require_open()
        if not isinstance(body, bytes):  # nothing reserved, nothing stored
            raise TypeError(f"a message body is the JSON text as bytes, not {type(body).__name__}")
        if idempotency_key is not None:
            existing = await self._by_key(agent, idempotency_key)
            if existing is not None:
                return existing, False
        pending = self._pending.setdefault(agent, set())
        if limit is not None and len(pending) >= limit:
            raise QueueFull(
                f"agent {agent!r} has {len(pending)} undelivered messages (queue_limit {limit})",
                pending=len(pending),
                limit=limit,
            )
        now = self._wall_clock()
        message = Message(
            id=uuid.uuid4().hex,
            agent=agent,
            seq=self._next_seq,
            body=body,
            status=M.QUEUED,
            idempotency_key=idempotency_key,
            created_at=now,
            updated_at=now,
            event_type=event_type,
        )
        self._next_seq += 1
        pending.add(message.id)  # reserve the place before the commit
        try:
            await self._db.execute(
                "enqueue message",
                _INSERT,
                (message.seq, message.id, agent, body, idempotency_key, now, now, event_type),
            )
        except BaseException:
            pending.discard(message.id)
            raise
        if idempotency_key is not None:
            stored = await self._by_key(agent, idempotency_key)
            if stored is not None and stored.id != message.id:
                pending.discard(message.id)  # lost the race: our insert did nothing
                return stored, False
        return message, True

    def pending_count(self, agent: str) -> int:
        return len(self._pending.get(agent, ()))

    def mark_delivering(self, message_id: str, *, attempts: int) -> asyncio.Future[Any]:
        """Lazy: committed with the attempt's outcome when that comes within
        the database's ``lazy_commit_delay``, else on its own then (a slow agent's message shows
        ``delivering`` meanwhile). Either way it commits before the outcome."""
        self._require_open()
        return self._db.execute_lazily(
            "mark message delivering", _MARK_DELIVERING, (attempts, self._wall_clock(), message_id)
        )

    async def mark_delivered(self, message: Message, reply: bytes) -> None:
        self._require_open()
        now = self._wall_clock()
        await self._db.execute(
            "mark message delivered", _MARK_DELIVERED, (reply, now, now, message.id)
        )
        self._settled(message)

    async def mark_failed(self, message: Message, error: str) -> None:
        self._require_open()
        await self._db.execute(
            "mark message failed", _MARK_FAILED, (error, self._wall_clock(), message.id)
        )
        self._settled(message)

    async def mark_dead(self, message: Message, error: str) -> bool:
        self._require_open()
        rows = await self._db.execute_returning(
            "mark message dead", _MARK_DEAD, (error, self._wall_clock(), message.id)
        )
        self._settled(message)
        return bool(rows)

    async def mark_retry(self, message_id: str, error: str, *, next_attempt_at: float) -> None:
        self._require_open()
        await self._db.execute(
            "mark message for retry",
            _MARK_RETRY,
            (error, self._wall_clock(), next_attempt_at, message_id),
        )

    async def kill_pending(self, agent: str, reason: str) -> Sequence[str]:
        self._require_open()
        rows = await self._db.execute_returning(
            "kill pending messages", _KILL, (reason, self._wall_clock(), agent)
        )
        ids = [str(row[0]) for row in rows]
        pending = self._pending.get(agent)
        if pending is not None:
            pending.difference_update(ids)
        return ids

    async def requeue_dead(self, agent: str) -> Sequence[str]:
        self._require_open()
        rows = await self._db.execute_returning(
            "requeue dead messages", _REQUEUE, (self._wall_clock(), agent)
        )
        ids = [str(row[0]) for row in rows]
        self._pending.setdefault(agent, set()).update(ids)
        return ids

    def _settled(self, message: Message) -> None:
        pending = self._pending.get(message.agent)
        if pending is not None:
            pending.discard(message.id)

    def _require_open(self) -> None:
        # The seq counter and pending sets are loaded by ``open``: writing before
        # it would reuse a seq.
        if not self._open:
            raise errors.StoreError(f"the inbox of {self._db.path} is not open")

    # -- reads -----------------------------------------------------------------------

    async def get(self, agent: str, message_id: str) -> Message | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM messages WHERE id = ? AND agent = ?", (message_id, agent)
        )
        return _message(row) if row is not None else None

    async def list_messages(
        self,
        agent: str,
        *,
        status: MessageStatus | None = None,
        limit: int = 100,
        after_seq: int | None = None,
    ) -> list[Message]:
        """Oldest first: the newest ``limit`` messages (of ``status``), or with
        ``after_seq`` the first ``limit`` after that seq (paging)."""
        where = "agent = ?"
        params: list[Any] = [agent]
        if status is not None:
            where += " AND status = ?"
            params.append(status.value)
        if after_seq is not None:
            where += " AND seq > ?"
            params.append(after_seq)
        order = "DESC" if after_seq is None else "ASC"
        params.append(max(limit, 0))
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY seq {order} LIMIT ?",
            params,
        )
        messages = [_message(row) for row in rows]
        return messages if after_seq is not None else messages[::-1]

    async def next_queued(self, agent: str, *, after_seq: int, limit: int) -> list[Message]:
        rows = await self._db.fetch_all(
            f"SELECT {_COLUMNS} FROM messages WHERE agent = ? AND status = 'queued' AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (agent, after_seq, limit),
        )
        return [_message(row) for row in rows]

    async def _by_key(self, agent: str, key: str) -> Message | None:
        row = await self._db.fetch_one(
            f"SELECT {_COLUMNS} FROM messages WHERE agent = ? AND idempotency_key = ?",
            (agent, key),
        )
        return _message(row) if row is not None else None


def _message(row: Any) -> Message:
    (
        message_id,
        agent,
        seq,
        body,
        status,
        attempts,
        reply,
        error,
        idempotency_key,
        created_at,
        updated_at,
        next_attempt_at,
        delivered_at,
        event_type,
    ) = tuple(row)
    return Message(
        id=message_id,
        agent=agent,
        seq=seq,
        body=body,
        status=MessageStatus(status),
        attempts=attempts,
        reply=reply,
        error=error,
        idempotency_key=idempotency_key,
        created_at=created_at,
        updated_at=updated_at,
        next_attempt_at=next_attempt_at,
        delivered_at=delivered_at,
        event_type=event_type,
    )

"""``SqliteInbox``: the ``Inbox`` port on the ``messages`` table of Roost's SQLite file.

Role: durable messages, in the same file as ``SqliteStore`` (which creates the
table in its migrations). Reads go through the store's read connection; writes
through a connection of the inbox's own, used by one dedicated thread, so a
whole batch (BEGIN, statements, COMMIT) costs one thread hop instead of one per
statement. SQLite's write lock (WAL, ``busy_timeout``) serialises it with the
store's writer.

Invariants:
- Group commit: every write is queued to one writer task, which commits
  whatever has accumulated (while the previous commit ran) in a single
  ``BEGIN IMMEDIATE … COMMIT``, running consecutive writes of the same
  statement as one ``executemany``. A caller's await returns only after *its*
  write has committed; if the transaction fails, every write in it fails (and
  nothing of it is stored). Durability is the store's: WAL with
  ``synchronous=NORMAL`` (a commit survives the process being killed).
- Writes are applied in the order they were queued, so a message's status
  updates can never overtake its insert or each other. ``mark_delivering`` is
  lazy: it does not wake the writer, it joins the next commit (normally the
  attempt's outcome), or commits alone after ``LAZY_COMMIT_DELAY``. That halves
  the commits per delivery and changes no outcome: after a crash a ``queued``
  message is redelivered exactly like a ``delivering`` one.
- ``seq`` (the rowid) is assigned here, in acceptance order, by the only
  writer of the table; a failed insert leaves a gap, never a reordering.
- The per-agent set of pending (queued/delivering) ids is kept in memory,
  loaded at ``open``: ``pending_count`` and ``limit`` cost no query. An
  insert reserves its place before it commits and releases it if it fails.
- Idempotency is enforced by the unique index on ``(agent, idempotency_key)``:
  a keyed insert that loses a race is a no-op (``ON CONFLICT DO NOTHING``) and
  the caller gets the stored message instead.
- ``close`` commits every write already queued before returning.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from roost import errors
from roost.adapters.sqlite_store import BUSY_TIMEOUT, SqliteStore
from roost.ports.inbox import Message, MessageStatus, QueueFull

__all__ = ["SqliteInbox"]

log = logging.getLogger("roost.inbox")

M = MessageStatus

#: Longest a lazy write (``mark_delivering``) waits for a commit to ride with.
LAZY_COMMIT_DELAY: Final = 0.05

_COLUMNS: Final = (
    "id, agent, seq, body, status, attempts, reply, error, idempotency_key, "
    "created_at, updated_at, next_attempt_at, delivered_at"
)
_INSERT: Final = (
    "INSERT INTO messages (seq, id, agent, body, status, attempts, error, idempotency_key, "
    "created_at, updated_at) VALUES (?, ?, ?, ?, 'queued', 0, '', ?, ?, ?) "
    "ON CONFLICT (agent, idempotency_key) DO NOTHING"
)
_MARK_DELIVERING: Final = (
    "UPDATE messages SET status = 'delivering', attempts = ?, updated_at = ? "
    "WHERE id = ? AND status IN ('queued', 'delivering')"
)
_MARK_DELIVERED: Final = (
    "UPDATE messages SET status = 'delivered', reply = ?, error = '', updated_at = ?, "
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
_KILL: Final = (
    "UPDATE messages SET status = 'dead', error = ?, updated_at = ?, next_attempt_at = NULL "
    "WHERE agent = ? AND status IN ('queued', 'delivering') RETURNING id"
)
_REQUEUE: Final = (
    "UPDATE messages SET status = 'queued', updated_at = ?, next_attempt_at = NULL "
    "WHERE agent = ? AND status = 'dead' RETURNING id"
)


@dataclasses.dataclass(slots=True)
class _Write:
    sql: str
    params: tuple[Any, ...]
    done: asyncio.Future[list[Any]]
    #: RETURNING statements run alone and hand their rows back.
    returning: bool = False


class SqliteInbox:
    """The ``Inbox`` port over an open (or about to be opened) ``SqliteStore``.

    ``wall_clock`` stamps the ``*_at`` columns (seconds since the epoch).
    """

    def __init__(self, store: SqliteStore, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._wall_clock = wall_clock
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._queue: list[_Write] = []
        self._wakeup = asyncio.Event()
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        self._next_seq = 1
        self._pending: dict[str, set[str]] = {}
        #: committed transactions and the writes they held (for benchmarks/metrics).
        self.commits = 0
        self.writes = 0

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Load the next seq and the pending sets; start the writer. Idempotent.
        The store must be open (its migrations create the table)."""
        if self._writer_task is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "roost-inbox-writer")
        try:
            await self._in_thread(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        rows = await self._store._read("SELECT COALESCE(MAX(seq), 0) FROM messages", ())
        self._next_seq = int(rows[0][0]) + 1
        rows = await self._store._read(
            "SELECT agent, id FROM messages WHERE status IN ('queued', 'delivering')", ()
        )
        self._pending = {}
        for agent, message_id in rows:
            self._pending.setdefault(agent, set()).add(message_id)
        self._closing = False
        self._writer_task = asyncio.create_task(self._write_loop(), name="roost.inbox.writer")

    async def close(self) -> None:
        task = self._writer_task
        if task is None:
            return
        self._closing = True
        self._wakeup.set()
        await asyncio.gather(task, return_exceptions=True)
        self._writer_task = None
        with contextlib.suppress(sqlite3.Error):
            await self._in_thread(self._disconnect)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def recover(self) -> list[str]:
        await self._write("UPDATE messages SET status = 'queued' WHERE status = 'delivering'", ())
        return sorted(agent for agent, ids in self._pending.items() if ids)

    # -- writes ----------------------------------------------------------------------

    async def enqueue(
        self,
        agent: str,
        body: Any,
        *,
        idempotency_key: str | None = None,
        limit: int | None = None,
    ) -> tuple[Message, bool]:
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
        body_json = json.dumps(body)  # TypeError for a value that is not JSON: nothing reserved
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
        )
        self._next_seq += 1
        pending.add(message.id)  # reserve the place before the commit
        try:
            await self._write(
                _INSERT,
                (message.seq, message.id, agent, body_json, idempotency_key, now, now),
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
        ``LAZY_COMMIT_DELAY``, else on its own then (a slow agent's message shows
        ``delivering`` meanwhile). Either way it commits before the outcome."""
        done = self._queue_write(
            _MARK_DELIVERING, (attempts, self._wall_clock(), message_id), lazy=True
        )
        done.add_done_callback(_retrieve)
        return done

    async def mark_delivered(self, message: Message, reply: Any) -> None:
        now = self._wall_clock()
        await self._write(_MARK_DELIVERED, (json.dumps(reply), now, now, message.id))
        self._settled(message)

    async def mark_failed(self, message: Message, error: str) -> None:
        await self._write(_MARK_FAILED, (error, self._wall_clock(), message.id))
        self._settled(message)

    async def mark_retry(self, message_id: str, error: str, *, next_attempt_at: float) -> None:
        await self._write(_MARK_RETRY, (error, self._wall_clock(), next_attempt_at, message_id))

    async def kill_pending(self, agent: str, reason: str) -> Sequence[str]:
        rows = await self._write(_KILL, (reason, self._wall_clock(), agent), returning=True)
        ids = [str(row[0]) for row in rows]
        pending = self._pending.get(agent)
        if pending is not None:
            pending.difference_update(ids)
        return ids

    async def requeue_dead(self, agent: str) -> Sequence[str]:
        rows = await self._write(_REQUEUE, (self._wall_clock(), agent), returning=True)
        ids = [str(row[0]) for row in rows]
        self._pending.setdefault(agent, set()).update(ids)
        return ids

    def _settled(self, message: Message) -> None:
        pending = self._pending.get(message.agent)
        if pending is not None:
            pending.discard(message.id)

    # -- reads -----------------------------------------------------------------------

    async def get(self, agent: str, message_id: str) -> Message | None:
        rows = await self._store._read(
            f"SELECT {_COLUMNS} FROM messages WHERE id = ? AND agent = ?", (message_id, agent)
        )
        return _message(rows[0]) if rows else None

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
        rows = await self._store._read(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY seq {order} LIMIT ?",
            params,
        )
        messages = [_message(row) for row in rows]
        return messages if after_seq is not None else messages[::-1]

    async def next_queued(self, agent: str, *, after_seq: int, limit: int) -> list[Message]:
        rows = await self._store._read(
            f"SELECT {_COLUMNS} FROM messages WHERE agent = ? AND status = 'queued' AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (agent, after_seq, limit),
        )
        return [_message(row) for row in rows]

    async def _by_key(self, agent: str, key: str) -> Message | None:
        rows = await self._store._read(
            f"SELECT {_COLUMNS} FROM messages WHERE agent = ? AND idempotency_key = ?",
            (agent, key),
        )
        return _message(rows[0]) if rows else None

    # -- the group-commit writer -------------------------------------------------------

    def _queue_write(
        self, sql: str, params: tuple[Any, ...], *, returning: bool = False, lazy: bool = False
    ) -> asyncio.Future[list[Any]]:
        """Queue a write now (ordered before every later one); its future resolves
        once committed. ``lazy``: no commit of its own, it rides with the next one
        (at most ``LAZY_COMMIT_DELAY`` later)."""
        if self._writer_task is None or self._closing:
            raise errors.StoreError(f"the inbox of {self._store.path} is not open")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append(_Write(sql, params, done, returning))
        if not lazy:
            self._wakeup.set()
        elif self._lazy_timer is None:
            self._lazy_timer = loop.call_later(LAZY_COMMIT_DELAY, self._wakeup.set)
        return done

    async def _write(
        self, sql: str, params: tuple[Any, ...], *, returning: bool = False
    ) -> list[Any]:
        done = self._queue_write(sql, params, returning=returning)
        # Not cancellable half-way: once queued, the write happens; a cancelled
        # caller simply stops waiting for it.
        return await asyncio.shield(done)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._lazy_timer is not None:
                self._lazy_timer.cancel()
                self._lazy_timer = None
            batch, self._queue = self._queue, []
            if batch:
                await self._commit(batch)
            # Closing: ``close`` woke us once; whatever is still queued (a lazy write
            # that arrived meanwhile) is committed before the loop ends.
            if self._closing and not self._queue:
                return
            if self._closing:
                self._wakeup.set()

    async def _commit(self, batch: list[_Write]) -> None:
        work = [(w.sql, w.params, w.returning) for w in batch]
        try:
            results = await self._in_thread(self._apply, work)
        except Exception as exc:
            log.error("inbox: a batch of %d writes failed: %s", len(batch), exc)
            for write in batch:
                if not write.done.done():
                    write.done.set_exception(exc)
            return
        self.commits += 1
        self.writes += len(batch)
        for write, rows in zip(batch, results, strict=True):
            if not write.done.done():
                write.done.set_result(rows)

    # -- the writer thread (only it touches ``_db``) --------------------------------------

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        executor = self._executor
        if executor is None:
            raise errors.StoreError(f"the inbox of {self._store.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _connect(self) -> None:
        try:
            db = sqlite3.connect(self._store.path, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            db.execute("PRAGMA synchronous = NORMAL")  # per connection; WAL is the file's
        except sqlite3.Error as exc:
            raise errors.StoreError(
                f"state database {self._store.path}: cannot open the inbox writer: {exc}"
            ) from exc
        self._db = db

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _apply(self, work: list[tuple[str, tuple[Any, ...], bool]]) -> list[list[Any]]:
        """One transaction: runs of the same statement as ``executemany``."""
        db = self._db
        if db is None:
            raise errors.StoreError(f"the inbox of {self._store.path} is not open")
        results: list[list[Any]] = [[] for _ in work]
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                start = 0
                while start < len(work):
                    sql, params, returning = work[start]
                    if returning:
                        results[start] = db.execute(sql, params).fetchall()
                        start += 1
                        continue
                    end = start + 1
                    while end < len(work) and work[end][0] == sql and not work[end][2]:
                        end += 1
                    if end - start == 1:
                        db.execute(sql, params)
                    else:
                        db.executemany(sql, [w[1] for w in work[start:end]])
                    start = end
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise errors.StoreError(
                f"state database {self._store.path}: inbox write failed: {exc}"
            ) from exc
        return results


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A lazy write nobody awaits must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


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
    ) = tuple(row)
    return Message(
        id=message_id,
        agent=agent,
        seq=seq,
        body=json.loads(body),
        status=MessageStatus(status),
        attempts=attempts,
        reply=_loads(reply),
        error=error,
        idempotency_key=idempotency_key,
        created_at=created_at,
        updated_at=updated_at,
        next_attempt_at=next_attempt_at,
        delivered_at=delivered_at,
    )

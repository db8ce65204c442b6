"""``Database``: the one owner of Roost's SQLite state file.

Role: opens, configures and migrates the file, owns its two connections and the
two threads they live on, and runs the one group-commit writer through which
every write of every repository goes (``sqlite_store``: agents and history,
``sqlite_inbox``: messages, ``sqlite_jobs``: jobs and snapshots). Repositories
use the public methods below and nothing else.

Threads and connections (plain ``sqlite3``, no aiosqlite):
- the writer thread owns the writer connection; only it runs BEGIN … COMMIT;
- the reader thread owns a ``query_only`` connection for every read.
Each connection is created, used and closed on its own thread. A thread is handed
work through a queue and hands each result back with one ``call_soon_threadsafe``
(``_Thread``): no executor futures chained to loop futures, so a commit costs the
event loop two turns (the result, the caller) rather than five, which is what a
message waits for between deliveries when the loop is busy.

Invariants:
- Group commit: a write is queued on the event loop, in call order, and the one
  writer commits whatever has accumulated (while the previous commit ran) in a
  single ``BEGIN IMMEDIATE … COMMIT`` on the writer thread, running consecutive
  plain statements with the same SQL as one ``executemany``. At most one
  transaction is in flight; the next starts when it ends (driven by callbacks on
  the event loop, not by a task). Writes are applied in the order they were
  queued, across repositories.
- A caller's await returns only after *its* write has committed. If the
  transaction fails (any ``sqlite3.Error``, from a statement, BEGIN or COMMIT),
  it is rolled back: every write in it fails with a ``StoreError`` naming the
  file and the operation (``from`` the sqlite error), and nothing of it is stored.
- A write function (``write``) runs inside a savepoint of the batch: when it
  raises anything but a ``sqlite3.Error`` (``Conflict``, ``NotFound``, a bug),
  only its own changes are undone and only its caller gets the exception; the
  rest of the batch commits.
- Cancellation never half-applies a write: once queued, a write is committed
  whole or fails whole with its transaction; a cancelled caller only stops
  waiting for the outcome (its future is cancelled; the write is not).
- Lazy writes (``execute_lazily``) do not wake the writer: they ride with the
  next commit, or commit alone ``lazy_commit_delay`` seconds later.
- Reads run on the reader connection. In WAL mode it sees the last committed
  snapshot and never a write in flight (or about to be rolled back); a read
  issued after a write's await returned sees that write.
- Durability: ``journal_mode=WAL`` with ``synchronous=NORMAL``. A commit is in
  the WAL file (written, not fsynced) when its await returns, so it survives
  the Roost process being SIGKILLed at any instant after that; only an OS crash
  or power loss can drop the last few commits (never corrupting the file).
  SQLite's recommended setting for WAL; no fsync per commit.
- A new state file is created mode 0600 before SQLite opens it; SQLite gives
  its ``-wal`` and ``-shm`` files the database file's mode. An existing file's
  mode is left alone.
- Schema versions live in ``PRAGMA user_version``; ``MIGRATIONS`` is an ordered,
  append-only tuple whose step *n* takes the schema from version *n-1* to *n*,
  each applied in its own transaction with the new ``user_version``. A
  database of a newer Roost is refused (``StoreError`` naming both versions),
  and so is another program's file (``PRAGMA application_id``).
- ``close`` commits every write already queued, then closes; writes after it
  has begun are refused (``StoreError``). A closed ``Database`` can be reopened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import pathlib
import queue
import shutil
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

from roost.errors import StorageFull, StoreError

__all__ = [
    "BUSY_TIMEOUT",
    "HEADROOM_BYTES",
    "HEADROOM_SHARE",
    "LAZY_COMMIT_DELAY",
    "MIGRATIONS",
    "ROOST_APPLICATION_ID",
    "SCHEMA_VERSION",
    "Database",
    "Migration",
]

log = logging.getLogger("roost.database")

T = TypeVar("T")

#: ``PRAGMA application_id`` of a Roost database ("Rost" in ASCII): lets us
#: refuse some other program's SQLite file instead of adding tables to it.
ROOST_APPLICATION_ID: Final = 0x526F7374
#: How long a statement waits for another connection's lock before failing.
BUSY_TIMEOUT: Final = 5.0
#: Longest a lazy write waits for a commit to ride with.
LAZY_COMMIT_DELAY: Final = 0.05
#: Free bytes the state file's file system needs before ``check_writable`` tries a
#: write after a full disk (or ``HEADROOM_SHARE`` of a file system smaller than 20 MiB).
HEADROOM_BYTES: Final = 1024 * 1024
HEADROOM_SHARE: Final = 0.05
#: Mode of a state file Roost creates (its -wal and -shm files follow it).
FILE_MODE: Final = 0o600


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
    # Step 2 (version 2): the durable inbox (roost.adapters.sqlite_inbox).
    Migration(
        "messages: durable inbox",
        (
            # seq is the rowid: acceptance order, assigned by the inbox (its only writer).
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
    # Step 3 (version 3): one-shot jobs and snapshots (roost.adapters.sqlite_jobs).
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
    # Step 4 (version 4): why it failed, kept. Owned by roost.adapters.sqlite_store.
    Migration(
        "agent exits: the last few with their log tails",
        (
            """
            CREATE TABLE agent_exits (
                seq          INTEGER PRIMARY KEY AUTOINCREMENT,
                agent        TEXT    NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
                container_id TEXT,              -- NULL: no container (e.g. vanished)
                exit         TEXT    NOT NULL,  -- JSON: ExitInfo.to_json() + log_tail
                at           REAL    NOT NULL
            ) STRICT
            """,
            "CREATE INDEX agent_exits_by_agent ON agent_exits (agent, seq)",
        ),
    ),
    # Step 5 (version 5): agents that talk back (issue 10): a routed message's event
    # type (roost.adapters.sqlite_inbox), and each agent's current container token,
    # kept only as a hash (roost.adapters.sqlite_tokens).
    Migration(
        "routed messages' event type; agent container tokens",
        (
            "ALTER TABLE messages ADD COLUMN event_type TEXT",
            """
            CREATE TABLE agent_tokens (
                agent      TEXT NOT NULL PRIMARY KEY,
                token_hash TEXT NOT NULL,  -- sha256 hex of ROOST_AGENT_TOKEN; never the token
                issued_at  REAL NOT NULL
            ) STRICT
            """,
        ),
    ),
    # Step 6 (version 6): an agent's messages in seq order without a sort. Listing
    # them (GET /api/agents/{name}/messages, without a status) searched
    # messages_by_status for the agent and sorted every one of its rows in a temporary
    # B-tree: each page cost time in proportion to all the agent had ever received.
    Migration(
        "messages listed by agent in seq order",
        ("CREATE INDEX messages_by_agent ON messages (agent, seq)",),
    ),
)

#: The schema version this code writes and understands.
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: What a write does on the writer thread.
_PLAIN: Final = 0  # one statement, no result; may join an executemany
_RETURNING: Final = 1  # one statement whose rows are the result
_FUNCTION: Final = 2  # a function of the connection, inside a savepoint


@dataclasses.dataclass(slots=True)
class _Write:
    operation: str
    kind: int
    sql: str
    params: Sequence[Any]
    fn: Callable[[sqlite3.Connection], Any] | None
    #: resolved on the event loop only; the writer thread never touches it.
    #: Cancelled when its caller stops waiting (the write itself goes on).
    done: asyncio.Future[Any]
    #: its transaction has ended (committed or failed), whoever still waits.
    settled: bool = False


#: Called on the event loop with (ok, the function's result or its exception).
_Reply = Callable[[bool, Any], None]


class _Thread:
    """One thread that runs the functions it is handed, one at a time, in order, and
    hands each outcome back on the caller's event loop (one ``call_soon_threadsafe``).
    A daemon thread: a process that never closed its database does not hang at exit
    (a transaction cut short there is rolled back by SQLite)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...], _Reply] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], reply: _Reply) -> None:
        """Run ``fn(*args)`` on the thread; ``reply(ok, value)`` on this loop after."""
        self._jobs.put((asyncio.get_running_loop(), fn, args, reply))

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on the thread; a future of its result (or exception)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def reply(ok: bool, value: Any) -> None:
            if future.done():
                return  # the caller stopped waiting
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        self.submit(fn, args, reply)
        return future

    def stop(self) -> None:
        """The thread ends once the functions handed to it before have run."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, fn, args, reply = job
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:
                outcome = (False, exc)
            # A closed loop (RuntimeError): nobody waits for the outcome any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(reply, *outcome)


class _BatchFailed(Exception):
    """A transaction failed on the writer thread; ``culprit``: the index of the
    write whose statement failed (None: BEGIN or COMMIT failed)."""

    def __init__(self, cause: BaseException, culprit: int | None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.culprit = culprit


class Database:
    """The SQLite state file at ``path`` (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lazy_commit_delay: float = LAZY_COMMIT_DELAY,
    ) -> None:
        self.path = pathlib.Path(path)
        self._lazy_commit_delay = lazy_commit_delay
        self._lifecycle = asyncio.Lock()
        self._writer_thread: _Thread | None = None
        self._reader_thread: _Thread | None = None
        # Each touched only by functions running on its own thread.
        self._writer_db: sqlite3.Connection | None = None
        self._reader_db: sqlite3.Connection | None = None
        self._queue: list[_Write] = []
        self._in_flight: list[_Write] = []
        #: a write that does not wait (or the lazy delay, a flush, closing) is queued.
        self._due = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        #: woken whenever a transaction ends (flush and close wait on them).
        self._settle_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._commits = 0
        #: the last transaction failed (logged once until one commits again).
        self._failing = False
        self._writes = 0

    @property
    def is_open(self) -> bool:
        return self._writer_thread is not None and not self._closing

    @property
    def commits(self) -> int:
        """Transactions committed by the group-commit writer since construction."""
        return self._commits

    @property
    def writes(self) -> int:
        """Writes those transactions held (``writes / commits``: the mean batch)."""
        return self._writes

    @property
    def queued(self) -> int:
        """Writes waiting for the next transaction (not counting one being committed)."""
        return len(self._queue)

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Create (mode 0600) or open the file, configure it, migrate the schema,
        open the read connection and start the writer. Idempotent."""
        async with self._lifecycle:
            if self._writer_thread is not None:
                return
            writer = _Thread("roost-db-writer")
            reader = _Thread("roost-db-reader")
            try:
                await writer.call(self._open_writer)
                await reader.call(self._open_reader)
            except BaseException:
                # Each close runs on its own thread; both are no-ops if never opened.
                await asyncio.gather(
                    reader.call(self._close_reader),
                    writer.call(self._close_writer),
                    return_exceptions=True,
                )
                reader.stop()
                writer.stop()
                raise
            self._writer_thread, self._reader_thread = writer, reader
            self._queue, self._in_flight = [], []
            self._due = False
            self._closing = False

    async def close(self) -> None:
        """Commit every write already queued, then close both connections and stop
        both threads. Idempotent."""
        async with self._lifecycle:
            if self._writer_thread is None:
                return
            self._closing = True
            await self._settle([*self._in_flight, *self._queue])
            writer, reader = self._writer_thread, self._reader_thread
            self._writer_thread = self._reader_thread = None
            for thread, closer in ((reader, self._close_reader), (writer, self._close_writer)):
                if thread is None:
                    continue
                try:
                    await thread.call(closer)
                except sqlite3.Error as exc:
                    log.warning("state database %s: error while closing: %s", self.path, exc)
                finally:
                    thread.stop()

    async def flush(self) -> None:
        """Wait until every write queued so far has committed or failed (lazy ones
        included, without waiting out their delay). Raises nothing."""
        await self._settle([*self._in_flight, *self._queue])

    async def _settle(self, writes: list[_Write]) -> None:
        """Commit what is queued now, without waiting out the lazy delay, and wait
        until ``writes`` are settled."""
        if self._queue:
            self._due = True
            self._kick()
        while not all(write.settled for write in writes):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settle_waiters.append(waiter)
            await waiter

    async def check_writable(self) -> None:
        """Whether the file takes writes again after they failed: ``StorageFull``
        while its file system has less than ``HEADROOM_BYTES`` free (or
        ``HEADROOM_SHARE`` of a smaller one), else a write that changes nothing
        (``user_version`` set to itself, which SQLite writes all the same) is
        committed, raising ``StoreError`` if it fails. The free space is asked
        first: on a full disk a one-page write can still fit in the last pages
        the WAL file holds, and prove nothing."""
        reader = self._reader_thread
        if reader is None or self._writer_thread is None:
            raise self._not_open()
        usage = await reader.call(shutil.disk_usage, self.path.parent)
        needed = min(HEADROOM_BYTES, int(usage.total * HEADROOM_SHARE))
        if usage.free < needed:
            raise StorageFull(
                f"state database {self.path}: {usage.free} bytes free on its file system, "
                f"{needed} wanted before writing again"
            )

        def rewrite_version(db: sqlite3.Connection) -> None:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            # PRAGMAs take no parameters; the value is the file's own integer.
            db.execute(f"PRAGMA user_version = {version}")

        await self.write("check the state file takes writes", rewrite_version)

    async def schema_version(self) -> int:
        """The ``user_version`` of the open database."""
        row = await self.fetch_one("PRAGMA user_version")
        assert row is not None
        return int(row[0])

    # -- reads -----------------------------------------------------------------------

    async def fetch_all(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Every row of one query on the read connection (last committed snapshot)."""
        reader = self._reader_thread
        if reader is None or self._writer_thread is None:
            raise self._not_open()
        try:
            rows: list[Any] = await reader.call(self._read, sql, parameters)
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: read failed: {exc}") from exc
        return rows

    async def fetch_one(self, sql: str, parameters: Sequence[Any] = ()) -> Any | None:
        """The first row of one query, or None."""
        rows = await self.fetch_all(sql, parameters)
        return rows[0] if rows else None

    # -- writes ----------------------------------------------------------------------

    async def execute(self, operation: str, sql: str, parameters: Sequence[Any] = ()) -> None:
        """One statement, committed in the next transaction. ``operation`` names
        the write in errors ("mark message delivered")."""
        await self._wait(self._queue_write(operation, _PLAIN, sql, parameters))

    def execute_lazily(
        self, operation: str, sql: str, parameters: Sequence[Any] = ()
    ) -> asyncio.Future[None]:
        """Queue one statement now, in order, without waking the writer: it commits
        with the next write, or alone after ``lazy_commit_delay``. The future
        resolves once it has committed; awaiting it is optional."""
        done = self._queue_write(operation, _PLAIN, sql, parameters, lazy=True)
        done.add_done_callback(_retrieve)
        return done

    async def execute_returning(
        self, operation: str, sql: str, parameters: Sequence[Any] = ()
    ) -> list[Any]:
        """One statement (``… RETURNING …``) whose rows are returned once committed."""
        rows: list[Any] = await self._wait(
            self._queue_write(operation, _RETURNING, sql, parameters)
        )
        return rows

    async def write(self, operation: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the writer thread inside the next transaction;
        return its result once committed.

        ``fn`` runs in a savepoint: if it raises (``Conflict``, ``NotFound``, …),
        its changes alone are undone and the exception is this call's; a
        ``sqlite3.Error`` fails the whole transaction instead. ``fn`` may read
        (it sees its batch's earlier writes) but must not BEGIN, COMMIT or
        ROLLBACK, and must not block: the whole batch waits for it.
        """
        return cast(T, await self._wait(self._queue_write(operation, _FUNCTION, "", (), fn)))

    # -- the group-commit writer (event loop side) -------------------------------------

    def _queue_write(
        self,
        operation: str,
        kind: int,
        sql: str,
        parameters: Sequence[Any],
        fn: Callable[[sqlite3.Connection], Any] | None = None,
        *,
        lazy: bool = False,
    ) -> asyncio.Future[Any]:
        """Append a write to the queue (ordered before every later one); its future
        resolves once its transaction has committed or failed."""
        if self._writer_thread is None or self._closing:
            raise self._not_open()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Write(operation, kind, sql, parameters, fn, done))
        if not lazy:
            self._due = True
            self._kick()
        elif self._lazy_timer is None:
            self._lazy_timer = loop.call_later(self._lazy_commit_delay, self._lazy_due)
        return done

    @staticmethod
    async def _wait(done: asyncio.Future[Any]) -> Any:
        # Queued means it will be applied whole or fail whole; a cancelled caller
        # cancels only its future, which the writer then leaves alone.
        return await done

    def _lazy_due(self) -> None:
        self._lazy_timer = None
        self._due = True
        self._kick()

    def _kick(self) -> None:
        """Begin the next transaction: when none is in flight and writes are due."""
        if self._in_flight or not self._due or not self._queue:
            return
        thread = self._writer_thread
        if thread is None:
            return
        self._due = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        batch, self._queue = self._queue, []
        self._in_flight = batch
        thread.submit(self._apply, (batch,), functools.partial(self._committed, batch))

    def _committed(self, batch: list[_Write], ok: bool, outcome: Any) -> None:
        """A transaction ended (on the event loop): resolve its writes, begin the next."""
        self._in_flight = []
        if ok:
            self._commits += 1
            self._writes += len(batch)
            if self._failing:
                self._failing = False
                log.warning("state database %s: writes commit again", self.path)
            for write, (fine, value) in zip(batch, outcome, strict=True):
                write.settled = True
                if write.done.done():
                    continue
                if fine:
                    write.done.set_result(value)
                else:
                    write.done.set_exception(value)
        else:
            failed = outcome if isinstance(outcome, _BatchFailed) else _BatchFailed(outcome, None)
            self._fail(batch, failed)
        if self._closing:
            self._due = True  # drain: whatever was queued meanwhile (a lazy write) too
        self._kick()
        waiters, self._settle_waiters = self._settle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, batch: list[_Write], failed: _BatchFailed) -> None:
        cause = failed.cause
        culprit = batch[failed.culprit].operation if failed.culprit is not None else None
        # One error line when writes start failing (a full disk fails every retry),
        # details at debug level after that until a commit succeeds again.
        level = logging.DEBUG if self._failing else logging.ERROR
        self._failing = True
        log.log(
            level,
            "state database %s: a transaction of %d writes failed and was rolled back (%s): %s",
            self.path,
            len(batch),
            culprit or "at BEGIN/COMMIT",
            cause,
        )
        full = isinstance(cause, sqlite3.Error) and (
            getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        )
        kind = StorageFull if full else StoreError
        for index, write in enumerate(batch):
            write.settled = True
            if write.done.done():
                continue
            if index == failed.culprit:
                why = f"{cause}"
            elif culprit is not None:
                why = f"rolled back with its transaction, in which {culprit!r} failed: {cause}"
            else:
                why = f"its transaction failed: {cause}"
            error = kind(f"state database {self.path}: {write.operation} failed: {why}")
            error.__cause__ = cause
            write.done.set_exception(error)

    # -- the writer thread (only it touches ``_writer_db``) -------------------------------

    def _apply(self, batch: list[_Write]) -> list[tuple[bool, Any]]:
        """One transaction for the whole batch; per write (ok, result or exception)."""
        db = self._writer_db
        if db is None:
            raise _BatchFailed(sqlite3.ProgrammingError("the writer connection is closed"), None)
        outcomes: list[tuple[bool, Any]] = [(True, None)] * len(batch)
        index: int | None = None
        try:
            db.execute("BEGIN IMMEDIATE")
            index = 0
            while index < len(batch):
                write = batch[index]
                if write.kind == _FUNCTION:
                    outcomes[index] = _apply_function(db, write)
                    index += 1
                elif write.kind == _RETURNING:
                    outcomes[index] = (True, db.execute(write.sql, write.params).fetchall())
                    index += 1
                else:
                    end = index + 1
                    while (
                        end < len(batch)
                        and batch[end].kind == _PLAIN
                        and batch[end].sql == write.sql
                    ):
                        end += 1
                    if end - index == 1:
                        db.execute(write.sql, write.params)
                    else:
                        db.executemany(write.sql, [w.params for w in batch[index:end]])
                    index = end
            index = None
            db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise _BatchFailed(exc, index) from exc
        return outcomes

    def _open_writer(self) -> None:
        try:
            # Create it 0600 ourselves: SQLite would use 0644 (less the umask).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"state database {self.path}: cannot create it: {exc}") from exc
        db = _connect(self.path, self._error)
        try:
            self._configure(db)
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        self._writer_db = db

    def _close_writer(self) -> None:
        db, self._writer_db = self._writer_db, None
        if db is not None:
            db.close()

    def _configure(self, db: sqlite3.Connection) -> None:
        try:
            # The first real read of the file: a non-SQLite file fails here.
            application_id = int(db.execute("PRAGMA application_id").fetchone()[0])
            if application_id not in (0, ROOST_APPLICATION_ID):
                raise StoreError(
                    f"state database {self.path} belongs to another program "
                    f"(application_id {application_id:#x}); refusing to touch it"
                )
            mode = str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise StoreError(
                    f"state database {self.path} cannot use WAL journaling "
                    f"(got {mode!r}); it must be a file on a local filesystem"
                )
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise self._error("is not a usable SQLite database", exc) from exc

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Apply every missing step of ``MIGRATIONS``, one transaction each."""
        while True:
            try:
                try:
                    db.execute("BEGIN IMMEDIATE")
                    # Read inside the write lock: another opener may have migrated.
                    version = int(db.execute("PRAGMA user_version").fetchone()[0])
                    if version > SCHEMA_VERSION:
                        raise StoreError(
                            f"state database {self.path} has schema version {version}, "
                            f"newer than this Roost understands (version {SCHEMA_VERSION}); "
                            "upgrade Roost or use another state_dir"
                        )
                    if version == SCHEMA_VERSION:
                        db.execute("COMMIT")
                        return
                    for statement in MIGRATIONS[version].statements:
                        db.execute(statement)
                    # PRAGMAs take no parameters; both values are our own integers.
                    db.execute(f"PRAGMA user_version = {version + 1}")
                    db.execute(f"PRAGMA application_id = {ROOST_APPLICATION_ID}")
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error("schema migration failed", exc) from exc

    # -- the reader thread (only it touches ``_reader_db``) -------------------------------

    def _open_reader(self) -> None:
        db = _connect(self.path, self._error)
        try:
            db.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            db.close()
            raise self._error("cannot open the read connection", exc) from exc
        self._reader_db = db

    def _close_reader(self) -> None:
        db, self._reader_db = self._reader_db, None
        if db is not None:
            db.close()

    def _read(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        db = self._reader_db
        if db is None:
            raise sqlite3.ProgrammingError("the read connection is closed")
        return db.execute(sql, parameters).fetchall()

    # -- errors ----------------------------------------------------------------------

    def _error(self, what: str, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"state database {self.path}: {what}: {exc}")

    def _not_open(self) -> StoreError:
        return StoreError(f"state database {self.path} is not open")


def _connect(
    path: pathlib.Path, error: Callable[[str, sqlite3.Error], StoreError]
) -> sqlite3.Connection:
    """A connection for the calling thread: autocommit (every transaction here is
    an explicit BEGIN), waiting ``BUSY_TIMEOUT`` for another connection's lock."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
    except sqlite3.Error as exc:
        raise error("cannot open", exc) from exc
    return db


def _apply_function(db: sqlite3.Connection, write: _Write) -> tuple[bool, Any]:
    """Run a write function in a savepoint: its own refusal undoes only its changes."""
    assert write.fn is not None
    db.execute("SAVEPOINT roost_write")
    try:
        result = write.fn(db)
    except sqlite3.Error:
        raise  # the transaction fails as a whole
    except Exception as exc:
        db.execute("ROLLBACK TO roost_write")
        db.execute("RELEASE roost_write")
        return False, exc
    if not db.in_transaction:
        raise sqlite3.ProgrammingError(f"write {write.operation!r} ended the transaction")
    db.execute("RELEASE roost_write")
    return True, result


def _retrieve(future: asyncio.Future[Any]) -> None:
    # An outcome nobody awaits (a lazy write, a cancelled caller) must not log
    # "exception was never retrieved".
    if not future.cancelled():
        future.exception()

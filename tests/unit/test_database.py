"""``Database``, the one owner of the state file, on real SQLite files: group commit
across repositories, all-or-nothing batches, order, cancellation, lazy writes,
read isolation, reopening, schema refusals and file modes.

To put several writes into one transaction deterministically, ``writer_held``
keeps the writer thread busy inside a write function while the test queues
writes (as tasks, polled with ``Database.queued``), then lets it go: everything
queued meanwhile is the next batch. No test sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Awaitable
from types import SimpleNamespace
from typing import Any

import pytest

from roost.adapters import sqlite_database
from roost.adapters.sqlite_database import SCHEMA_VERSION, Database
from roost.adapters.sqlite_inbox import SqliteInbox
from roost.adapters.sqlite_store import SqliteStore
from roost.core.records import AgentRecord
from roost.errors import Conflict, StorageFull, StoreError
from tests.conftest import wait_until

DEADLINE = 30.0
INSERT = "INSERT INTO scratch (n) VALUES (?)"


@pytest.fixture
async def database(tmp_path: pathlib.Path) -> AsyncIterator[Database]:
    """An open database with a ``scratch (n)`` table for tests of the mechanism."""
    db = Database(tmp_path / "roost.db")
    await db.open()
    await db.execute("create scratch", "CREATE TABLE scratch (n INTEGER NOT NULL)")
    yield db
    await db.close()


async def scratch(database: Database) -> list[int]:
    return [row[0] for row in await database.fetch_all("SELECT n FROM scratch ORDER BY rowid")]


@contextlib.asynccontextmanager
async def writer_held(database: Database) -> AsyncIterator[None]:
    """Inside: the writer thread is busy in a write function, so writes queue up.
    On leaving: it is released, and its own write has committed."""
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()
    release = threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(entered.set)
        release.wait(DEADLINE)

    task = asyncio.create_task(database.write("hold the writer", hold))
    try:
        async with asyncio.timeout(DEADLINE):
            await entered.wait()
        yield
    finally:
        release.set()
        await task


async def queue_all(database: Database, *writes: Awaitable[Any]) -> list[asyncio.Task[Any]]:
    """Start ``writes`` as tasks (they queue in this order) and wait until all are queued."""
    before = database.queued
    tasks = [asyncio.ensure_future(write) for write in writes]
    await wait_until(
        lambda: database.queued == before + len(tasks), timeout=DEADLINE, what="writes queued"
    )
    return tasks


# -- group commit -------------------------------------------------------------------


async def test_store_and_inbox_writes_commit_in_one_transaction_when_queued_together(
    database: Database,
) -> None:
    store = SqliteStore(database)
    inbox = SqliteInbox(database)
    await inbox.open()
    commits, writes = database.commits, database.writes

    async with writer_held(database):
        tasks = await queue_all(
            database,
            store.insert_agent(AgentRecord(name="echo"), {"image": "x"}),
            inbox.enqueue("echo", b'{"hi": 1}'),
        )
    inserted, (message, created) = await asyncio.gather(*tasks)

    # The held write's transaction, then one transaction for both repositories' writes.
    assert database.commits == commits + 2
    assert database.writes == writes + 3
    assert created
    stored = await store.get_agent("echo")
    assert stored is not None
    assert stored.record == inserted
    assert await inbox.get("echo", message.id) == message


async def test_every_write_fails_and_nothing_is_stored_when_one_write_of_the_batch_fails(
    database: Database, tmp_path: pathlib.Path
) -> None:
    store = SqliteStore(database)
    inbox = SqliteInbox(database)
    await inbox.open()
    commits = database.commits

    async with writer_held(database):
        tasks = await queue_all(
            database,
            store.insert_agent(AgentRecord(name="echo"), {}),
            database.execute("break things", "INSERT INTO no_such_table VALUES (1)"),
            inbox.enqueue("echo", b'{"hi": 1}'),
        )
    inserted, broken, enqueued = await asyncio.gather(*tasks, return_exceptions=True)

    for error in (inserted, broken, enqueued):
        assert isinstance(error, StoreError)
        assert isinstance(error.__cause__, sqlite3.OperationalError)
        assert str(tmp_path / "roost.db") in str(error)
    assert "break things failed: no such table: no_such_table" in str(broken)
    assert "insert agent failed: rolled back with its transaction, in which 'break things'" in (
        str(inserted)
    )
    assert "enqueue message failed: rolled back" in str(enqueued)
    assert database.commits == commits + 1  # only the held write's
    assert await store.get_agent("echo") is None  # written before the failure, rolled back
    assert await inbox.list_messages("echo") == []
    assert inbox.pending_count("echo") == 0
    # Nothing was left open: the same writes go through now.
    await store.insert_agent(AgentRecord(name="echo"), {})
    await inbox.enqueue("echo", b'{"hi": 2}')
    assert inbox.pending_count("echo") == 1


async def test_only_the_refusing_write_is_undone_when_a_write_function_raises(
    database: Database,
) -> None:
    def insert_then_refuse(db: sqlite3.Connection) -> None:
        db.execute(INSERT, (2,))
        raise Conflict("two is taken")

    async with writer_held(database):
        tasks = await queue_all(
            database,
            database.execute("one", INSERT, (1,)),
            database.write("two", insert_then_refuse),
            database.execute("three", INSERT, (3,)),
        )
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert results[0] is None
    assert isinstance(results[1], Conflict)
    assert str(results[1]) == "two is taken"
    assert results[2] is None
    assert await scratch(database) == [1, 3]


async def test_writes_apply_in_call_order_when_kinds_are_mixed_in_one_batch(
    database: Database,
) -> None:
    def insert(n: int) -> Any:
        return lambda db: db.execute(INSERT, (n,))

    async def lazily(n: int) -> None:
        await database.execute_lazily("lazy", INSERT, (n,))

    writes: list[Awaitable[Any]] = []
    for n in range(40):
        match n % 4:
            case 0:
                writes.append(database.execute("plain", INSERT, (n,)))
            case 1:
                writes.append(
                    database.execute_returning("returning", f"{INSERT} RETURNING n", (n,))
                )
            case 2:
                writes.append(database.write("function", insert(n)))
            case _:
                writes.append(lazily(n))
    commits = database.commits

    async with writer_held(database):
        tasks = await queue_all(database, *writes)
    results = await asyncio.gather(*tasks)

    assert await scratch(database) == list(range(40))
    assert results[1] == [(1,)]
    assert database.commits == commits + 2


async def test_a_series_keeps_its_order_when_spread_over_many_transactions(
    database: Database,
) -> None:
    await asyncio.gather(*(database.execute("series", INSERT, (n,)) for n in range(300)))

    assert await scratch(database) == list(range(300))
    assert database.commits < database.writes  # group commit did group


# -- cancellation -------------------------------------------------------------------


async def test_write_commits_whole_when_its_caller_is_cancelled_while_queued(
    database: Database,
) -> None:
    async with writer_held(database):
        [task] = await queue_all(database, database.execute("cancelled caller", INSERT, (1,)))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await database.flush()

    assert await scratch(database) == [1]
    await database.execute("next", INSERT, (2,))
    assert await scratch(database) == [1, 2]


async def test_write_commits_whole_when_its_caller_is_cancelled_while_it_runs(
    database: Database,
) -> None:
    loop = asyncio.get_running_loop()
    inside = asyncio.Event()
    release = threading.Event()

    def insert_slowly(db: sqlite3.Connection) -> None:
        db.execute(INSERT, (1,))
        loop.call_soon_threadsafe(inside.set)
        release.wait(DEADLINE)
        db.execute(INSERT, (2,))

    task = asyncio.create_task(database.write("slow", insert_slowly))
    async with asyncio.timeout(DEADLINE):
        await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await database.flush()

    assert await scratch(database) == [1, 2]


# -- reads, lazy writes, lifecycle ----------------------------------------------------


async def test_reads_see_only_committed_writes_when_a_transaction_is_open(
    database: Database,
) -> None:
    loop = asyncio.get_running_loop()
    inside = asyncio.Event()
    release = threading.Event()

    def insert_then_wait(db: sqlite3.Connection) -> None:
        db.execute(INSERT, (7,))
        loop.call_soon_threadsafe(inside.set)
        release.wait(DEADLINE)

    task = asyncio.create_task(database.write("slow insert", insert_then_wait))
    async with asyncio.timeout(DEADLINE):
        await inside.wait()
    try:
        assert await scratch(database) == []  # inserted, not committed: invisible
    finally:
        release.set()
    await task
    assert await scratch(database) == [7]


async def test_lazy_write_commits_alone_when_nothing_else_comes(tmp_path: pathlib.Path) -> None:
    database = Database(tmp_path / "roost.db", lazy_commit_delay=0.01)
    await database.open()
    try:
        await database.execute("create scratch", "CREATE TABLE scratch (n INTEGER NOT NULL)")
        commits = database.commits

        async with asyncio.timeout(DEADLINE):
            await database.execute_lazily("lazy", INSERT, (1,))

        assert database.commits == commits + 1
        assert await scratch(database) == [1]
    finally:
        await database.close()


async def test_lazy_write_rides_with_the_next_write_when_one_comes(
    tmp_path: pathlib.Path,
) -> None:
    database = Database(tmp_path / "roost.db", lazy_commit_delay=3600)
    await database.open()
    try:
        await database.execute("create scratch", "CREATE TABLE scratch (n INTEGER NOT NULL)")
        commits = database.commits

        lazy = database.execute_lazily("lazy", INSERT, (1,))
        await database.execute("eager", INSERT, (2,))

        assert lazy.done()
        assert database.commits == commits + 1
        assert await scratch(database) == [1, 2]
    finally:
        await database.close()


async def test_close_commits_queued_writes_and_reopen_finds_them_when_closed_and_reopened(
    tmp_path: pathlib.Path,
) -> None:
    database = Database(tmp_path / "roost.db", lazy_commit_delay=3600)
    await database.open()
    await database.execute("create scratch", "CREATE TABLE scratch (n INTEGER NOT NULL)")
    lazy = database.execute_lazily("lazy", INSERT, (1,))

    await database.close()
    await database.close()  # idempotent

    assert lazy.done()
    assert not database.is_open
    with pytest.raises(StoreError, match="not open"):
        await database.fetch_all("SELECT n FROM scratch")
    with pytest.raises(StoreError, match="not open"):
        await database.execute("after close", INSERT, (2,))
    with pytest.raises(StoreError, match="not open"):
        database.execute_lazily("after close", INSERT, (2,))

    await database.open()  # the same object again
    try:
        assert database.is_open
        assert await database.schema_version() == SCHEMA_VERSION
        await database.execute("after reopen", INSERT, (2,))
        assert await scratch(database) == [1, 2]
    finally:
        await database.close()


async def test_write_fails_and_database_keeps_working_when_a_function_ends_the_transaction(
    database: Database,
) -> None:
    with pytest.raises(StoreError, match="ended the transaction"):
        await database.write("rogue", lambda db: db.execute("COMMIT"))

    await database.execute("next", INSERT, (1,))
    assert await scratch(database) == [1]


# -- opening: schema, foreign files, modes --------------------------------------------


def user_version(path: pathlib.Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("PRAGMA user_version").fetchone()[0])


async def test_open_raises_store_error_naming_versions_when_db_is_newer(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "roost.db"
    database = Database(path)
    await database.open()
    await database.close()
    newer = SCHEMA_VERSION + 7
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {newer}")

    with pytest.raises(StoreError) as raised:
        await database.open()

    message = str(raised.value)
    assert str(path) in message
    assert f"version {newer}" in message
    assert f"version {SCHEMA_VERSION}" in message
    assert not database.is_open
    assert user_version(path) == newer  # refused, not "migrated" down


async def test_open_raises_store_error_naming_path_when_file_is_not_sqlite(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "roost.db"
    garbage = b"this is not a database, it is a shopping list\n" * 200
    path.write_bytes(garbage)

    with pytest.raises(StoreError, match="not a usable SQLite database") as raised:
        await Database(path).open()

    assert str(path) in str(raised.value)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes() == garbage


async def test_open_raises_store_error_when_file_belongs_to_another_program(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA application_id = 42")
        connection.execute("CREATE TABLE mine (x)")

    with pytest.raises(StoreError, match="another program") as raised:
        await Database(path).open()

    assert str(path) in str(raised.value)


def file_modes(directory: pathlib.Path, *names: str) -> dict[str, int]:
    return {name: stat.S_IMODE((directory / name).stat().st_mode) for name in names}


async def test_state_files_are_created_private_when_umask_would_allow_more(
    tmp_path: pathlib.Path,
) -> None:
    names = ("roost.db", "roost.db-wal", "roost.db-shm")
    database = Database(tmp_path / "roost.db")
    previous = os.umask(0)  # SQLite alone would create 0644 files now
    try:
        await database.open()
        await database.execute("write to the WAL", "CREATE TABLE t (x INTEGER)")
        modes = await asyncio.to_thread(file_modes, tmp_path, *names)
    finally:
        os.umask(previous)
        await database.close()

    assert modes == dict.fromkeys(names, 0o600)


async def test_existing_file_keeps_its_mode_when_opened(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "roost.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    database = Database(path)
    await database.open()
    await database.close()

    assert await asyncio.to_thread(file_modes, tmp_path, "roost.db") == {"roost.db": 0o640}


async def test_check_writable_refuses_until_the_file_system_has_headroom_when_disk_was_full(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = 1 << 30
    free = {"bytes": 4096}  # a one-page write might still fit: not enough

    def usage(path: object) -> SimpleNamespace:
        return SimpleNamespace(total=total, used=total - free["bytes"], free=free["bytes"])

    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.raises(StorageFull, match="4096 bytes free"):
        await database.check_writable()
    free["bytes"] = sqlite_database.HEADROOM_BYTES
    await database.check_writable()
    assert await database.schema_version() == SCHEMA_VERSION

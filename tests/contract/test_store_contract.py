"""Contract tests for the ``Store`` port.

The first half runs against every implementation through the parametrised
``store`` fixture (only ``SqliteStore`` on a ``Database`` today; an in-memory
fake joins by adding a param). The second half checks what only a file-backed
store can promise: migrations, refusing foreign or newer files, all-or-nothing
writes, and surviving SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import sqlite3
import sys
import tempfile
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.adapters.sqlite_database import SCHEMA_VERSION, Database
from roost.adapters.sqlite_store import SqliteStore
from roost.core.records import AgentRecord, ExitInfo, StateChange
from roost.core.states import AgentState
from roost.errors import Conflict, NotFound, StoreError
from roost.ports.store import Store

SUBPROCESS_DEADLINE = 30.0

SPEC = {"image": "roost-mimic:latest", "port": 8000, "env": {"MODE": "echo"}, "cpus": 0.5}


@contextlib.asynccontextmanager
async def opened(
    path: pathlib.Path, *, wall_clock: Callable[[], float] | None = None
) -> AsyncIterator[tuple[Database, SqliteStore]]:
    """An open ``Database`` at ``path`` and a ``SqliteStore`` on it; closed afterwards."""
    database = Database(path)
    await database.open()
    try:
        if wall_clock is None:
            yield database, SqliteStore(database)
        else:
            yield database, SqliteStore(database, wall_clock=wall_clock)
    finally:
        await database.close()


@contextlib.asynccontextmanager
async def opened_store(
    path: pathlib.Path, *, wall_clock: Callable[[], float] | None = None
) -> AsyncIterator[SqliteStore]:
    async with opened(path, wall_clock=wall_clock) as (_, store):
        yield store


def make_sqlite_store(directory: pathlib.Path) -> AbstractAsyncContextManager[Store]:
    return opened_store(directory / "roost.db", wall_clock=lambda: 1_700_000_000.0)


STORE_FACTORIES = {"sqlite": make_sqlite_store}


@pytest.fixture(params=sorted(STORE_FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    async with STORE_FACTORIES[request.param](tmp_path) as implementation:
        await implementation.open()
        yield implementation
        await implementation.close()


def full_record(name: str = "echo") -> AgentRecord:
    """A record with every field away from its default."""
    return AgentRecord(
        name=name,
        state=AgentState.RESTARTING,
        container_id="c0ffee" * 10 + "abcd",
        url="http://127.0.0.1:49153",
        config_hash="sha256:1234",
        restart_count=2,
        last_exit=ExitInfo(
            exit_code=137,
            oom_killed=True,
            error="OOMKilled",
            finished_at="2024-05-01T12:00:00.123456789Z",
            log_tail="line 1\nline 2 ünïcødé\n",
        ),
        last_error="health check timed out",
        last_activity_at=1_700_000_123.25,
        state_since=1_700_000_200.5,
        running_since=1_700_000_100.0,
        restart_at=1_700_000_210.5,
        expected_exit=True,
        liveness_failures=3,
    )


# -- every Store --------------------------------------------------------------------


async def test_every_field_round_trips_when_inserted_and_read_back(store: Store) -> None:
    record = full_record()

    inserted = await store.insert_agent(record, SPEC, source="api")

    assert inserted == record.replace(version=1)
    stored = await store.get_agent("echo")
    assert stored is not None
    assert stored.record == inserted
    assert stored.record.last_exit == record.last_exit
    assert stored.spec == SPEC
    assert list(stored.spec) == list(SPEC)  # key order kept: "exactly as given"
    assert stored.source == "api"


async def test_defaults_round_trip_when_record_is_minimal(store: Store) -> None:
    record = AgentRecord(name="bare")

    await store.insert_agent(record, {})

    stored = await store.get_agent("bare")
    assert stored is not None
    assert stored.record == record.replace(version=1)
    assert stored.record.last_exit is None
    assert stored.spec == {}
    assert stored.source == "config"


async def test_update_writes_every_field_when_version_matches(store: Store) -> None:
    inserted = await store.insert_agent(AgentRecord(name="echo"), SPEC)
    wanted = full_record().replace(version=inserted.version)

    updated = await store.update_agent(wanted)

    assert updated == wanted.replace(version=2)
    stored = await store.get_agent("echo")
    assert stored is not None
    assert stored.record == updated


async def test_get_returns_none_when_agent_is_unknown(store: Store) -> None:
    assert await store.get_agent("nobody") is None


async def test_list_returns_every_agent_when_several_exist(store: Store) -> None:
    for name in ("b", "a", "c"):
        await store.insert_agent(AgentRecord(name=name), {"name": name})

    agents = await store.list_agents()

    assert sorted(agent.record.name for agent in agents) == ["a", "b", "c"]
    assert {agent.record.name: agent.spec for agent in agents}["b"] == {"name": "b"}


async def test_insert_raises_conflict_when_name_exists(store: Store) -> None:
    await store.insert_agent(AgentRecord(name="echo", config_hash="first"), SPEC)

    with pytest.raises(Conflict, match="echo"):
        await store.insert_agent(AgentRecord(name="echo", config_hash="second"), {})

    stored = await store.get_agent("echo")
    assert stored is not None
    assert stored.record.config_hash == "first"
    assert stored.spec == SPEC


async def test_update_raises_conflict_and_writes_nothing_when_version_is_stale(
    store: Store,
) -> None:
    v1 = await store.insert_agent(AgentRecord(name="echo"), SPEC)
    v2 = await store.update_agent(
        v1.replace(state=AgentState.STARTING),
        changes=[StateChange(AgentState.CREATED, AgentState.STARTING, "start", 1.0)],
    )

    stale = v1.replace(state=AgentState.FAILED, last_error="stale writer")
    with pytest.raises(Conflict) as raised:
        await store.update_agent(
            stale, changes=[StateChange(AgentState.CREATED, AgentState.FAILED, "stale", 2.0)]
        )

    message = str(raised.value)
    assert "echo" in message
    assert "version 2" in message
    assert "version 1" in message
    stored = await store.get_agent("echo")
    assert stored is not None
    assert stored.record == v2
    assert [entry.change.reason for entry in await store.history("echo")] == ["start"]


async def test_update_raises_not_found_when_agent_is_missing(store: Store) -> None:
    with pytest.raises(NotFound, match="ghost"):
        await store.update_agent(AgentRecord(name="ghost", version=1))


async def test_exactly_one_update_wins_when_two_tasks_share_a_base_version(
    store: Store,
) -> None:
    base = await store.insert_agent(AgentRecord(name="echo"), SPEC)

    async def write(state: AgentState) -> AgentRecord:
        return await store.update_agent(
            base.replace(state=state),
            changes=[StateChange(AgentState.CREATED, state, f"to {state}", 1.0)],
        )

    results = await asyncio.gather(
        write(AgentState.STARTING), write(AgentState.FAILED), return_exceptions=True
    )

    winners = [result for result in results if isinstance(result, AgentRecord)]
    losers = [result for result in results if isinstance(result, Conflict)]
    assert len(winners) == 1
    assert len(losers) == 1
    stored = await store.get_agent("echo")
    assert stored is not None
    assert stored.record == winners[0]
    assert stored.record.version == 2
    history = await store.history("echo")
    assert [entry.change.to_state for entry in history] == [winners[0].state]


async def test_history_lists_changes_oldest_first_with_reasons_when_written(
    store: Store,
) -> None:
    record = await store.insert_agent(AgentRecord(name="echo"), SPEC)
    record = await store.update_agent(
        record.replace(state=AgentState.RUNNING),
        changes=[
            StateChange(AgentState.CREATED, AgentState.STARTING, "message arrived", 10.0),
            StateChange(AgentState.STARTING, AgentState.RUNNING, "healthy", 11.5),
        ],
    )
    await store.update_agent(
        record.replace(state=AgentState.CRASHED),
        changes=[StateChange(AgentState.RUNNING, AgentState.CRASHED, "exit code 1", 20.0)],
    )
    await store.insert_agent(AgentRecord(name="other"), {})
    other = await store.get_agent("other")
    assert other is not None
    await store.update_agent(
        other.record.replace(state=AgentState.STARTING),
        changes=[StateChange(AgentState.CREATED, AgentState.STARTING, "other start", 12.0)],
    )

    history = await store.history("echo")

    assert [(h.change.from_state, h.change.to_state, h.change.reason) for h in history] == [
        (AgentState.CREATED, AgentState.STARTING, "message arrived"),
        (AgentState.STARTING, AgentState.RUNNING, "healthy"),
        (AgentState.RUNNING, AgentState.CRASHED, "exit code 1"),
    ]
    assert [h.change.at for h in history] == [10.0, 11.5, 20.0]
    assert all(h.agent == "echo" for h in history)
    assert [h.seq for h in history] == sorted({h.seq for h in history})
    newest_two = await store.history("echo", limit=2)
    assert [h.change.reason for h in newest_two] == ["healthy", "exit code 1"]


async def test_update_without_changes_writes_no_history_when_state_is_same(
    store: Store,
) -> None:
    record = await store.insert_agent(AgentRecord(name="echo"), SPEC)

    updated = await store.update_agent(record.replace(last_activity_at=5.0))

    assert updated.version == 2
    assert await store.history("echo") == []


async def test_update_spec_replaces_spec_and_keeps_version_when_agent_exists(
    store: Store,
) -> None:
    record = await store.insert_agent(AgentRecord(name="echo"), SPEC)

    await store.update_spec("echo", {"image": "new:1"}, source="api")

    stored = await store.get_agent("echo")
    assert stored is not None
    assert stored.spec == {"image": "new:1"}
    assert stored.source == "api"
    assert stored.record == record
    with pytest.raises(NotFound, match="ghost"):
        await store.update_spec("ghost", {}, source="api")


async def test_delete_removes_agent_and_history_when_agent_exists(store: Store) -> None:
    record = await store.insert_agent(AgentRecord(name="echo"), SPEC)
    await store.update_agent(
        record.replace(state=AgentState.STARTING),
        changes=[StateChange(AgentState.CREATED, AgentState.STARTING, "start", 1.0)],
    )

    assert await store.delete_agent("echo") is True

    assert await store.get_agent("echo") is None
    assert await store.history("echo") == []
    assert await store.delete_agent("echo") is False
    # The name is free again, and starts a fresh history.
    again = await store.insert_agent(AgentRecord(name="echo"), SPEC)
    assert again.version == 1
    assert await store.history("echo") == []


# -- SqliteStore on a Database: files, migrations, durability --------------------------


def user_version(path: pathlib.Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("PRAGMA user_version").fetchone()[0])


async def test_schema_is_created_when_file_is_empty(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "roost.db"
    path.touch()

    async with opened(path) as (database, store):
        await store.open()
        assert await database.schema_version() == SCHEMA_VERSION
        await store.insert_agent(AgentRecord(name="echo"), SPEC)

    assert user_version(path) == SCHEMA_VERSION
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_reopen_keeps_data_and_schema_when_opened_twice(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "roost.db"
    database = Database(path)
    await database.open()
    await database.open()  # idempotent on the same instance
    first = SqliteStore(database)
    await first.open()
    inserted = await first.insert_agent(full_record(), SPEC)
    await first.close()
    await database.close()
    await database.close()

    async with opened_store(path) as second:
        stored = await second.get_agent("echo")
        assert stored is not None
        assert stored.record == inserted


# Refusing newer, foreign and non-SQLite files: tests/unit/test_database.py.


async def test_calls_raise_store_error_when_database_is_not_open(tmp_path: pathlib.Path) -> None:
    store = SqliteStore(Database(tmp_path / "roost.db"))

    with pytest.raises(StoreError, match="not open"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):
        await store.get_agent("echo")
    with pytest.raises(StoreError, match="not open"):
        await store.insert_agent(AgentRecord(name="echo"), SPEC)


async def test_failed_write_keeps_earlier_data_when_history_row_is_rejected(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "roost.db"
    async with opened_store(path) as store:
        inserted = await store.insert_agent(full_record(), SPEC)
        # The history row's ``at`` is not a number: SQLite rejects it inside the
        # transaction, after the agent's UPDATE has already run.
        bad_change = StateChange(AgentState.CREATED, AgentState.RUNNING, "x", "soon")  # type: ignore[arg-type]
        with pytest.raises(StoreError) as raised:
            await store.update_agent(
                inserted.replace(state=AgentState.RUNNING), changes=[bad_change]
            )
        assert isinstance(raised.value.__cause__, sqlite3.Error)
        assert str(path) in str(raised.value)
        assert "update agent" in str(raised.value)
        stored = await store.get_agent("echo")
        assert stored is not None
        assert stored.record == inserted  # the UPDATE was rolled back with the history
        assert await store.history("echo") == []
        # No transaction was left open: the next write goes through.
        updated = await store.update_agent(inserted.replace(state=AgentState.RUNNING))
        assert updated.version == 2


@pytest.mark.parametrize(
    "statement",
    ["(queued)", "BEGIN IMMEDIATE", "UPDATE agents", "INSERT INTO agent_history", "COMMIT"],
)
async def test_write_commits_whole_when_its_caller_is_cancelled_during_a_statement(
    tmp_path: pathlib.Path, statement: str
) -> None:
    """Once queued, a write is applied whole: cancelling its caller at any point,
    even while the writer thread is inside one of its statements, only stops the
    caller waiting. (All-or-nothing, and here always "all".)"""
    async with opened(tmp_path / "roost.db") as (database, store):
        record = await store.insert_agent(AgentRecord(name="echo"), SPEC)
        changes = [
            StateChange(AgentState.CREATED, AgentState.STARTING, f"change {i}", float(i))
            for i in range(50)
        ]
        loop = asyncio.get_running_loop()
        reached = asyncio.Event()
        armed = threading.Event()  # set once only the update's statements follow
        release = threading.Event()

        def on_statement(sql: str) -> None:  # on the writer thread, as a statement starts
            if armed.is_set() and not reached.is_set() and sql.startswith(statement):
                loop.call_soon_threadsafe(reached.set)
                release.wait(SUBPROCESS_DEADLINE)  # hold the writer inside the statement

        def hold_writer(db: sqlite3.Connection) -> None:  # keeps the next write queued
            loop.call_soon_threadsafe(reached.set)
            release.wait(SUBPROCESS_DEADLINE)

        if statement == "(queued)":
            gate = asyncio.create_task(database.write("gate", hold_writer))
        else:
            await database.write("trace", lambda db: db.set_trace_callback(on_statement))
            armed.set()  # the trace write has committed: what comes next is the update
        write = asyncio.create_task(
            store.update_agent(record.replace(state=AgentState.STARTING), changes=changes)
        )
        async with asyncio.timeout(SUBPROCESS_DEADLINE):
            await reached.wait()
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        release.set()
        if statement == "(queued)":
            await gate
        else:
            await database.write("untrace", lambda db: db.set_trace_callback(None))
        # Nobody awaits the cancelled write: wait until what was queued has committed
        # (the gate's own commit returns before the transaction after it ends).
        await database.flush()

        stored = await store.get_agent("echo")
        assert stored is not None
        assert stored.record.version == 2
        assert len(await store.history("echo", limit=1000)) == len(changes)
        # No transaction was left open: the next write goes through.
        again = await store.update_agent(stored.record.replace(last_error="after cancel"))
        assert again.version == 3


SIGKILL_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from roost.adapters.sqlite_database import Database
    from roost.adapters.sqlite_store import SqliteStore
    from roost.core.records import AgentRecord, StateChange
    from roost.core.states import AgentState

    async def main():
        database = Database(sys.argv[1])
        await database.open()
        store = SqliteStore(database)
        record = await store.insert_agent(AgentRecord(name="survivor"), {"image": "x"})
        await store.update_agent(
            record.replace(state=AgentState.RUNNING, container_id="abc"),
            changes=[StateChange(AgentState.CREATED, AgentState.RUNNING, "committed", 1.0)],
        )
        print("committed", flush=True)
        await asyncio.Event().wait()  # block until killed; never close the database

    asyncio.run(main())
    """
)


async def test_committed_write_survives_when_writer_process_is_sigkilled(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "roost.db"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIGKILL_WRITER,
        str(path),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), SUBPROCESS_DEADLINE)
        assert line == b"committed\n"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        returncode = await asyncio.wait_for(process.wait(), SUBPROCESS_DEADLINE)
    assert returncode == -signal.SIGKILL
    # The WAL was never checkpointed into the main file: the data lives in -wal.
    wal = await asyncio.to_thread(pathlib.Path(f"{path}-wal").stat)
    assert wal.st_size > 0

    async with opened_store(path) as store:
        stored = await store.get_agent("survivor")
        assert stored is not None
        assert stored.record.state == AgentState.RUNNING
        assert stored.record.container_id == "abc"
        assert stored.record.version == 2
        assert [h.change.reason for h in await store.history("survivor")] == ["committed"]


# -- property: versions and history under random update sequences ---------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(list(AgentState)),
        st.booleans(),  # write from a stale version?
        st.integers(min_value=0, max_value=3),  # number of history rows
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(steps=operations)
def test_version_increases_and_history_counts_changes_when_updates_are_random(
    steps: list[tuple[AgentState, bool, int]],
) -> None:
    async def scenario(directory: pathlib.Path) -> None:
        async with opened_store(directory / "roost.db") as store:
            current = await store.insert_agent(AgentRecord(name="prop"), {})
            previous: AgentRecord | None = None
            versions = [current.version]
            written_changes = 0
            for step_number, (state, stale, change_count) in enumerate(steps):
                changes = [
                    StateChange(current.state, state, f"step {step_number}.{i}", float(i))
                    for i in range(change_count)
                ]
                if stale and previous is not None:
                    with pytest.raises(Conflict):
                        await store.update_agent(previous.replace(state=state), changes=changes)
                    continue
                previous, current = (
                    current,
                    await store.update_agent(current.replace(state=state), changes=changes),
                )
                versions.append(current.version)
                written_changes += change_count

            assert versions == sorted(set(versions))  # strictly increasing
            stored = await store.get_agent("prop")
            assert stored is not None
            assert stored.record == current
            history = await store.history("prop", limit=1000)
            assert len(history) == written_changes
            assert [h.seq for h in history] == sorted({h.seq for h in history})

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(pathlib.Path(directory)))


# -- exits ------------------------------------------------------------------------------


async def test_exits_are_kept_newest_first_and_completed_by_container_when_written(
    store: Store,
) -> None:
    record = await store.insert_agent(AgentRecord(name="crashy"), SPEC)
    for n in range(12):
        crash = ExitInfo(exit_code=n, container_id=f"c{n}")
        record = await store.update_agent(record.replace(last_exit=crash), exit=crash)
    # the last one's diagnostics arrive later (ExitDetails): its row is completed
    detailed = ExitInfo(exit_code=11, oom_killed=True, log_tail="boom\n", container_id="c11")
    record = await store.update_agent(record.replace(last_exit=detailed), exit=detailed)
    exits = await store.exits("crashy")
    assert [e.exit_code for e in exits] == [11, 10, 9, 8, 7, 6, 5, 4, 3, 2]  # 10 kept
    assert exits[0].oom_killed is True
    assert exits[0].log_tail == "boom\n"
    assert exits[0].container_id == "c11"
    vanished = ExitInfo(error="container vanished")
    await store.update_agent(record.replace(last_exit=vanished), exit=vanished)
    newest = (await store.exits("crashy", limit=1))[0]
    assert newest.error == "container vanished"
    assert newest.container_id is None


async def test_exit_is_kept_as_given_when_it_is_not_the_records_last_exit(
    store: Store,
) -> None:
    record = await store.insert_agent(AgentRecord(name="apart"), SPEC)
    kept = ExitInfo(exit_code=3, error="oops", container_id="c3")
    stored = await store.update_agent(record.replace(last_exit=ExitInfo(exit_code=9)), exit=kept)
    exits = await store.exits("apart")
    assert [(e.exit_code, e.error, e.container_id) for e in exits] == [(3, "oops", "c3")]
    found = await store.get_agent("apart")
    assert found is not None
    assert found.record.last_exit == stored.last_exit
    assert found.record.last_exit is not None
    assert found.record.last_exit.exit_code == 9


async def test_exits_go_with_the_agent_when_it_is_deleted(store: Store) -> None:
    record = await store.insert_agent(AgentRecord(name="gone"), SPEC)
    crash = ExitInfo(exit_code=1, container_id="c1")
    await store.update_agent(record.replace(last_exit=crash), exit=crash)
    assert await store.delete_agent("gone")
    assert await store.exits("gone") == []

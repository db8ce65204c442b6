"""``SqliteInbox`` on a real ``Database``: order, idempotency, statuses, limits, reopening."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from roost.adapters.sqlite_database import Database
from roost.adapters.sqlite_inbox import SqliteInbox
from roost.ports.inbox import MessageStatus, QueueFull

M = MessageStatus


def J(value: Any) -> bytes:
    """A JSON text, as the API hands the inbox a checked body."""
    return json.dumps(value).encode()


def V(text: bytes | None) -> Any:
    assert text is not None
    return json.loads(text)


async def _open(path: Path) -> tuple[Database, SqliteInbox]:
    database = Database(path)
    await database.open()
    inbox = SqliteInbox(database)
    await inbox.open()
    return database, inbox


async def _close(database: Database, inbox: SqliteInbox) -> None:
    await inbox.close()
    await database.close()


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(tmp_path / "roost.db")
    await db.open()
    yield db
    await db.close()


@pytest.fixture
async def inbox(database: Database) -> AsyncIterator[SqliteInbox]:
    box = SqliteInbox(database)
    await box.open()
    yield box
    await box.close()


async def test_messages_keep_acceptance_order_when_enqueued_concurrently(
    database: Database, inbox: SqliteInbox
) -> None:
    results = await asyncio.gather(*(inbox.enqueue("a", J({"i": i})) for i in range(200)))
    seqs = [message.seq for message, _ in results]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 200
    queued = await inbox.next_queued("a", after_seq=0, limit=1000)
    assert [V(m.body)["i"] for m in queued] == list(range(200))
    assert inbox.pending_count("a") == 200
    # group commit: fewer transactions than writes
    assert database.commits < database.writes


async def test_next_queued_pages_after_seq_when_asked_for_a_batch(inbox: SqliteInbox) -> None:
    for i in range(5):
        await inbox.enqueue("a", J(i))
    await inbox.enqueue("b", J("other agent"))
    first = await inbox.next_queued("a", after_seq=0, limit=2)
    rest = await inbox.next_queued("a", after_seq=first[-1].seq, limit=10)
    assert [V(m.body) for m in first + rest] == [0, 1, 2, 3, 4]
    newest = await inbox.list_messages("a", limit=2)
    assert [V(m.body) for m in newest] == [3, 4]
    page = await inbox.list_messages("a", limit=2, after_seq=first[0].seq)
    assert [V(m.body) for m in page] == [1, 2]


async def test_same_idempotency_key_returns_one_message_when_posted_twice(
    inbox: SqliteInbox,
) -> None:
    first, created = await inbox.enqueue("a", J({"x": 1}), idempotency_key="k1")
    again, created_again = await inbox.enqueue("a", J({"x": 2}), idempotency_key="k1")
    other_agent, created_other = await inbox.enqueue("b", J({"x": 3}), idempotency_key="k1")
    assert created
    assert not created_again
    assert created_other
    assert again.id == first.id
    assert V(again.body) == {"x": 1}
    assert other_agent.id != first.id
    assert len(await inbox.list_messages("a")) == 1
    assert inbox.pending_count("a") == 1


async def test_same_idempotency_key_stores_one_row_when_posted_concurrently(
    inbox: SqliteInbox,
) -> None:
    results = await asyncio.gather(
        *(inbox.enqueue("a", J({"n": n}), idempotency_key="same") for n in range(20))
    )
    assert len({m.id for m, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(await inbox.list_messages("a")) == 1
    assert inbox.pending_count("a") == 1


async def test_queue_full_stores_nothing_when_limit_reached(inbox: SqliteInbox) -> None:
    for i in range(3):
        await inbox.enqueue("a", J(i), limit=3)
    with pytest.raises(QueueFull) as caught:
        await inbox.enqueue("a", J(99), limit=3)
    assert caught.value.pending == 3
    assert [V(m.body) for m in await inbox.list_messages("a")] == [0, 1, 2]
    # another agent has its own queue
    await inbox.enqueue("b", J(0), limit=3)


async def test_statuses_follow_delivery_when_marked(inbox: SqliteInbox) -> None:
    ok, _ = await inbox.enqueue("a", J("ok"))
    bad, _ = await inbox.enqueue("a", J("bad"))
    retry, _ = await inbox.enqueue("a", J("retry"))
    await inbox.mark_delivering(ok.id, attempts=1)
    got = await inbox.get("a", ok.id)
    assert got is not None
    assert got.status is M.DELIVERING
    assert got.attempts == 1
    await inbox.mark_delivered(ok, J({"answer": 42}))
    await inbox.mark_failed(bad, "HTTP 400: nope")
    await inbox.mark_delivering(retry.id, attempts=1)
    await inbox.mark_retry(retry.id, "HTTP 503", next_attempt_at=123.0)

    delivered = await inbox.get("a", ok.id)
    assert delivered is not None
    assert delivered.status is M.DELIVERED
    assert V(delivered.reply) == {"answer": 42}
    assert delivered.delivered_at is not None
    failed = await inbox.get("a", bad.id)
    assert failed is not None
    assert failed.status is M.FAILED
    assert failed.error == "HTTP 400: nope"
    retried = await inbox.get("a", retry.id)
    assert retried is not None
    assert retried.status is M.QUEUED
    assert retried.error == "HTTP 503"
    assert retried.next_attempt_at == 123.0
    assert inbox.pending_count("a") == 1
    assert [m.id for m in await inbox.list_messages("a", status=M.QUEUED)] == [retry.id]
    assert await inbox.get("b", ok.id) is None  # ids are per agent


async def test_dead_messages_are_requeued_in_order_when_agent_is_reset(
    inbox: SqliteInbox,
) -> None:
    done, _ = await inbox.enqueue("a", J(0))
    await inbox.mark_delivered(done, J("r"))
    waiting = [(await inbox.enqueue("a", J(i)))[0] for i in range(1, 4)]
    await inbox.mark_delivering(waiting[0].id, attempts=1)
    killed = await inbox.kill_pending("a", "agent 'a' failed")
    assert sorted(killed) == sorted(m.id for m in waiting)
    assert inbox.pending_count("a") == 0
    dead = await inbox.list_messages("a", status=M.DEAD)
    assert [V(m.body) for m in dead] == [1, 2, 3]
    assert all(m.error == "agent 'a' failed" for m in dead)
    # a late retry of a dead message does not resurrect it
    await inbox.mark_retry(waiting[0].id, "late", next_attempt_at=0.0)
    assert (await inbox.get("a", waiting[0].id)).status is M.DEAD  # type: ignore[union-attr]

    requeued = await inbox.requeue_dead("a")
    assert sorted(requeued) == sorted(killed)
    assert inbox.pending_count("a") == 3
    queued = await inbox.next_queued("a", after_seq=0, limit=10)
    assert [V(m.body) for m in queued] == [1, 2, 3]
    delivered = await inbox.get("a", done.id)
    assert delivered is not None
    assert delivered.status is M.DELIVERED


async def test_messages_survive_reopen_and_delivering_is_requeued_when_roost_restarts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "roost.db"
    database, inbox = await _open(path)
    messages = [
        (await inbox.enqueue("a", J({"i": i}), idempotency_key=f"k{i}"))[0] for i in range(4)
    ]
    await inbox.mark_delivered(messages[0], J("done"))
    await inbox.mark_delivering(messages[1].id, attempts=1)
    await _close(database, inbox)

    database, inbox = await _open(path)
    try:
        assert inbox.pending_count("a") == 3
        assert await inbox.recover() == ["a"]
        queued = await inbox.next_queued("a", after_seq=0, limit=10)
        assert [m.id for m in queued] == [m.id for m in messages[1:]]
        assert queued[0].attempts == 1
        again, created = await inbox.enqueue("a", J("x"), idempotency_key="k2")
        assert not created
        assert again.id == messages[2].id
        newer, _ = await inbox.enqueue("a", J("newer"))
        assert newer.seq > messages[-1].seq
    finally:
        await _close(database, inbox)


async def test_body_that_is_not_bytes_is_refused_when_enqueued(inbox: SqliteInbox) -> None:
    with pytest.raises(TypeError, match="bytes, not dict"):
        await inbox.enqueue("a", {"x": 1})  # type: ignore[arg-type]
    assert inbox.pending_count("a") == 0
    assert await inbox.list_messages("a") == []


async def test_body_and_reply_come_back_byte_for_byte_when_stored(inbox: SqliteInbox) -> None:
    # Spacing, key order, a repeated key, non-ASCII text and escapes: nothing is
    # normalised on the way in or out.
    body = '{ "b" : 1,\n"a": "\\u00e9t\\u00e9 é ✓", "b": [1 ,2] }'.encode()
    reply = '{"echo" :{ "a": "é" }}'.encode()
    message, _ = await inbox.enqueue("a", body)
    assert message.body == body
    (queued,) = await inbox.next_queued("a", after_seq=0, limit=10)
    assert queued.body == body
    await inbox.mark_delivered(queued, reply)
    stored = await inbox.get("a", message.id)
    assert stored is not None
    assert (stored.body, stored.reply) == (body, reply)
    assert stored.to_json()["body"] == {"a": "été é ✓", "b": [1, 2]}
    assert stored.to_json()["reply"] == {"echo": {"a": "é"}}


async def test_rows_of_older_versions_read_back_as_bytes_when_listed(
    database: Database, inbox: SqliteInbox
) -> None:
    # Before bodies were bytes, the inbox stored json.dumps of the parsed value as text.
    await database.execute(
        "an older version's row",
        "INSERT INTO messages (seq, id, agent, body, status, reply, created_at, updated_at) "
        "VALUES (99, 'old', 'a', ?, 'delivered', ?, 0, 0)",
        (json.dumps({"x": "é"}), json.dumps("text reply")),
    )
    (old,) = await inbox.list_messages("a")
    assert old.body == b'{"x": "\\u00e9"}'
    assert old.reply == b'"text reply"'
    assert old.to_json()["body"] == {"x": "é"}


async def test_listing_an_agents_messages_uses_an_index_when_no_status_is_asked(
    database: Database,
) -> None:
    for sql in (
        "SELECT * FROM messages WHERE agent = ? ORDER BY seq DESC LIMIT ?",
        "SELECT * FROM messages WHERE agent = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
    ):
        plan = await database.fetch_all("EXPLAIN QUERY PLAN " + sql, ("a", 1, 1)[: sql.count("?")])
        details = " ".join(str(row[-1]) for row in plan)
        assert "messages_by_agent" in details
        assert "TEMP B-TREE" not in details  # no sort of every row the agent ever had


async def test_close_commits_a_lazy_write_and_returns_when_one_is_still_queued(
    tmp_path: Path,
) -> None:
    path = tmp_path / "roost.db"
    database, inbox = await _open(path)
    message, _ = await inbox.enqueue("a", J({"i": 1}))
    inbox.mark_delivering(message.id, attempts=1)  # lazy: not awaited, still queued
    async with asyncio.timeout(10):  # a hang here was a bug: close waited forever
        await _close(database, inbox)

    database, inbox = await _open(path)
    try:
        stored = await inbox.get("a", message.id)
        assert stored is not None
        assert stored.status is M.DELIVERING
        assert stored.attempts == 1
    finally:
        await _close(database, inbox)

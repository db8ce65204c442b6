"""Delivery lanes on a FakeRuntime engine with a scripted agent, on fake time: order,
retry, 4xx, dead on failure, requeue on reset, recovery at start, the waking notice.

Retries wait out the dispatcher's real backoff (``DEFAULT_RETRY``) on ``FakeClock``:
the tests advance fake time instead of sleeping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from roost import errors
from roost.core.records import AgentRecord
from roost.core.states import AgentState
from roost.engine import Engine
from roost.ports.inbox import Message, MessageStatus, json_value
from roost.reactor.delivering import Dispatcher, _Lane
from roost.testing.fake_clock import FakeClock
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings
from tests.support import ScriptedAgent, advance_until

IMAGE = "roost-mimic:latest"
M = MessageStatus
S = AgentState


class Harness:
    def __init__(
        self, engine: Engine, runtime: FakeRuntime, agent: ScriptedAgent, clock: FakeClock
    ) -> None:
        self.engine = engine
        self.runtime = runtime
        self.agent = agent
        self.clock = clock

    async def until(self, predicate: Any, what: str) -> None:
        await advance_until(self.clock, predicate, step=0.05, what=what)

    async def wake(self) -> AgentRecord:
        waking = asyncio.ensure_future(self.engine.agents.wake("echo", reason="test", timeout=5))
        await self.until(waking.done, "echo awake")
        return waking.result()

    async def send(self, body: Any, name: str = "echo") -> Message:
        message, _ = await self.engine.dispatcher.submit(name, json.dumps(body).encode())
        return message

    async def status(self, message: Message) -> Message:
        stored = await self.engine.inbox.get(message.agent, message.id)
        assert stored is not None
        return stored

    async def wait_status(self, message: Message, status: MessageStatus) -> Message:
        async def reached() -> bool:
            return (await self.status(message)).status is status

        await self.until(reached, f"message {message.body!r} {status.value}")
        return await self.status(message)


def _engine(
    tmp_path: Path, runtime: FakeRuntime, agent: ScriptedAgent, clock: FakeClock, **defaults: Any
) -> Engine:
    settings = make_settings(
        tmp_path,
        "delivery-test",
        agents={"echo": {"image": IMAGE}},
        defaults={"max_restarts": 0, **defaults},
    )
    return Engine(settings, runtime=runtime, agent_client=agent, clock=clock)


def _parts() -> tuple[FakeRuntime, ScriptedAgent, FakeClock]:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    return runtime, ScriptedAgent(runtime), clock


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Harness]:
    runtime, agent, clock = _parts()
    async with _engine(tmp_path, runtime, agent, clock) as engine:
        yield Harness(engine, runtime, agent, clock)


async def test_messages_are_delivered_in_order_when_agent_starts_asleep(fake: Harness) -> None:
    assert fake.engine.agents.get("echo").state is S.CREATED
    sent = [await fake.send({"i": i}) for i in range(30)]
    last = await fake.wait_status(sent[-1], M.DELIVERED)
    assert [mid for mid, _ in fake.agent.deliveries] == [m.id for m in sent]
    assert [body["i"] for _, body in fake.agent.deliveries] == list(range(30))
    assert json_value(last.reply) == {"echo": {"i": 29}, "message_id": last.id}
    assert last.attempts == 1
    assert fake.engine.agents.get("echo").state is S.RUNNING
    assert fake.agent.most_in_flight == 1


async def test_server_errors_are_retried_before_later_messages_when_agent_answers_503(
    fake: Harness,
) -> None:
    flaky = await fake.send({"fail_first": 2})
    after = await fake.send({"i": "after"})
    await fake.wait_status(after, M.DELIVERED)
    delivered = await fake.status(flaky)
    assert delivered.status is M.DELIVERED
    assert delivered.attempts == 3
    assert [mid for mid, _ in fake.agent.deliveries] == [flaky.id] * 3 + [after.id]


async def test_client_error_fails_the_message_and_delivery_goes_on_when_agent_answers_4xx(
    fake: Harness,
) -> None:
    rejected = await fake.send({"status": 422})
    after = await fake.send({"i": 1})
    await fake.wait_status(after, M.DELIVERED)
    failed = await fake.status(rejected)
    assert failed.status is M.FAILED
    assert failed.attempts == 1
    assert failed.error.startswith("HTTP 422")
    assert "scripted" in failed.error


async def test_repeated_server_errors_fail_the_message_when_limit_reached(
    fake: Harness,
) -> None:
    fake.engine.dispatcher.max_server_errors = 3
    broken = await fake.send({"status": 500})
    failed = await fake.wait_status(broken, M.FAILED)
    assert failed.attempts == 3
    assert failed.error.startswith("HTTP 500")


async def test_waiting_messages_die_and_reset_delivers_them_when_agent_fails(
    fake: Harness,
) -> None:
    agents = fake.engine.agents
    await fake.wake()
    fake.agent.down = True  # deliveries find no connection: they wait, retrying
    sent = [await fake.send({"i": i}) for i in range(3)]
    await fake.until(lambda: fake.engine.inbox.pending_count("echo") == 3, "3 pending")
    container = agents.get("echo").container_id
    assert container is not None
    fake.runtime.crash(container, exit_code=2)  # max_restarts 0: failed at once
    await fake.until(lambda: agents.get("echo").state is S.FAILED, "failed")
    for message in sent:
        dead = await fake.wait_status(message, M.DEAD)
        assert "failed" in dead.error
    # a message sent while the agent is failed is kept, dead, too
    late = await fake.send({"i": 3})
    await fake.wait_status(late, M.DEAD)
    assert fake.engine.inbox.pending_count("echo") == 0

    fake.agent.down = False
    await agents.act("echo", "reset", reason="reset requested via test")
    for message in [*sent, late]:
        await fake.wait_status(message, M.DELIVERED)
    assert [body["i"] for _, body in fake.agent.deliveries] == [0, 1, 2, 3]
    assert agents.get("echo").state is S.RUNNING


async def test_messages_in_flight_are_redelivered_when_engine_restarts(tmp_path: Path) -> None:
    runtime, agent, clock = _parts()
    agent.hold = asyncio.Event()  # the first delivery never finishes in this engine
    async with _engine(tmp_path, runtime, agent, clock) as engine:
        sent = [
            (await engine.dispatcher.submit("echo", json.dumps({"i": i}).encode()))[0]
            for i in range(3)
        ]
        await advance_until(clock, lambda: len(agent.deliveries) == 1, what="first delivery")

        async def marked() -> bool:
            stored = await engine.inbox.get("echo", sent[0].id)
            return stored is not None and stored.status is M.DELIVERING

        await advance_until(clock, marked, what="delivering")
    agent.hold = None
    async with _engine(tmp_path, runtime, agent, clock) as engine:

        async def all_delivered() -> bool:
            stored = [await engine.inbox.get("echo", m.id) for m in sent]
            return all(s is not None and s.status is M.DELIVERED for s in stored)

        await advance_until(clock, all_delivered, what="delivered after restart")
    ids = [mid for mid, _ in agent.deliveries]
    # the interrupted one again (same id), then the rest, in order
    assert ids == [sent[0].id, sent[0].id, sent[1].id, sent[2].id]


async def test_two_messages_are_redelivered_in_order_when_stopped_during_a_pipelined_commit(
    tmp_path: Path,
) -> None:
    # A push lane sends the next message while the previous outcome commits, so at
    # most two messages lack their outcome when Roost stops: both are delivered again,
    # in order, and nothing after them was sent before.
    runtime, agent, clock = _parts()
    async with _engine(tmp_path, runtime, agent, clock) as engine:
        inbox = engine.inbox
        real_mark = inbox.mark_delivered
        never = asyncio.Event()
        sent: list[Message] = []

        async def held(message: Message, reply: Any) -> None:
            if message.id == sent[0].id:
                await never.wait()  # the first outcome's commit never ends here
            await real_mark(message, reply)

        inbox.mark_delivered = held  # type: ignore[method-assign]
        for i in range(3):
            sent.append((await engine.dispatcher.submit("echo", json.dumps({"i": i}).encode()))[0])
        await advance_until(clock, lambda: len(agent.deliveries) == 2, what="second sent")
        await advance_until(clock, lambda: agent.in_flight == 0, what="second answered")

        async def second_marked() -> bool:  # its lazy ``delivering`` write has committed
            stored = await engine.inbox.get("echo", sent[1].id)
            return stored is not None and stored.status is M.DELIVERING

        await advance_until(clock, second_marked, what="second marked delivering")
        # the third waits for the first outcome's commit
        assert [mid for mid, _ in agent.deliveries] == [sent[0].id, sent[1].id]
    async with _engine(tmp_path, runtime, agent, clock) as engine:

        async def all_delivered() -> bool:
            stored = [await engine.inbox.get("echo", m.id) for m in sent]
            return all(s is not None and s.status is M.DELIVERED for s in stored)

        await advance_until(clock, all_delivered, what="delivered after restart")
    ids = [mid for mid, _ in agent.deliveries]
    assert ids == [sent[0].id, sent[1].id, sent[0].id, sent[1].id, sent[2].id]


async def test_concurrent_delivery_starts_in_order_when_max_concurrent_messages_above_one(
    tmp_path: Path,
) -> None:
    runtime, agent, clock = _parts()
    async with _engine(tmp_path, runtime, agent, clock, max_concurrent_messages=3) as engine:
        agent.hold = asyncio.Event()
        sent = [
            (await engine.dispatcher.submit("echo", json.dumps({"i": i}).encode()))[0]
            for i in range(7)
        ]
        await advance_until(clock, lambda: agent.in_flight == 3, what="3 in flight")
        assert [mid for mid, _ in agent.deliveries] == [m.id for m in sent[:3]]
        agent.hold.set()

        async def all_delivered() -> bool:
            return engine.inbox.pending_count("echo") == 0

        await advance_until(clock, all_delivered, what="all delivered")
    assert [mid for mid, _ in agent.deliveries] == [m.id for m in sent]
    assert agent.most_in_flight == 3


async def test_waking_is_announced_once_when_delivery_waits_for_the_agent(
    tmp_path: Path,
) -> None:
    runtime, agent, clock = _parts()
    async with _engine(tmp_path, runtime, agent, clock, waking_notice_after=0) as engine:
        sent = [
            (await engine.dispatcher.submit("echo", json.dumps({"i": i}).encode()))[0]
            for i in range(3)
        ]

        async def delivered() -> bool:
            return engine.inbox.pending_count("echo") == 0

        await advance_until(clock, delivered, what="delivered")
        notices = [e for e in engine.events.recent(1000) if e.kind == "agent.waking"]
        assert len(notices) == 1
        assert notices[0].data["agent"] == "echo"
        assert notices[0].data["state"] == "created"
        assert notices[0].data["waited_ms"] >= 0
        statuses = [
            e.data["status"]
            for e in engine.events.recent(1000)
            if e.kind == "message.status" and e.data["message_id"] == sent[0].id
        ]
        assert statuses == ["queued", "delivered"]


async def test_wait_final_returns_the_reply_when_message_is_delivered(fake: Harness) -> None:
    message = await fake.send({"hello": "world"})
    final = await fake.engine.dispatcher.wait_final("echo", message.id, 10)
    assert final is not None
    assert final.status is M.DELIVERED
    assert json_value(final.reply) == {"echo": {"hello": "world"}, "message_id": message.id}
    fake.agent.down = True
    stuck = await fake.send({"never": True})
    assert await fake.engine.dispatcher.wait_final("echo", stuck.id, 0.05) is None


async def test_dead_marking_and_reset_requeue_wait_out_a_full_disk(fake: Harness) -> None:
    agents, inbox = fake.engine.agents, fake.engine.inbox
    await fake.wake()
    fake.agent.down = True
    sent = [await fake.send({"i": i}) for i in range(2)]
    await fake.until(lambda: inbox.pending_count("echo") == 2, "2 pending")
    refusals = {"kill": 3, "requeue": 3}
    real_kill, real_requeue = inbox.kill_pending, inbox.requeue_dead

    async def full_kill(agent: str, reason: str) -> Sequence[str]:
        if refusals["kill"] > 0:
            refusals["kill"] -= 1
            raise errors.StorageFull("state database: kill pending: disk is full")
        return await real_kill(agent, reason)

    async def full_requeue(agent: str) -> Sequence[str]:
        if refusals["requeue"] > 0:
            refusals["requeue"] -= 1
            raise errors.StorageFull("state database: requeue dead: disk is full")
        return await real_requeue(agent)

    inbox.kill_pending = full_kill  # type: ignore[method-assign]
    inbox.requeue_dead = full_requeue  # type: ignore[method-assign]
    container = agents.get("echo").container_id
    assert container is not None
    fake.runtime.crash(container, exit_code=2)  # max_restarts 0: failed at once
    for message in sent:
        await fake.wait_status(message, M.DEAD)  # marked once the disk took it
    assert refusals["kill"] == 0
    fake.agent.down = False
    await agents.act("echo", "reset", reason="reset requested via test")
    for message in sent:
        await fake.wait_status(message, M.DELIVERED)
    assert refusals["requeue"] == 0
    await fake.until(lambda: not fake.engine.health.holds("store"), "store recovered")


async def test_an_outcome_the_disk_refuses_is_stored_later_and_nothing_overtakes_it_when_full(
    fake: Harness,
) -> None:
    inbox = fake.engine.inbox
    real_mark = inbox.mark_delivered
    refusals = {"left": 1000}
    stored: list[str] = []

    async def full_disk(message: Message, reply: Any) -> None:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise errors.StorageFull("state database: mark message delivered: disk is full")
        await real_mark(message, reply)
        stored.append(message.id)

    inbox.mark_delivered = full_disk  # type: ignore[method-assign]
    first = await fake.send({"i": 0})
    second = await fake.send({"i": 1})
    third = await fake.send({"i": 2})
    await fake.until(lambda: fake.engine.health.holds("store"), "store degraded")
    # Delivered, its outcome not stored yet: the next message is already on its way
    # (the commit is pipelined), but its outcome waits, and nothing after it is sent.
    await fake.until(
        lambda: len(fake.agent.deliveries) == 2 and fake.agent.in_flight == 0, "second answered"
    )
    left = refusals["left"]
    await fake.until(lambda: refusals["left"] <= left - 2, "outcome retried twice more")
    assert [mid for mid, _ in fake.agent.deliveries] == [first.id, second.id]
    assert (await fake.status(second)).status is not M.DELIVERED
    assert stored == []
    refusals["left"] = 0  # space again
    await fake.wait_status(third, M.DELIVERED)
    assert (await fake.status(first)).status is M.DELIVERED
    assert [mid for mid, _ in fake.agent.deliveries] == [first.id, second.id, third.id]
    assert stored == [first.id, second.id, third.id]
    await fake.until(lambda: not fake.engine.health.holds("store"), "store recovered")


async def test_push_in_flight_is_sent_again_when_the_agent_leaves_its_container(
    tmp_path: Path,
) -> None:
    # A node that went down answers nothing (not even a reset): the push waiting on
    # it is abandoned when the agent starts elsewhere, and sent to the new container.
    runtime, agent, clock = _parts()
    async with _engine(tmp_path, runtime, agent, clock, max_restarts=3) as engine:
        agent.hold = asyncio.Event()  # the first container never answers
        message, _ = await engine.dispatcher.submit("echo", b'{"hello": 1}')
        await advance_until(clock, lambda: agent.in_flight == 1, what="first push in flight")
        first = engine.agents.get("echo").container_id
        agent.hold = None  # the next container answers

        await engine.agents.act("echo", "restart")

        async def delivered() -> bool:
            stored = await engine.inbox.get("echo", message.id)
            return stored is not None and stored.status is M.DELIVERED

        await advance_until(clock, delivered, what="delivered to the new container")
        assert engine.agents.get("echo").container_id != first
        assert [mid for mid, _ in agent.deliveries] == [message.id, message.id]
        assert agent.in_flight == 0


async def _abandonable(lane: _Lane, *, answered: bool, stopped: bool) -> str:
    """Run a push through ``_posting`` and abandon it (``agent_left``) while it waits,
    or once its answer has come; ``stopped``: the task is also cancelled (the lane
    stopping). What the awaiting task saw, and its pending cancellations after."""
    started, answer = asyncio.Event(), asyncio.Event()

    async def post() -> str:
        started.set()
        await answer.wait()
        return "answer"

    async def push() -> str:
        try:
            answer_text: str = await lane._posting(post())
            return answer_text
        except ConnectionError:
            current = asyncio.current_task()
            assert current is not None
            return f"connection error, {current.cancelling()} cancellations pending"

    task = asyncio.create_task(push(), name="test.push")
    await started.wait()
    if answered:
        answer.set()
    lane.agent_left("restarted")
    if stopped:
        task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


async def test_a_push_abandoned_when_the_agent_leaves_is_a_connection_error_in_its_own_task() -> (
    None
):
    lane = _Lane(cast(Dispatcher, None), "echo")
    waiting = await _abandonable(lane, answered=False, stopped=False)
    assert waiting == "connection error, 0 cancellations pending"
    answered = await _abandonable(lane, answered=True, stopped=False)
    assert answered == "connection error, 0 cancellations pending"  # sent again
    assert await _abandonable(lane, answered=False, stopped=True) == "cancelled"
    assert lane._posts == {}

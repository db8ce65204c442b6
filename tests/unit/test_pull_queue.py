"""Pull mode on a FakeRuntime engine, through the agent listener's app: long poll,
lease, heartbeat (409 once lost), complete with a reply or an error, lease expiry
redelivering in order with attempt + 1, max_attempts → dead, polls keeping the agent
awake, a message waking a sleeping pull agent, a nudge, and completion after a
Roost restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.core.states import AgentState
from roost.ports.agent_http import AgentResponse, Headers
from roost.ports.inbox import Message, MessageStatus
from roost.reactor.attempts import Outcome
from roost.reactor.pulling import Pulls
from roost.testing import EngineHarness
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_clock import FakeClock
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"
M = MessageStatus
S = AgentState
PULL: dict[str, Any] = {"image": IMAGE, "delivery": "pull", "lease_timeout": 0.3}


class NudgeRecorder(FakeAgentClient):
    """Records nudges (POSTs to the nudge path) besides echoing."""

    def __init__(self, runtime: FakeRuntime) -> None:
        super().__init__(runtime)
        self.nudges: list[Any] = []

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Headers = (),
        timeout: float,
    ) -> AgentResponse:
        if url.endswith("/task"):
            self.nudges.append(json.loads(body or b"null"))
        return await super().request(method, url, body=body, headers=headers, timeout=timeout)


def _settings(tmp_path: Path, **agent: Any) -> Any:
    return make_settings(
        tmp_path,
        "pull-test",
        agents={"worker": {**PULL, **agent}, "pusher": {"image": IMAGE}},
        defaults={"idle_timeout": 0},
    )


@pytest.fixture
async def roost(tmp_path: Path) -> AsyncIterator[EngineHarness]:
    async with EngineHarness.running(_settings(tmp_path)) as harness:
        yield harness


async def _agent(roost: EngineHarness, name: str = "worker") -> httpx.AsyncClient:
    """The agent's own client: its container's token, on the agent listener."""
    await roost.engine.agents.wake(name, reason="test", timeout=5)
    return roost.agent_client(roost.agent_token(name))


async def _send(roost: EngineHarness, body: Any, name: str = "worker") -> str:
    response = await roost.client.post(f"/api/agents/{name}/messages", json=body)
    assert response.status_code == 202, response.text
    message_id: str = response.json()["id"]
    return message_id


async def _status(roost: EngineHarness, message_id: str, name: str = "worker") -> dict[str, Any]:
    response = await roost.client.get(f"/api/agents/{name}/messages/{message_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _next(agent: httpx.AsyncClient, wait: float = 2) -> httpx.Response:
    return await agent.post("/api/agents/worker/queue/next", params={"wait": wait})


async def test_next_leases_oldest_message_and_complete_stores_reply_when_polled(
    roost: EngineHarness,
) -> None:
    first = await _send(roost, {"n": 1})
    second = await _send(roost, {"n": 2})
    async with await _agent(roost) as agent:
        taken = await _next(agent)
        assert taken.status_code == 200, taken.text
        lease = taken.json()
        assert lease["id"] == first
        assert lease["body"] == {"n": 1}
        assert lease["attempt"] == 1
        assert lease["event_type"] is None
        assert lease["lease_expires_at"] > roost.engine.clock.now()

        done = await agent.post(
            f"/api/agents/worker/queue/{first}/complete", json={"reply": {"ok": 1}}
        )
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "delivered"
        stored = await _status(roost, first)
        assert stored["status"] == "delivered"
        assert stored["reply"] == {"ok": 1}
        assert stored["attempts"] == 1

        following = await _next(agent)
        assert following.json()["id"] == second
        failed = await agent.post(
            f"/api/agents/worker/queue/{second}/complete", json={"error": "cannot do it"}
        )
        assert failed.json()["status"] == "failed"
        assert (await _status(roost, second))["error"] == "cannot do it"


async def test_next_answers_the_body_as_posted_when_a_message_is_leased(
    roost: EngineHarness,
) -> None:
    raw = '{"n" : 1,  "t": "\u00e9 ✓"}'.encode()
    posted = await roost.client.post(
        "/api/agents/worker/messages", content=raw, headers={"Content-Type": "application/json"}
    )
    assert posted.status_code == 202, posted.text
    async with await _agent(roost) as agent:
        taken = await _next(agent)
        assert taken.status_code == 200, taken.text
        assert raw in taken.content  # spliced in as sent, not re-encoded
        assert taken.json()["body"] == {"n": 1, "t": "é ✓"}
        assert taken.headers["content-type"] == "application/json"


async def test_next_answers_204_when_nothing_arrives_within_wait(roost: EngineHarness) -> None:
    async with await _agent(roost) as agent:
        empty = await _next(agent, wait=0.05)
        assert empty.status_code == 204
        assert empty.content == b""


async def test_long_poll_returns_message_when_it_arrives_during_the_wait(
    roost: EngineHarness,
) -> None:
    async with await _agent(roost) as agent:
        polling = asyncio.ensure_future(_next(agent, wait=10))
        await asyncio.sleep(0.05)
        assert not polling.done()
        sent = await _send(roost, {"late": True})
        taken = await asyncio.wait_for(polling, 5)
        assert taken.status_code == 200
        assert taken.json()["id"] == sent


async def test_next_gives_one_message_at_a_time_when_max_concurrent_is_one(
    roost: EngineHarness,
) -> None:
    await _send(roost, {"n": 1})
    await _send(roost, {"n": 2})
    async with await _agent(roost) as agent:
        first = await _next(agent)
        assert first.status_code == 200
        # the second waits until the first is answered: strictly in order
        assert (await _next(agent, wait=0.1)).status_code == 204


async def test_expired_lease_redelivers_with_next_attempt_before_newer_messages(
    roost: EngineHarness,
) -> None:
    first = await _send(roost, {"n": 1})
    await _send(roost, {"n": 2})
    async with await _agent(roost) as agent:
        assert (await _next(agent)).json()["attempt"] == 1
        # no heartbeat: the 0.3 s lease runs out, and the same message comes back
        again = await _next(agent, wait=5)
        assert again.json()["id"] == first
        assert again.json()["attempt"] == 2
        stored = await _status(roost, first)
        assert "lease expired" in stored["error"]


async def test_heartbeat_extends_lease_and_answers_409_once_lease_lost(
    roost: EngineHarness,
) -> None:
    first = await _send(roost, {"n": 1})
    async with await _agent(roost) as agent:
        lease = (await _next(agent)).json()
        beats = []
        for _ in range(4):  # 4 x 0.15 s: twice the lease, kept by heartbeats
            await asyncio.sleep(0.15)
            beat = await agent.post(f"/api/agents/worker/queue/{first}/heartbeat")
            assert beat.status_code == 200, beat.text
            beats.append(beat.json()["lease_expires_at"])
        assert beats == sorted(beats)
        assert beats[-1] > lease["lease_expires_at"]

        # a poll for more does not take it back while the lease holds ...
        assert (await _next(agent, wait=0.05)).status_code == 204
        # ... and once it runs out the heartbeat says so
        await _lease_lost(roost, first)
        beat = await agent.post(f"/api/agents/worker/queue/{first}/heartbeat")
        assert beat.status_code == 409
        assert "no lease" in beat.json()["error"]


async def _lease_lost(roost: EngineHarness, message_id: str) -> None:
    async def expired() -> bool:
        return "lease expired" in ((await _status(roost, message_id))["error"] or "")

    await wait_until(expired, timeout=5, what=f"the lease on {message_id} to expire")


async def test_complete_after_lease_lost_still_stores_reply_when_message_pending(
    roost: EngineHarness,
) -> None:
    first = await _send(roost, {"n": 1})
    async with await _agent(roost) as agent:
        await _next(agent)
        await _lease_lost(roost, first)
        late = await agent.post(f"/api/agents/worker/queue/{first}/complete", json={"reply": 1})
        assert late.status_code == 200, late.text
        assert (await _status(roost, first))["status"] == "delivered"
        again = await agent.post(f"/api/agents/worker/queue/{first}/complete", json={"reply": 2})
        assert again.status_code == 409
        assert "already delivered" in again.json()["error"]


async def test_complete_answers_400_when_body_is_neither_reply_nor_error(
    roost: EngineHarness,
) -> None:
    first = await _send(roost, {"n": 1})
    async with await _agent(roost) as agent:
        await _next(agent)
        for body in ({}, {"reply": 1, "error": "x"}, {"result": 1}, [1], {"error": 3}):
            refused = await agent.post(f"/api/agents/worker/queue/{first}/complete", json=body)
            assert refused.status_code == 400, body
        missing = await agent.post("/api/agents/worker/queue/nope/complete", json={"reply": 1})
        assert missing.status_code == 404
        assert "nope" in missing.json()["error"]


async def test_message_becomes_dead_when_max_attempts_leases_expire(tmp_path: Path) -> None:
    async with EngineHarness.running(_settings(tmp_path, max_attempts=2)) as roost:
        first = await _send(roost, {"n": 1})
        second = await _send(roost, {"n": 2})
        async with await _agent(roost) as agent:
            assert (await _next(agent)).json()["attempt"] == 1
            assert (await _next(agent, wait=5)).json()["attempt"] == 2
            # two leases lost: dead, and the next message comes
            following = await _next(agent, wait=5)
            assert following.json()["id"] == second
        stored = await _status(roost, first)
        assert stored["status"] == "dead"
        assert "max_attempts" in stored["error"]
        assert stored["attempts"] == 2


async def test_queue_endpoints_answer_409_when_agent_is_not_in_pull_mode(
    roost: EngineHarness,
) -> None:
    response = await roost.client.post("/api/agents/pusher/queue/next")
    assert response.status_code == 409
    assert "delivery = 'push'" in response.json()["error"]


async def test_polls_keep_agent_awake_when_idle_timeout_passes(tmp_path: Path) -> None:
    settings = _settings(tmp_path, idle_timeout=0.3, idle_action="stop")
    async with EngineHarness.running(settings) as roost:
        async with await _agent(roost) as agent:
            for _ in range(6):  # 6 x 0.1 s polls: twice the idle timeout
                assert (await _next(agent, wait=0.1)).status_code == 204
        assert roost.engine.agents.get("worker").state in (S.RUNNING, S.IDLE)
        # without polls it idles out
        await wait_until(
            lambda: roost.engine.agents.get("worker").state is S.STOPPED,
            timeout=5,
            what="idle stop",
        )


async def test_message_for_sleeping_pull_agent_wakes_it(roost: EngineHarness) -> None:
    agents = roost.engine.agents
    await agents.wake("worker", reason="test", timeout=5)
    token = roost.agent_token("worker")
    await agents.act("worker", "stop")
    await wait_until(lambda: agents.get("worker").state is S.STOPPED, what="stopped")
    sent = await _send(roost, {"wake": "up"})
    await wait_until(lambda: agents.get("worker").awake, timeout=5, what="woken by the message")
    async with roost.agent_client(token) as agent:  # the same container, started again
        taken = await _next(agent, wait=5)
        assert taken.json()["id"] == sent


async def test_nudge_posts_task_id_when_message_is_offered(tmp_path: Path) -> None:
    runtime = FakeRuntime(images=[IMAGE])
    client = NudgeRecorder(runtime)
    settings = _settings(tmp_path, nudge_path="/task")
    async with EngineHarness.running(settings, runtime=runtime, agent_client=client) as roost:
        await roost.engine.agents.wake("worker", reason="test", timeout=5)
        sent = await _send(roost, {"n": 1})
        await wait_until(lambda: client.nudges == [{"task_id": sent}], what="the nudge")


async def test_complete_is_accepted_after_restart_when_lease_was_held(tmp_path: Path) -> None:
    settings = _settings(tmp_path, lease_timeout=30)
    runtime = FakeRuntime(images=[IMAGE])
    async with EngineHarness.running(settings, runtime=runtime) as roost:
        sent = await _send(roost, {"n": 1})
        async with await _agent(roost) as agent:
            assert (await _next(agent)).json()["id"] == sent
        token = roost.agent_token("worker")
        await roost.engine.stop(leave_running=True)
    # adopted container, same token: the stored hash authenticates it
    async with (
        EngineHarness.running(settings, runtime=runtime) as again,
        again.agent_client(token) as agent,
    ):
        done = await agent.post(f"/api/agents/worker/queue/{sent}/complete", json={"reply": 7})
        assert done.status_code == 200, done.text
        stored = await _status(again, sent)
        assert stored["status"] == "delivered"
        assert stored["reply"] == 7
        # and it is not given out again
        assert (await _next(agent, wait=0.2)).status_code == 204


# -- the queue itself (no HTTP), on fake time --------------------------------------


class _Inbox:
    """Just what ``Pulls`` uses of the inbox: lazy ``delivering`` marks and lookups."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = {m.id: m for m in messages}
        self.delivered: dict[str, bytes] = {}

    def mark_delivering(self, message_id: str, *, attempts: int) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def get(self, agent: str, message_id: str) -> Message | None:
        return self.messages.get(message_id)

    async def mark_delivered(self, message: Message, reply: bytes) -> None:
        self.delivered[message.id] = reply


def _pulls(messages: list[Message]) -> tuple[Pulls, _Inbox, list[Message]]:
    inbox = _Inbox(messages)
    settled: list[Message] = []
    pulls = Pulls(
        inbox=inbox,  # type: ignore[arg-type]  # the subset Pulls uses
        clock=FakeClock(),
        settled=settled.append,
        awake=lambda agent: True,
    )
    return pulls, inbox, settled


def _message(seq: int) -> Message:
    return Message(f"m{seq}", "w", seq, b'{"n": %d}' % seq, MessageStatus.QUEUED)


async def test_each_offer_wakes_one_waiting_poll_and_a_cancelled_one_passes_it_on() -> None:
    pulls, _, _ = _pulls([_message(1), _message(2)])
    polls = [asyncio.ensure_future(pulls.next("w", wait=60)) for _ in range(3)]
    await asyncio.sleep(0)
    offering = asyncio.ensure_future(pulls.offer(_message(1), attempt=1, lease_timeout=9))
    await asyncio.sleep(0)
    polls[0].cancel()  # woken for that offer, but gone before it ran
    leases = await asyncio.wait_for(asyncio.wait(polls[1:], timeout=0.2), 2)
    taken = [p.result() for p in leases[0]]
    assert len(taken) == 1  # exactly one poll took it; the other still waits
    assert taken[0] is not None
    assert taken[0].message.id == "m1"
    assert await offering is taken[0]
    for poll in polls:
        poll.cancel()


async def test_complete_between_leases_is_stored_once_and_the_lane_skips_it() -> None:
    pulls, inbox, settled = _pulls([_message(1)])
    stored = await pulls.complete("w", "m1", Outcome.reply(b'{"late": true}'))
    assert stored.status is MessageStatus.DELIVERED
    assert inbox.delivered == {"m1": b'{"late": true}'}
    assert [m.id for m in settled] == ["m1"]
    # when the lane's turn comes it is told the message is settled, and offers nothing
    skipped = await pulls.offer(_message(1), attempt=2, lease_timeout=9)
    assert skipped == Outcome("settled")
    assert await pulls.next("w", wait=0) is None

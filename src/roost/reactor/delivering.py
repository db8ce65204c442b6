"""Message delivery: one lane per agent takes its durable messages, in order, to the agent.

Role: the bridge between the inbox (what was accepted) and the supervisor (is
the agent awake?). A lane is a named task, started when an agent first has
queued messages (on ``submit``, or at start-up for what a previous Roost left).
How one attempt reaches the agent depends on its ``delivery`` mode; everything
else (order, wake, retries, ``max_attempts``, dead on failure) is the same:

- ``push``: a POST of the stored body, byte for byte, to ``message_path`` (the
  reply is the answer's body, kept as the agent's bytes when they are JSON);
- ``pull``: the message is offered on the agent's queue (``roost.reactor.pulling``)
  and the attempt is the lease an agent's ``queue/next`` takes, answered by its
  ``complete`` or lost when the lease expires (then offered again at once);
  ``nudge_path``, if set, gets ``{"task_id": id}`` each time it is offered;
- ``websocket``: a frame on the agent's connection (``roost.reactor.channels``),
  answered by a reply or error frame; a connection lost first means no answer.

``route`` stores a message for the agent(s) whose ``event_types`` match an event
type (``roost.core.routing``, in configuration order); the agent sees the type in
``Roost-Event-Type`` (push) or the frame's ``event_type`` field.

Invariants:
- FIFO by ``seq``: a lane dispatches messages strictly in acceptance order;
  with ``max_concurrent_messages`` = 1 (the default) the next message is sent
  only after the previous one has its outcome. A push lane pipelines that
  outcome's commit: message N+1 goes out while N's final outcome (delivered,
  failed, dead) is being committed, but N+1's outcome is stored only after
  N's commit, and N+2 is sent only after that (an outcome that means a retry
  never lets the next message out). So a Roost killed at any instant
  redelivers at most two messages per lane (N, whose outcome was not yet
  committed, and N+1, in flight), in their order, before any later one; the
  other delivery modes commit first and redeliver at most the one in flight.
- At-least-once: a message is marked ``delivering`` before it is sent (queued
  first, committed with the outcome: a ``queued`` one is redelivered just the
  same after a crash), and
  the agent always gets the message's id in ``Roost-Message-Id``.
- Before each attempt the agent is woken (``Agents.wake``, which also announces
  ``agent.waking`` once per wake); while it is starting or restarting the
  message waits. A message for a sleeping agent begins that wake while it is
  being stored (the lane's wake then joins it); one the queue refuses wakes
  nothing, one refused for another reason (a full disk) or a repeat of a stored
  one (``Idempotency-Key``) may have woken it for nothing. 2xx → ``delivered`` (the reply is
  kept); other non-5xx answers → ``failed``; 5xx, no answer, or no connection
  → retried after ``retry`` (a ``Backoff``; the pause is cut short when the agent fails), the
  same message first, so later messages never overtake it. After
  ``max_server_errors`` consecutive 5xx answers the message is ``failed``.
- When the agent enters ``failed`` its lane stops and every queued/delivering
  message becomes ``dead``; ``reset`` (failed → stopped) re-queues them, and
  the lane starts again from the oldest. A message that had ``max_attempts``
  attempts without a reply (no answer, 5xx, expired lease, lost WebSocket) is
  ``dead`` too (0: no limit).
- An outcome the state database refuses (a full disk) is written again with
  backoff until it is stored; the message keeps its slot meanwhile, so no later
  one overtakes it: in a pipelined push lane the next message may already be on
  its way, but its outcome waits, and nothing after it is sent (a Roost stopped
  meanwhile delivers both again). Failed and
  successful writes are reported to ``Health`` (``store``).
- Time comes from the injected clock: retries run on ``FakeClock`` in tests.
- A push in flight when the agent leaves ``running``/``idle`` for a new start (a
  restart, a crash, its swarm node lost) is abandoned and sent again to the new
  container: a node that went down answers nothing, not even a reset, so the
  attempt would otherwise wait out ``delivery_timeout``.
- Every status change is published as ``message.status`` on the event hub, with
  ``message_id``, ``agent``, ``status`` and ``attempts`` (not ``id``: an event's
  JSON already uses ``id`` for the event's own id, which SSE resumes from).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from roost import aio, errors
from roost.config import ResolvedAgent
from roost.core import routing
from roost.core.backoff import Backoff
from roost.core.records import AgentRecord, StateChange
from roost.core.states import AgentState
from roost.ports.agent_http import AgentClient
from roost.ports.clock import Clock
from roost.ports.inbox import TERMINAL, Inbox, Message, MessageStatus
from roost.reactor.agents import Agents
from roost.reactor.attempts import Outcome
from roost.reactor.channels import Channels
from roost.reactor.health import Health, until_written
from roost.reactor.pulling import Lease, Pulls

__all__ = [
    "DEFAULT_RETRY",
    "EVENT_TYPE_HEADER",
    "MESSAGE_ID_HEADER",
    "Dispatcher",
    "reply_json",
]

log = logging.getLogger("roost.delivery")

S = AgentState
#: Awake states, and the states an awake agent enters when its container goes away.
_AWAKE = frozenset({S.RUNNING, S.IDLE})
_LEFT = frozenset({S.STARTING, S.CRASHED})
M = MessageStatus

MESSAGE_ID_HEADER = "Roost-Message-Id"
#: The event type a routed message was routed by (push mode).
EVENT_TYPE_HEADER = "Roost-Event-Type"
#: Seconds a pull agent's nudge may take (fire and forget).
NUDGE_TIMEOUT = 5.0
_MESSAGE_ID_KEY = MESSAGE_ID_HEADER.lower().encode()
_EVENT_TYPE_KEY = EVENT_TYPE_HEADER.lower().encode()
_JSON = (b"content-type", b"application/json")
#: Backoff between attempts of one message (the last value repeats).
DEFAULT_RETRY = Backoff((0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0), repeat=True)
#: Queued messages read from the store at once.
FETCH_BATCH = 256
#: Characters of an agent's error answer kept in ``error``.
ERROR_EXCERPT = 300

Publish = Callable[[str, dict[str, Any]], object]


class Dispatcher:
    """Accepts messages into the inbox and runs one delivery lane per agent."""

    def __init__(
        self,
        *,
        agents: Agents,
        inbox: Inbox,
        agent_client: AgentClient,
        clock: Clock,
        publish: Publish,
        channels: Channels | None = None,
        delivery_timeout: float = 300.0,
        retry: Backoff = DEFAULT_RETRY,
        max_server_errors: int = 10,
        health: Health | None = None,
    ) -> None:
        if not retry.repeat:
            raise ValueError("delivery retries repeat their last delay: pass repeat=True")
        self.agents = agents
        self.inbox = inbox
        self.agent_client = agent_client
        self.clock = clock
        self._publish = publish
        self.delivery_timeout = delivery_timeout
        self.retry = retry
        self.max_server_errors = max_server_errors
        self.health = health
        self._lanes: dict[str, _Lane] = {}
        #: agents an early wake is under way for (one at a time each).
        self._waking: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[Message]]] = {}
        #: reset handling: owned, awaited on stop.
        self._tasks = aio.TaskSet(log)
        #: pull agents' nudges: fire and forget, but owned (cancelled on stop).
        self._nudges = aio.TaskSet(log)
        #: wakes begun while a message for a sleeping agent is being stored (see submit).
        self._early_wakes = aio.TaskSet(log)
        #: WebSocket agents' connections.
        self.channels = channels if channels is not None else Channels(clock=clock)
        #: pull agents' offers and leases.
        self.pulls = Pulls(inbox=inbox, clock=clock, settled=self._settled, awake=self._awake)
        self._listening = False
        self.closed = False

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Re-queue what was in flight when Roost stopped and resume every agent's lane."""
        if not self._listening:
            self.agents.add_listener(self._on_change)
            self.agents.on_delete(self.pulls.forget_agent)
            self._listening = True
        for name in await self.inbox.recover():
            if name in self.agents:
                self._lane(name).wake()

    async def stop(self) -> None:
        """Cancel lanes (messages in flight stay queued/delivering: redelivered next time)."""
        self.closed = True
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.cancel()
        await asyncio.gather(*(lane.join() for lane in lanes), return_exceptions=True)
        await self._tasks.join()
        await self._nudges.close()
        await self._early_wakes.close()
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()

    # -- accepting --------------------------------------------------------------------

    async def submit(
        self,
        name: str,
        body: bytes,
        *,
        idempotency_key: str | None = None,
        event_type: str | None = None,
    ) -> tuple[Message, bool]:
        """Store a message durably for agent ``name`` and start its delivery.
        ``body`` is the JSON text as checked at the edge (``roost.api.messages.json_body``).

        NotFound for an unknown agent, QueueFull over its ``queue_limit``."""
        if self.closed:
            raise errors.StateError("Roost is shutting down; the message was not stored")
        spec = self.agents.spec(name)  # NotFound first: nothing stored for an unknown agent
        self._wake_early(name, spec)
        message, created = await self.inbox.enqueue(
            name,
            body,
            idempotency_key=idempotency_key,
            limit=spec.queue_limit,
            event_type=event_type,
        )
        if created:
            self._status(message)
            self._lane(name).wake()
        return message, created

    def _wake_early(self, name: str, spec: ResolvedAgent) -> None:
        """A message for a sleeping agent: begin the wake now, while the message is
        being stored, rather than when its lane has read it back (the commit and the
        lane's turn overlap the unpause or start). The lane's own wake joins this one;
        its failures are the lane's to handle, so this one only logs them. A message
        the queue will refuse wakes nothing (see the module docstring)."""
        record = self.agents.get(name)
        if record.awake or record.state is S.FAILED or name in self._waking:
            return
        if spec.queue_limit and self.inbox.pending_count(name) >= spec.queue_limit:
            return
        self._waking.add(name)

        async def wake() -> None:
            try:
                await self.agents.wake(name, reason="message delivery", timeout=spec.hold_timeout)
            except (errors.RoostError, TimeoutError) as exc:
                log.debug("agent %s: early wake for a message: %s", name, exc)
            finally:
                self._waking.discard(name)

        self._early_wakes.spawn(wake(), f"roost.wake[{name}]")

    def route_targets(self, event_type: str, *, fan_out: bool = False) -> list[str]:
        """The agents an event of this type goes to (configuration order); NotFound
        naming the type when none handles it."""
        targets = routing.route(self.agents.routes(), event_type, fan_out=fan_out)
        if not targets:
            raise errors.NotFound(f"no agent handles event type {event_type!r}")
        return targets

    async def route(
        self,
        event_type: str,
        body: bytes,
        *,
        fan_out: bool = False,
        idempotency_key: str | None = None,
    ) -> list[tuple[Message, bool]]:
        """Store ``body`` for the first agent that handles ``event_type`` (or, with
        ``fan_out``, a copy for every one), in configuration order. NotFound naming
        the type when no agent handles it; each copy as ``submit`` stores it."""
        return [
            await self.submit(name, body, idempotency_key=idempotency_key, event_type=event_type)
            for name in self.route_targets(event_type, fan_out=fan_out)
        ]

    async def wait_final(
        self, name: str, message_id: str, timeout: float, *, current: Message | None = None
    ) -> Message | None:
        """The message once delivered, failed or dead; None if still pending at ``timeout``.

        ``current``: the message as ``submit`` just stored it, when nothing awaited in
        between (so it cannot have been delivered yet): then it is not read again."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(message_id, []).append(future)
        try:
            if current is None or current.id != message_id:
                current = await self.inbox.get(name, message_id)
            if current is None:
                raise errors.NotFound(f"agent {name!r} has no message {message_id!r}")
            if current.status in TERMINAL:
                return current
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    return await future
            return None
        finally:
            futures = self._waiters.get(message_id, [])
            with contextlib.suppress(ValueError):
                futures.remove(future)
            if not futures:
                self._waiters.pop(message_id, None)

    # -- lifecycle changes --------------------------------------------------------------

    def _on_change(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        if self.closed:
            return  # shutting down: what is left is resumed by the next start
        name = record.name
        if not record.awake and name in self.agents and self.agents.spec(name).delivery == "pull":
            self.pulls.withdraw(name)  # asleep: the lane wakes it and offers again
        for change in changes:
            if change.from_state in _AWAKE and change.to_state in _LEFT:
                lane = self._lanes.get(name)
                if lane is not None:
                    lane.agent_left(change.reason)
            if change.to_state is S.FAILED:
                lane = self._lanes.get(name)
                if lane is not None:
                    lane.agent_failed()
                elif self.inbox.pending_count(name):
                    self._lane(name).wake()
            elif change.from_state is S.FAILED and "reset" in change.reason:
                self._tasks.spawn(self._requeue(name), f"roost.requeue[{name}]")

    async def _requeue(self, name: str) -> None:
        ids = await until_written(
            lambda: self.inbox.requeue_dead(name), clock=self.clock, health=self.health
        )
        for message_id in ids:
            self._publish(
                "message.status", {"message_id": message_id, "agent": name, "status": "queued"}
            )
        if ids and not self.closed and name in self.agents:
            log.info("agent %s: reset re-queued %d dead messages", name, len(ids))
            self._lane(name).wake(rewind=True)

    # -- internals ----------------------------------------------------------------------

    def _awake(self, name: str) -> bool:
        return name in self.agents and self.agents.get(name).awake

    def _nudge(self, url: str, message: Message) -> None:
        """POST ``{"task_id": id}`` to a pull agent's nudge URL, fire and forget."""

        async def nudge() -> None:
            try:
                await self.agent_client.request(
                    "POST",
                    url,
                    body=json.dumps({"task_id": message.id}).encode(),
                    headers=(_JSON,),
                    timeout=NUDGE_TIMEOUT,
                )
            except (ConnectionError, TimeoutError, OSError) as exc:
                log.debug("agent %s: nudge %s failed: %s", message.agent, url, exc)

        self._nudges.spawn(nudge(), f"roost.nudge[{message.agent}]")

    def _lane(self, name: str) -> _Lane:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(self, name)
        return lane

    def _status(self, message: Message) -> None:
        self._publish(
            "message.status",
            {
                "message_id": message.id,
                "agent": message.agent,
                "status": message.status.value,
                "attempts": message.attempts,
            },
        )

    def _store_failed(self, exc: errors.StoreError) -> None:
        if self.health is not None:
            self.health.fail("store", str(exc))

    def _settled(self, message: Message) -> None:
        self._status(message)
        for future in self._waiters.get(message.id, ()):
            if not future.done():
                future.set_result(message)


class _Lane:
    """One agent's delivery loop (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, name: str) -> None:
        self.d = dispatcher
        self.name = name
        self._wakeup = asyncio.Event()
        #: set when the agent fails: cuts retry sleeps and waits short.
        self._interrupt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        #: a pipelined push lane's last final outcome, being stored (see the docstring).
        self._committing: asyncio.Task[None] | None = None
        #: tasks awaiting a push on the wire (abandoned when the agent leaves its
        #: container) → whether ``agent_left`` has cancelled that push.
        self._posts: dict[asyncio.Task[Any], bool] = {}
        self._in_flight: set[str] = set()
        #: held while an attempt waits for the agent (asyncio.Lock is FIFO).
        self._starting = asyncio.Lock()
        self._cursor = 0
        self._rewind = False
        #: bumped when the agent fails: deliveries of an older generation stop.
        self._generation = 0

    def wake(self, *, rewind: bool = False) -> None:
        if rewind:
            self._rewind = True
        self._wakeup.set()
        if (self._task is None or self._task.done()) and not self.d.closed:
            self._task = asyncio.create_task(self._run(), name=f"roost.lane[{self.name}]")

    def agent_failed(self) -> None:
        self._generation += 1
        self._interrupt.set()
        self.wake(rewind=True)

    def agent_left(self, reason: str) -> None:
        """The agent's container is being replaced: pushes still waiting for its
        answer will not get one (see the module docstring); they end now."""
        for task, abandoned in list(self._posts.items()):
            if not abandoned:
                self._posts[task] = True
                task.cancel(f"the agent left its container ({reason})")

    async def _posting(self, post: Coroutine[Any, Any, Any]) -> Any:
        """Await a push, which ``agent_left`` may abandon: then ConnectionError.

        The push runs in the awaiting task itself (no task and shield per message):
        ``agent_left`` cancels that task while it awaits the push, and the
        cancellation it asked for, and only that one, is taken back here
        (``uncancel``); one from anywhere else (the lane stopping) goes on. A push
        whose answer had come but was not yet read when the agent left counts as
        abandoned too: it is sent again (at-least-once)."""
        current = asyncio.current_task()
        assert current is not None
        self._posts[current] = False
        try:
            return await post
        except asyncio.CancelledError:
            # An abandoned push is cancelled at its await even when its answer had
            # come (the cancellation is thrown where the task resumes).
            if self._posts.pop(current, False) and current.uncancel() == 0:
                raise ConnectionError(
                    "the agent left its container while the message was in flight"
                ) from None
            raise
        finally:
            self._posts.pop(current, None)

    def cancel(self) -> None:
        for task in (self._task, self._committing, *self._deliveries):
            if task is not None:
                task.cancel()

    async def join(self) -> None:
        tasks = [t for t in (self._task, self._committing, *self._deliveries) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _committed(self) -> None:
        """Wait until the previous message's outcome is stored (pipelined lanes): before
        anything of the next one is stored, and before the lane reads the inbox."""
        task = self._committing
        if task is not None:
            await task
            self._committing = None

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "agent %s: delivery lane failed; it restarts on the next message", self.name
            )

    async def _loop(self) -> None:
        d = self.d
        slots: asyncio.Semaphore | None = None
        while True:
            self._wakeup.clear()
            if self.name not in d.agents:
                return  # the agent was deleted: its messages stay stored
            if self._rewind:
                # From the oldest again: a message whose outcome is still being
                # committed would read as queued.
                await self._committed()
                self._rewind, self._cursor = False, 0
            record = d.agents.get(self.name)
            if record.state is S.FAILED:
                await self._committed()
                await self._drain_deliveries()
                await self._kill_pending(record)
                await self._wakeup.wait()
                continue
            self._interrupt.clear()
            batch = await d.inbox.next_queued(self.name, after_seq=self._cursor, limit=FETCH_BATCH)
            batch = [m for m in batch if m.id not in self._in_flight]
            if not batch:
                await self._wakeup.wait()
                continue
            spec = d.agents.spec(self.name)
            if slots is None:
                slots = asyncio.Semaphore(spec.max_concurrent_messages)
            generation = self._generation
            for message in batch:
                if spec.max_concurrent_messages == 1 and not self._deliveries:
                    # One at a time: delivered by this task itself, each after the
                    # previous outcome (a push lane: while it is being committed). No
                    # task per message and no slot handed back: two turns of the event
                    # loop fewer per message, which is what the next one waits for when
                    # the loop is busy.
                    if generation != self._generation or self._rewind:
                        break
                    self._cursor = message.seq
                    await self._deliver(
                        spec, message, generation, pipelined=spec.delivery == "push"
                    )
                    continue
                await self._committed()
                # In seq order: a message starts only when a slot is free, so with one
                # slot it starts after the previous outcome has been committed.
                await slots.acquire()
                if generation != self._generation or self._rewind:
                    slots.release()
                    break
                self._cursor = message.seq
                self._in_flight.add(message.id)
                task = asyncio.create_task(
                    self._deliver(spec, message, generation),
                    name=f"roost.deliver[{self.name}]",
                )
                self._deliveries.add(task)

                def done(
                    t: asyncio.Task[None],
                    message_id: str = message.id,
                    slot: asyncio.Semaphore = slots,
                ) -> None:
                    self._deliveries.discard(t)
                    self._in_flight.discard(message_id)
                    slot.release()

                task.add_done_callback(done)

    async def _drain_deliveries(self) -> None:
        if self._deliveries:
            await asyncio.gather(*list(self._deliveries), return_exceptions=True)

    async def _kill_pending(self, record: AgentRecord) -> None:
        reason = f"agent {self.name!r} failed: {record.last_error or 'gave up restarting'}"
        ids = await until_written(
            lambda: self.d.inbox.kill_pending(self.name, reason),
            clock=self.d.clock,
            health=self.d.health,
        )
        if ids:
            log.warning(
                "agent %s failed: %d undelivered messages are now dead", self.name, len(ids)
            )
        for message_id in ids:
            # Waiters read its id and status (and then the stored message): no body.
            dead = Message(message_id, self.name, 0, b"null", M.DEAD, error=reason)
            self.d._settled(dead)

    # -- one message ----------------------------------------------------------------------

    async def _deliver(
        self, spec: ResolvedAgent, message: Message, generation: int, *, pipelined: bool = False
    ) -> None:
        """Attempt ``message`` until it has a final outcome. ``pipelined``: that
        outcome is committed by a task of its own (``_committing``) and this returns
        at once; the previous one's commit is awaited before anything is stored."""
        d = self.d
        attempts = message.attempts
        server_errors = 0
        retries = 0
        while generation == self._generation:
            try:
                # FIFO lock: after a wake, attempts still start in seq order.
                async with self._starting:
                    record = await d.agents.wake(
                        self.name, reason="message delivery", timeout=spec.hold_timeout
                    )
            except errors.NotFound:
                return
            except (errors.ContainerError, errors.StateError) as exc:
                if self.name not in d.agents or d.agents.get(self.name).state is S.FAILED:
                    return  # the lane makes it dead
                log.info("agent %s: not awake for delivery (%s); waiting", self.name, exc)
                await self._pause(retries)
                retries += 1
                continue
            attempt = await self._attempt(spec, record, message, attempts + 1)
            if attempt is None:
                # Not sent: a pull agent went to sleep (the wake above brings it back),
                # a WebSocket agent is not connected, a push agent has no URL yet.
                if spec.delivery != "pull":
                    await self._pause(retries)
                    retries += 1
                continue
            await self._committed()  # the previous message's outcome is stored first
            outcome = attempt.outcome
            if attempt.counted:
                attempts += 1
            if outcome.kind == "settled":  # a pull agent completed it between leases
                await self._finish(attempt, None, settle=False)
                return
            if outcome.kind == "server_error":
                server_errors += 1
            final = self._final(spec, message, outcome, attempts, server_errors)
            if final is not None:
                write, stored = final
                if pipelined:
                    self._committing = asyncio.create_task(
                        self._commit(write, attempt, stored), name=f"roost.commit[{self.name}]"
                    )
                else:
                    await self._commit(write, attempt, stored)
                return
            # A lost lease is offered again at once; push and WebSocket wait a little.
            immediate = spec.delivery == "pull"
            delay = 0.0 if immediate else (d.retry.delay(retries) or 0.0)
            try:
                await d.inbox.mark_retry(
                    message.id, outcome.value, next_attempt_at=d.clock.now() + delay
                )
            except errors.StoreError as exc:
                d._store_failed(exc)  # only the error shown for it is lost: it is retried
            await self._finish(attempt, None, settle=False)
            d._status(dataclasses.replace(message, status=M.QUEUED, attempts=attempts))
            log.info(
                "agent %s: message %s attempt %d failed (%s); retrying%s",
                self.name,
                message.id,
                attempts,
                outcome.value,
                "" if immediate else f" in {delay:g}s",
            )
            if not immediate:
                await self._pause(retries)
                retries += 1

    def _final(
        self,
        spec: ResolvedAgent,
        message: Message,
        outcome: Outcome,
        attempts: int,
        server_errors: int,
    ) -> tuple[Callable[[], Awaitable[object]], Message] | None:
        """A final outcome (delivered, failed, dead): its write and the message as it
        will be stored; None when the message is retried."""
        inbox = self.d.inbox
        if outcome.kind == "reply":
            return functools.partial(inbox.mark_delivered, message, outcome.value), (
                dataclasses.replace(
                    message, status=M.DELIVERED, attempts=attempts, reply=outcome.value
                )
            )
        if outcome.kind == "error" or (
            outcome.kind == "server_error" and server_errors >= self.d.max_server_errors
        ):
            return functools.partial(inbox.mark_failed, message, outcome.value), (
                dataclasses.replace(
                    message, status=M.FAILED, attempts=attempts, error=outcome.value
                )
            )
        if spec.max_attempts and attempts >= spec.max_attempts:
            error = f"gave up after {attempts} attempts (max_attempts); last: {outcome.value}"
            return functools.partial(inbox.mark_dead, message, error), (
                dataclasses.replace(message, status=M.DEAD, attempts=attempts, error=error)
            )
        return None

    async def _commit(
        self, write: Callable[[], Awaitable[object]], attempt: _Attempt, stored: Message
    ) -> None:
        """Store a final outcome, then tell whoever waits for it."""
        await self._store(write)
        await self._finish(attempt, stored)

    async def _finish(
        self, attempt: _Attempt, stored: Message | None, *, settle: bool = True
    ) -> None:
        """The attempt's outcome is written: wait for its ``delivering`` write too,
        then tell whoever waits (a pull agent's ``complete``, ``?wait=true``)."""
        if attempt.marking is not None:
            await self._marked(attempt.marking)
        if attempt.lease is not None:
            self.d.pulls.finish(attempt.lease, stored)
        if settle and stored is not None:
            self.d._settled(stored)

    async def _attempt(
        self, spec: ResolvedAgent, record: AgentRecord, message: Message, attempt: int
    ) -> _Attempt | None:
        """One attempt in the agent's delivery mode; None when it could not be made."""
        if spec.delivery == "pull":
            return await self._offer(spec, record, message, attempt)
        if spec.delivery == "websocket":
            return await self._send_frame(spec, message, attempt)
        url = self.d.agents.address(record)  # its own address, else its published port
        if url is None:
            return None
        return await self._push(spec, url, message, attempt)

    async def _push(
        self, spec: ResolvedAgent, url: str, message: Message, attempt: int
    ) -> _Attempt:
        d = self.d
        # Queued now, committed with this attempt's outcome (see SqliteInbox).
        marking = d.inbox.mark_delivering(message.id, attempts=attempt)
        headers = _headers(message)
        try:
            async with d.agents.busy(self.name):
                response = await self._posting(
                    d.agent_client.request(
                        "POST",
                        url + spec.message_path,
                        body=message.body,
                        headers=headers,
                        timeout=d.delivery_timeout,
                    )
                )
        except (ConnectionError, TimeoutError, OSError) as exc:
            error = f"no answer from the agent: {exc or type(exc).__name__}"
            return _Attempt(Outcome.no_answer(error), marking)
        status = response.status
        if 200 <= status < 300:
            return _Attempt(Outcome.reply(reply_json(response.body)), marking)
        error = f"HTTP {status}: {_excerpt(_decoded_reply(response.body))}"
        outcome = Outcome("server_error", error) if status >= 500 else Outcome.error(error)
        return _Attempt(outcome, marking)

    async def _send_frame(
        self, spec: ResolvedAgent, message: Message, attempt: int
    ) -> _Attempt | None:
        d = self.d
        if not await d.channels.wait_connected(self.name, spec.hold_timeout):
            log.info("agent %s: running but its WebSocket is not connected; waiting", self.name)
            return None
        marking = d.inbox.mark_delivering(message.id, attempts=attempt)
        async with d.agents.busy(self.name):
            outcome = await d.channels.request(
                self.name, message, attempt=attempt, timeout=d.delivery_timeout
            )
        return _Attempt(outcome, marking)

    async def _offer(
        self, spec: ResolvedAgent, record: AgentRecord, message: Message, attempt: int
    ) -> _Attempt | None:
        d = self.d
        if spec.nudge_path and record.url is not None:
            d._nudge(record.url + spec.nudge_path, message)
        taken = await d.pulls.offer(message, attempt=attempt, lease_timeout=spec.lease_timeout)
        if taken is None or isinstance(taken, Outcome):
            return None if taken is None else _Attempt(taken, None, counted=False)
        lease: Lease = taken
        if lease.outcome is not None:  # completed while offered: no lease was taken
            return _Attempt(lease.outcome, None, lease, counted=False)
        async with d.agents.busy(self.name):  # a held lease is activity
            outcome = await d.pulls.outcome(lease)
        return _Attempt(outcome, lease.marking, lease)

    async def _store(self, write: Callable[[], Awaitable[object]]) -> None:
        """Store an outcome; while the database refuses it, again with backoff."""
        await until_written(write, clock=self.d.clock, health=self.d.health)

    async def _marked(self, marking: Awaitable[Any]) -> None:
        """The attempt's ``delivering`` mark: it rode with an outcome that is stored
        now, or failed with a transaction, which the outcome's write overrides."""
        with contextlib.suppress(errors.StoreError):
            await marking

    async def _pause(self, retries: int) -> None:
        """Wait out the backoff after ``retries`` failed waits, cut short when the
        agent fails."""
        await aio.sleep(self.d.clock, self.d.retry.delay(retries) or 0.0, wakeup=self._interrupt)


@dataclasses.dataclass(frozen=True, slots=True)
class _Attempt:
    """What one attempt came to, and what is left to settle of it."""

    outcome: Outcome
    #: its ``delivering`` write (awaited after the outcome's); None: none was made.
    marking: Awaitable[object] | None = None
    #: the pull lease it was, if any (finished once the outcome is stored).
    lease: Lease | None = None
    #: it counts as an attempt (False: nothing reached the agent this time).
    counted: bool = True


def _headers(message: Message) -> tuple[tuple[bytes, bytes], ...]:
    headers = (_JSON, (_MESSAGE_ID_KEY, message.id.encode()))
    if message.event_type is not None:
        return (*headers, (_EVENT_TYPE_KEY, message.event_type.encode()))
    return headers


def reply_json(raw: bytes) -> bytes:
    """An agent's answer as the JSON text kept for its reply: its own bytes when they
    are JSON (UTF-8, without NaN or Infinity); else JSON in another Unicode encoding
    re-encoded, else its text as a JSON string; nothing at all is null."""
    if not raw:
        return b"null"
    try:
        json.loads(raw.decode("utf-8"), parse_constant=_not_json)  # the proof only
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        pass
    else:
        return raw
    try:
        value = json.loads(raw, parse_constant=_not_json)  # UTF-16 or UTF-32 JSON
    except (ValueError, RecursionError):
        value = raw.decode(errors="replace")
    return json.dumps(value).encode()


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decoded_reply(raw: bytes) -> Any:
    """The agent's answer: JSON when it parses, else its text (None when empty)."""
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return raw.decode(errors="replace")


def _excerpt(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    return text if len(text) <= ERROR_EXCERPT else text[: ERROR_EXCERPT - 3] + "..."

"""Message delivery: one lane per agent takes its durable messages, in order, to the agent.

Role: the bridge between the inbox (what was accepted) and the supervisor (is
the agent awake?). A lane is a named task, started when an agent first has
queued messages (on ``submit``, or at start-up for what a previous Roost left).

Invariants:
- FIFO by ``seq``: a lane dispatches messages strictly in acceptance order;
  with ``max_concurrent_messages`` = 1 (the default) the next message is sent
  only after the previous one's outcome is committed, so a Roost killed at
  any instant redelivers at most the one message that was in flight.
- At-least-once: a message is marked ``delivering`` before it is sent (queued
  first, committed with the outcome: a ``queued`` one is redelivered just the
  same after a crash), and
  the agent always gets the message's id in ``Roost-Message-Id``.
- Before each attempt the agent is woken (``ensure_running``); while it is
  starting or restarting the message waits. 2xx → ``delivered`` (the reply is
  kept); other non-5xx answers → ``failed``; 5xx, no answer, or no connection
  → retried after ``retry_delays`` (a configured, interruptible backoff), the
  same message first, so later messages never overtake it. After
  ``max_server_errors`` consecutive 5xx answers the message is ``failed``.
- When the agent enters ``failed`` its lane stops and every queued/delivering
  message becomes ``dead``; ``reset`` (failed → stopped) re-queues them, and
  the lane starts again from the oldest.
- A wait for the agent longer than its ``waking_notice_after`` emits one
  ``agent.waking`` notice per wake (SSE and the webhook).
- Every status change is published as ``message.status`` on the event hub, with
  ``message_id``, ``agent``, ``status`` and ``attempts`` (not ``id``: an event's
  JSON already uses ``id`` for the event's own id, which SSE resumes from).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from roost import errors
from roost.core.records import AgentRecord, StateChange
from roost.core.states import ACTIVE_STATES, AgentState
from roost.ports.agent_http import AgentClient
from roost.ports.inbox import TERMINAL, Inbox, Message, MessageStatus
from roost.reactor.supervising import AgentActor, Supervisor

__all__ = [
    "DEFAULT_RETRY_DELAYS",
    "MESSAGE_ID_HEADER",
    "DeliveryLimits",
    "Dispatcher",
]

log = logging.getLogger("roost.delivery")

S = AgentState
M = MessageStatus

MESSAGE_ID_HEADER = "Roost-Message-Id"
_MESSAGE_ID_KEY = MESSAGE_ID_HEADER.lower().encode()
#: Backoff between attempts of one message (the last value repeats).
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0)
#: Queued messages read from the store at once.
FETCH_BATCH = 256
#: Characters of an agent's error answer kept in ``error``.
ERROR_EXCERPT = 300

Publish = Callable[[str, dict[str, Any]], object]
Announce = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryLimits:
    """An agent's delivery settings (``roost.config.ResolvedAgent`` has them all)."""

    message_path: str = "/messages"
    max_concurrent_messages: int = 1
    queue_limit: int = 10_000
    wait_timeout: float = 30.0
    waking_notice_after: float = 1.0
    hold_timeout: float = 60.0

    @classmethod
    def of(cls, spec: object) -> DeliveryLimits:
        defaults = cls()
        return cls(
            **{
                field.name: getattr(spec, field.name, getattr(defaults, field.name))
                for field in dataclasses.fields(cls)
            }
        )


class Dispatcher:
    """Accepts messages into the inbox and runs one delivery lane per agent."""

    def __init__(
        self,
        *,
        supervisor: Supervisor,
        inbox: Inbox,
        agent_client: AgentClient,
        publish: Publish,
        announce: Announce,
        delivery_timeout: float = 300.0,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        max_server_errors: int = 10,
    ) -> None:
        self.supervisor = supervisor
        self.inbox = inbox
        self.agent_client = agent_client
        self._publish = publish
        self._announce = announce
        self.delivery_timeout = delivery_timeout
        self.retry_delays = tuple(retry_delays) or (0.0,)
        self.max_server_errors = max_server_errors
        self._lanes: dict[str, _Lane] = {}
        self._waiters: dict[str, list[asyncio.Future[Message]]] = {}
        #: agents whose current wake has already been announced.
        self._announced: set[str] = set()
        #: reset handling and notices: owned, awaited on stop.
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening = False
        self.closed = False

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Re-queue what was in flight when Roost stopped and resume every agent's lane."""
        if not self._listening:
            self.supervisor.add_listener(self._on_change)
            self._listening = True
        for name in await self.inbox.recover():
            if name in self.supervisor.actors:
                self._lane(name).wake()

    async def stop(self) -> None:
        """Cancel lanes (messages in flight stay queued/delivering: redelivered next time)."""
        self.closed = True
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.cancel()
        await asyncio.gather(*(lane.join() for lane in lanes), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()

    # -- accepting --------------------------------------------------------------------

    def limits(self, name: str) -> DeliveryLimits:
        return DeliveryLimits.of(self.supervisor.actor(name).spec)

    async def submit(
        self, name: str, body: Any, *, idempotency_key: str | None = None
    ) -> tuple[Message, bool]:
        """Store a message durably for agent ``name`` and start its delivery.

        NotFound for an unknown agent, QueueFull over its ``queue_limit``."""
        if self.closed:
            raise errors.StateError("Roost is shutting down; the message was not stored")
        limits = self.limits(name)  # NotFound first: nothing stored for an unknown agent
        message, created = await self.inbox.enqueue(
            name, body, idempotency_key=idempotency_key, limit=limits.queue_limit
        )
        if created:
            self._status(message)
            self._lane(name).wake()
        return message, created

    async def wait_final(self, name: str, message_id: str, timeout: float) -> Message | None:
        """The message once delivered, failed or dead; None if still pending at ``timeout``."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(message_id, []).append(future)
        try:
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

    # -- waking -------------------------------------------------------------------------

    async def wake(self, actor: AgentActor, *, timeout: float, reason: str) -> AgentRecord:
        """``ensure_running`` with the waking notice: announce once per wake when the
        wait exceeds the agent's ``waking_notice_after``."""
        record = actor.record
        if record.awake:
            actor.touch()
            return record
        limits = DeliveryLimits.of(actor.spec)
        started = time.monotonic()
        notice = asyncio.create_task(
            self._notice_after(actor.name, record.state, started, limits.waking_notice_after),
            name=f"roost.waking-notice[{actor.name}]",
        )
        try:
            return await self.supervisor.ensure_running(actor.name, timeout=timeout, reason=reason)
        finally:
            notice.cancel()
            await asyncio.gather(notice, return_exceptions=True)

    async def _notice_after(
        self, name: str, state: AgentState, started: float, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        if name in self._announced:
            return
        self._announced.add(name)
        data = {
            "agent": name,
            "state": state.value,
            "waited_ms": round((time.monotonic() - started) * 1000),
        }
        # Its own task: finishing the wake must not cancel a webhook POST half-way.
        self._spawn(self._announce("agent.waking", data), f"roost.waking[{name}]")

    # -- lifecycle changes --------------------------------------------------------------

    def _on_change(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        if self.closed:
            return  # shutting down: what is left is resumed by the next start
        name = record.name
        for change in changes:
            if change.to_state in ACTIVE_STATES:
                self._announced.discard(name)
            if change.to_state is S.FAILED:
                lane = self._lanes.get(name)
                if lane is not None:
                    lane.agent_failed()
                elif self.inbox.pending_count(name):
                    self._lane(name).wake()
            elif change.from_state is S.FAILED and "reset" in change.reason:
                self._spawn(self._requeue(name), f"roost.requeue[{name}]")

    async def _requeue(self, name: str) -> None:
        ids = await self.inbox.requeue_dead(name)
        for message_id in ids:
            self._publish(
                "message.status", {"message_id": message_id, "agent": name, "status": "queued"}
            )
        if ids and not self.closed and name in self.supervisor.actors:
            log.info("agent %s: reset re-queued %d dead messages", name, len(ids))
            self._lane(name).wake(rewind=True)

    # -- internals ----------------------------------------------------------------------

    def _lane(self, name: str) -> _Lane:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(self, name)
        return lane

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed", name)

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    def cancel(self) -> None:
        for task in (self._task, *self._deliveries):
            if task is not None:
                task.cancel()

    async def join(self) -> None:
        tasks = [t for t in (self._task, *self._deliveries) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

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
            actor = d.supervisor.actors.get(self.name)
            if actor is None or actor.closed:
                return  # the agent was deleted: its messages stay stored
            if self._rewind:
                self._rewind, self._cursor = False, 0
            if actor.record.state is S.FAILED:
                await self._drain_deliveries()
                await self._kill_pending(actor)
                await self._wakeup.wait()
                continue
            self._interrupt.clear()
            batch = await d.inbox.next_queued(self.name, after_seq=self._cursor, limit=FETCH_BATCH)
            batch = [m for m in batch if m.id not in self._in_flight]
            if not batch:
                await self._wakeup.wait()
                continue
            limits = DeliveryLimits.of(actor.spec)
            if slots is None:
                slots = asyncio.Semaphore(limits.max_concurrent_messages)
            generation = self._generation
            for message in batch:
                # In seq order: a message starts only when a slot is free, so with one
                # slot it starts after the previous outcome has been committed.
                await slots.acquire()
                if generation != self._generation or self._rewind:
                    slots.release()
                    break
                self._cursor = message.seq
                self._in_flight.add(message.id)
                task = asyncio.create_task(
                    self._deliver(actor, message, generation, limits),
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

    async def _kill_pending(self, actor: AgentActor) -> None:
        reason = f"agent {self.name!r} failed: {actor.record.last_error or 'gave up restarting'}"
        ids = await self.d.inbox.kill_pending(self.name, reason)
        if ids:
            log.warning(
                "agent %s failed: %d undelivered messages are now dead", self.name, len(ids)
            )
        for message_id in ids:
            dead = Message(message_id, self.name, 0, None, M.DEAD, error=reason)
            self.d._settled(dead)

    # -- one message ----------------------------------------------------------------------

    async def _deliver(
        self, actor: AgentActor, message: Message, generation: int, limits: DeliveryLimits
    ) -> None:
        d = self.d
        attempts = message.attempts
        server_errors = 0
        retries = 0
        while generation == self._generation:
            try:
                # FIFO lock: after a wake, attempts still start in seq order.
                async with self._starting:
                    record = await d.wake(
                        actor, timeout=limits.hold_timeout, reason="message delivery"
                    )
            except errors.NotFound:
                return
            except (errors.ContainerError, errors.StateError) as exc:
                if actor.closed or actor.record.state is S.FAILED:
                    return  # the lane makes it dead
                log.info("agent %s: not awake for delivery (%s); waiting", self.name, exc)
                await self._pause(d.retry_delays[min(retries, len(d.retry_delays) - 1)])
                retries += 1
                continue
            url = record.url
            if url is None:
                continue
            attempts += 1
            # Queued now, committed with this attempt's outcome (see SqliteInbox).
            marking = d.inbox.mark_delivering(message.id, attempts=attempts)
            error: str
            try:
                async with actor.busy():
                    response = await d.agent_client.request(
                        "POST",
                        url + limits.message_path,
                        body=json.dumps(message.body).encode(),
                        headers=(
                            (b"content-type", b"application/json"),
                            (_MESSAGE_ID_KEY, message.id.encode()),
                        ),
                        timeout=d.delivery_timeout,
                    )
            except (ConnectionError, TimeoutError, OSError) as exc:
                error = f"no answer from the agent: {exc or type(exc).__name__}"
            else:
                status = response.status
                reply = _decoded_reply(response.body)
                if 200 <= status < 300:
                    await d.inbox.mark_delivered(message, reply)
                    await marking
                    d._settled(
                        dataclasses.replace(
                            message, status=M.DELIVERED, attempts=attempts, reply=reply
                        )
                    )
                    return
                error = f"HTTP {status}: {_excerpt(reply)}"
                server_errors += status >= 500
                if status < 500 or server_errors >= d.max_server_errors:
                    await d.inbox.mark_failed(message, error)
                    await marking
                    d._settled(
                        dataclasses.replace(
                            message, status=M.FAILED, attempts=attempts, error=error
                        )
                    )
                    return
            delay = d.retry_delays[min(retries, len(d.retry_delays) - 1)]
            retries += 1
            await d.inbox.mark_retry(message.id, error, next_attempt_at=time.time() + delay)
            await marking
            d._status(dataclasses.replace(message, status=M.QUEUED, attempts=attempts))
            log.info(
                "agent %s: message %s attempt %d failed (%s); retrying in %gs",
                self.name,
                message.id,
                attempts,
                error,
                delay,
            )
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, cut short when the agent fails."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._interrupt.wait()


def _decoded_reply(raw: bytes) -> Any:
    """The agent's answer: JSON when it parses, else its text (None when empty)."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


def _excerpt(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    return text if len(text) <= ERROR_EXCERPT else text[: ERROR_EXCERPT - 3] + "..."

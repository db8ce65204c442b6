"""Pull mode: agents with ``delivery = "pull"`` take their messages from a queue.

Role: the meeting point of an agent's delivery lane (``roost.reactor.delivering``),
which *offers* each message in turn, and the agent's own requests
(``roost.api.agent_endpoints``):

- ``POST /api/agents/{name}/queue/next?wait=S`` → :meth:`Pulls.next` takes the
  oldest offered message (or waits up to S seconds for one) and leases it for the
  agent's ``lease_timeout``;
- ``.../queue/{id}/heartbeat`` → :meth:`Pulls.heartbeat` renews a lease
  (``Conflict`` → 409 when the lease was lost);
- ``.../queue/{id}/complete`` → :meth:`Pulls.complete` hands the reply (or the
  error) to the lane, which records it; the call returns once it is stored.

Invariants:
- Order: the lane offers messages in ``seq`` order, at most
  ``max_concurrent_messages`` at a time (1 by default: strictly one after the
  other), and ``next`` always takes the oldest offered one; a lease that expires
  goes back to the lane, which offers the same message again at once, with
  ``attempt`` + 1, before any newer one.
- A lease is recorded like a push attempt (``delivering``, ``attempts`` + 1; the
  write rides with the outcome). Leases live in memory: after a Roost restart a
  leased message is offered again (at-least-once, same id), and a ``complete``
  for it is still accepted while it is pending — the holder's reply is kept and
  the lane moves on.
- An offer is withdrawn (never left for a poll to take) when the agent leaves
  the awake states or fails; the lane wakes the agent and offers it again.
- Waits run on the injected clock. Nothing here touches the agent's container.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from roost import aio, errors
from roost.ports.clock import Clock
from roost.ports.inbox import PENDING, Inbox, Message, MessageStatus
from roost.reactor.attempts import Outcome

__all__ = ["Lease", "Pulls"]

log = logging.getLogger("roost.pulling")

LeaseState = Literal["offered", "leased", "withdrawn", "expired", "ended"]


@dataclasses.dataclass(eq=False)
class Lease:
    """One message offered to (and perhaps taken by) a pull agent."""

    message: Message
    #: the attempt number a taker gets (the message's attempts + 1).
    attempt: int
    lease_timeout: float
    state: LeaseState = "offered"
    #: wall-clock seconds (the clock's ``now``) when the lease runs out.
    expires_at: float = 0.0
    #: the ``delivering`` write of a taken lease (lazy; awaited with the outcome).
    marking: Awaitable[object] | None = None
    #: set when it was taken, withdrawn or answered while offered.
    moved: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: set when the agent answered (complete).
    answered: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    outcome: Outcome | None = None
    #: resolved by the lane with the stored message once the outcome is recorded.
    recorded: asyncio.Future[Message] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _Queue:
    def __init__(self) -> None:
        self.offers: dict[str, Lease] = {}
        #: polls waiting for an offer, oldest first; each offer wakes one (no herd).
        self.waiting: collections.deque[asyncio.Event] = collections.deque()
        #: ids completed while no lease of theirs was in flight: the lane skips them.
        self.done_early: set[str] = set()


class Pulls:
    """Every pull agent's offers and leases (see the module docstring)."""

    def __init__(
        self,
        *,
        inbox: Inbox,
        clock: Clock,
        settled: Callable[[Message], None],
        awake: Callable[[str], bool],
    ) -> None:
        self._inbox = inbox
        self._clock = clock
        self._settled = settled
        self._awake = awake
        self._queues: dict[str, _Queue] = {}
        self.closed = False

    def _queue(self, agent: str) -> _Queue:
        queue = self._queues.get(agent)
        if queue is None:
            queue = self._queues[agent] = _Queue()
        return queue

    # -- the lane's side -----------------------------------------------------------

    async def offer(
        self, message: Message, *, attempt: int, lease_timeout: float
    ) -> Lease | Outcome | None:
        """Offer the message to the agent's pollers and wait until one takes it.

        Returns the taken ``Lease``; ``Outcome("settled")`` when the agent completed
        the message already; None when the offer was withdrawn (the agent went to
        sleep or failed) before anyone took it."""
        queue = self._queue(message.agent)
        if message.id in queue.done_early:
            queue.done_early.discard(message.id)
            return Outcome("settled")
        if not self._awake(message.agent):
            return None
        lease = Lease(message, attempt, lease_timeout)
        queue.offers[message.id] = lease
        self._wake_one(queue)
        try:
            await lease.moved.wait()
        finally:
            taken = lease.state == "leased" or lease.outcome is not None
            if not taken and queue.offers.get(message.id) is lease:
                del queue.offers[message.id]
        if lease.state == "withdrawn" or (lease.state == "offered" and lease.outcome is None):
            return None
        return lease

    async def outcome(self, lease: Lease) -> Outcome:
        """Wait for the agent's answer to a taken lease, or its expiry."""
        while lease.outcome is None:
            remaining = lease.expires_at - self._clock.now()
            if remaining <= 0:
                lease.state = "expired"
                self._forget(lease)
                return Outcome.no_answer(
                    f"lease expired: no complete or heartbeat within {lease.lease_timeout:g}s"
                )
            await aio.sleep(self._clock, remaining, wakeup=lease.answered)
        return lease.outcome

    def finish(self, lease: Lease, stored: Message | None) -> None:
        """The lane recorded the lease's outcome (``stored``; None: nothing stored)."""
        lease.state = "ended"
        self._forget(lease)
        if not lease.recorded.done():
            if stored is None:
                lease.recorded.set_exception(
                    errors.Conflict(f"message {lease.message.id} was not recorded")
                )
                lease.recorded.exception()  # retrieved: a caller may have gone
            else:
                lease.recorded.set_result(stored)

    def withdraw(self, agent: str) -> None:
        """The agent went to sleep or failed: offers nobody took are withdrawn."""
        queue = self._queues.get(agent)
        if queue is None:
            return
        for lease in list(queue.offers.values()):
            if lease.state == "offered" and lease.outcome is None:
                lease.state = "withdrawn"
                lease.moved.set()

    def close(self) -> None:
        """Shutdown: polls waiting now (and later ones) answer at once with nothing,
        so no agent's long poll holds the server open; its next poll reaches the
        next Roost."""
        self.closed = True
        for queue in self._queues.values():
            while queue.waiting:
                queue.waiting.popleft().set()

    def forget_agent(self, agent: str) -> None:
        """The agent was deleted (or reset): drop what is remembered of it."""
        self.withdraw(agent)
        queue = self._queues.get(agent)
        if queue is not None:
            queue.done_early.clear()

    # -- the agent's side ----------------------------------------------------------

    async def next(self, agent: str, *, wait: float) -> Lease | None:
        """Take the oldest offered message (leased from now on), waiting up to ``wait``
        seconds for one; None when none came."""
        queue = self._queue(agent)
        deadline = self._clock.monotonic() + wait
        while True:
            offered = [
                lease
                for lease in queue.offers.values()
                if lease.state == "offered" and lease.outcome is None
            ]
            if offered:
                lease = min(offered, key=lambda lease: lease.message.seq)
                lease.state = "leased"
                lease.expires_at = self._clock.now() + lease.lease_timeout
                # Lazy, like a push attempt: committed with the outcome (a crash before
                # that leaves the message queued, and it is offered again).
                lease.marking = self._inbox.mark_delivering(
                    lease.message.id, attempts=lease.attempt
                )
                lease.moved.set()
                if len(offered) > 1:
                    self._wake_one(queue)  # more are waiting: pass the word on
                return lease
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0 or self.closed:
                return None
            woken = asyncio.Event()
            queue.waiting.append(woken)
            try:
                await aio.sleep(self._clock, remaining, wakeup=woken)
            except BaseException:
                if woken.is_set():
                    self._wake_one(queue)  # a wake-up meant for an offer goes on, not lost
                raise
            finally:
                if not woken.is_set():
                    with contextlib.suppress(ValueError):
                        queue.waiting.remove(woken)

    def heartbeat(self, agent: str, message_id: str) -> float:
        """Renew the message's lease; its new expiry. Conflict when it holds none."""
        lease = self._in_flight(agent, message_id)
        if lease is None or lease.state != "leased" or lease.outcome is not None:
            raise errors.Conflict(
                f"agent {agent!r} holds no lease on message {message_id!r}: it expired, "
                "was completed, or Roost restarted; take the next message instead"
            )
        lease.expires_at = self._clock.now() + lease.lease_timeout
        return lease.expires_at

    async def complete(self, agent: str, message_id: str, outcome: Outcome) -> Message:
        """Record the agent's answer to a pending message; the stored message once it
        is durable. NotFound for an unknown message, Conflict for a settled one."""
        lease = self._in_flight(agent, message_id)
        if lease is not None:
            return await self._answer(lease, outcome)
        message = await self._inbox.get(agent, message_id)
        if message is None:
            raise errors.NotFound(f"agent {agent!r} has no message {message_id!r}")
        lease = self._in_flight(agent, message_id)  # offered again while we looked?
        if lease is not None:
            return await self._answer(lease, outcome)
        if message.status not in PENDING:
            raise errors.Conflict(
                f"message {message_id!r} of agent {agent!r} is already {message.status.value}"
            )
        # Pending but not on offer (between leases, or Roost restarted since it was
        # taken): record it here; the lane skips it when its turn comes.
        queue = self._queue(agent)
        queue.done_early.add(message_id)
        if outcome.kind == "reply":
            await self._inbox.mark_delivered(message, outcome.value)
            final = dataclasses.replace(
                message, status=MessageStatus.DELIVERED, reply=outcome.value
            )
        else:
            await self._inbox.mark_failed(message, str(outcome.value))
            final = dataclasses.replace(
                message, status=MessageStatus.FAILED, error=str(outcome.value)
            )
        self._settled(final)
        return final

    # -- internals -------------------------------------------------------------------

    def _in_flight(self, agent: str, message_id: str) -> Lease | None:
        queue = self._queues.get(agent)
        lease = queue.offers.get(message_id) if queue is not None else None
        if lease is None or lease.state not in ("offered", "leased"):
            return None
        return lease

    async def _answer(self, lease: Lease, outcome: Outcome) -> Message:
        if lease.outcome is not None:
            # Answered already (a repeated complete): wait for that record, then say so.
            stored = await asyncio.shield(lease.recorded)
            raise errors.Conflict(
                f"message {stored.id!r} of agent {stored.agent!r} is already {stored.status.value}"
            )
        lease.outcome = outcome
        lease.answered.set()
        lease.moved.set()
        # The lane records it; shielded: a caller that goes away does not undo it.
        return await asyncio.shield(lease.recorded)

    @staticmethod
    def _wake_one(queue: _Queue) -> None:
        """Wake the oldest waiting poll (it takes the oldest offer)."""
        if queue.waiting:
            queue.waiting.popleft().set()

    def _forget(self, lease: Lease) -> None:
        queue = self._queues.get(lease.message.agent)
        if queue is not None and queue.offers.get(lease.message.id) is lease:
            del queue.offers[lease.message.id]

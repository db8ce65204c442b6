"""Leases: keep an agent awake during long work that makes no requests.

A holder (say, a coordinator waiting on a long model call) takes a lease with a
TTL; while any lease on an agent is held, the agent counts as busy, so idling
never pauses or stops it. Taking a lease wakes a sleeping agent and returns once
it answers its health check. A lease ends when it is released, when its TTL runs
out (a timer on the engine's clock), or when ``close`` runs at shutdown.

Invariants:
- A held lease is exactly one entered ``Agents.busy`` context; every way a
  lease ends exits it exactly once (the table entry is removed first, so a
  release racing the expiry timer finds nothing to do).
- TTLs are float seconds in ``(0, MAX_TTL]``; anything else is ``ValueError``
  naming ``ttl``, raised before anything happens.
- A lease that could not wake its agent is never kept: ``grant`` releases it and
  re-raises.
- Leases live in memory: a restarted Roost has none (holders take them again).
- ``lease.granted``, ``lease.released`` and ``lease.expired`` go to the event hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
from typing import Any

from roost import errors
from roost.aio import TaskSet
from roost.ports.clock import Clock
from roost.reactor.agents import Agents
from roost.reactor.eventing import EventHub

__all__ = ["MAX_TTL", "Lease", "Leases", "validate_ttl"]

log = logging.getLogger("roost.leases")

#: The longest lease: one day. Longer work renews its lease.
MAX_TTL = 24 * 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    id: str
    agent: str
    holder: str
    ttl: float
    #: wall-clock seconds since the epoch (like every time Roost stores).
    granted_at: float
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Held:
    __slots__ = ("busy", "lease", "timer")

    def __init__(self, lease: Lease, busy: contextlib.AsyncExitStack) -> None:
        self.lease = lease
        self.busy = busy
        self.timer: asyncio.Task[None] | None = None


def validate_ttl(ttl: object) -> float:
    """``ttl`` as float seconds, or ValueError naming ``ttl`` and the allowed range."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ValueError(f"ttl must be a number of seconds, not {ttl!r}")
    value = float(ttl)
    if not math.isfinite(value) or value <= 0 or value > MAX_TTL:
        raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL:g} seconds, not {ttl!r}")
    return value


class Leases:
    """Every lease held on the engine's agents."""

    def __init__(self, agents: Agents, *, clock: Clock, events: EventHub) -> None:
        self._agents = agents
        self._clock = clock
        self._events = events
        self._held: dict[str, _Held] = {}
        #: expiry timers, running or cancelled but not yet finished (``close`` awaits them).
        self._timers = TaskSet(log)
        self.closed = False

    def list(self, agent: str) -> list[Lease]:
        """Leases held on ``agent``, oldest first (NotFound for an unknown agent)."""
        self._agents.get(agent)
        found = [h.lease for h in self._held.values() if h.lease.agent == agent]
        return sorted(found, key=lambda lease: lease.granted_at)

    def get(self, agent: str, lease_id: str) -> Lease:
        """A held lease (NotFound for an unknown agent or lease)."""
        self._agents.get(agent)
        held = self._held.get(lease_id)
        if held is None or held.lease.agent != agent:
            raise errors.NotFound(f"agent {agent!r} holds no lease {lease_id!r}")
        return held.lease

    async def grant(
        self, agent: str, ttl: float, *, holder: str = "", wake_timeout: float | None = None
    ) -> Lease:
        """Take a lease on ``agent`` and wake it; returns once the agent is running.

        Raises ValueError (bad ``ttl``), NotFound, or what ``Agents.wake`` raises
        (the lease is then not kept). ``wake_timeout`` defaults to the agent's
        ``startup_timeout``.
        """
        seconds = validate_ttl(ttl)
        if self.closed:
            raise errors.StateError("roost is shutting down")
        spec = self._agents.spec(agent)
        now = self._clock.now()
        lease = Lease(
            id=secrets.token_hex(8),
            agent=agent,
            holder=holder,
            ttl=seconds,
            granted_at=now,
            expires_at=now + seconds,
        )
        busy = contextlib.AsyncExitStack()
        await busy.enter_async_context(self._agents.busy(agent))
        held = _Held(lease, busy)
        self._held[lease.id] = held
        held.timer = self._start_timer(lease, seconds)
        timeout = wake_timeout if wake_timeout is not None else spec.startup_timeout
        try:
            await self._agents.wake(agent, reason="lease taken", timeout=timeout)
        except BaseException:
            await self._end(lease.id, None)
            raise
        self._events.publish("lease.granted", _event_data(lease))
        return lease

    async def renew(self, agent: str, lease_id: str, ttl: float) -> Lease:
        """Give a held lease a new TTL counted from now."""
        seconds = validate_ttl(ttl)
        self.get(agent, lease_id)
        held = self._held[lease_id]
        now = self._clock.now()
        held.lease = dataclasses.replace(held.lease, ttl=seconds, expires_at=now + seconds)
        if held.timer is not None:
            held.timer.cancel()
        held.timer = self._start_timer(held.lease, seconds)
        return held.lease

    async def release(self, agent: str, lease_id: str) -> Lease:
        """End a lease now (NotFound when the agent holds no such lease)."""
        lease = self.get(agent, lease_id)
        await self._end(lease_id, "lease.released")
        return lease

    async def close(self) -> None:
        """End every lease (shutdown): timers cancelled, busy contexts exited."""
        self.closed = True
        for lease_id in list(self._held):
            await self._end(lease_id, None)
        await self._timers.join()

    def _start_timer(self, lease: Lease, seconds: float) -> asyncio.Task[None]:
        return self._timers.spawn(
            self._expire_after(lease.id, seconds), f"roost.lease[{lease.agent}/{lease.id}]"
        )

    async def _expire_after(self, lease_id: str, seconds: float) -> None:
        await self._clock.sleep(seconds)
        held = self._held.get(lease_id)
        if held is not None and held.timer is asyncio.current_task():
            held.timer = None  # ending the lease must not cancel this very task
            await self._end(lease_id, "lease.expired")

    async def _end(self, lease_id: str, kind: str | None) -> None:
        held = self._held.pop(lease_id, None)
        if held is None:
            return
        if held.timer is not None:
            held.timer.cancel()
        try:
            await held.busy.aclose()
        except Exception:
            log.exception("lease %s: releasing the agent's busy mark failed", lease_id)
        if kind is not None:
            log.info("agent %s: %s %s", held.lease.agent, kind, lease_id)
            self._events.publish(kind, _event_data(held.lease))


def _event_data(lease: Lease) -> dict[str, Any]:
    """A lease as an event's data: its id as ``lease`` (an event's own ``id`` is the
    hub's, which SSE resumes from)."""
    data = lease.to_json()
    data["lease"] = data.pop("id")
    return data

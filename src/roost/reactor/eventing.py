"""The event hub: one ordered stream of what happens in Roost, for SSE and the CLI.

Lifecycle changes, message status changes and ``agent.waking`` notices are
published here. Subscribers get the backlog after a ``Last-Event-ID`` and then
live events.

Invariants:
- Event ids are integers, strictly increasing, and start from the boot time in
  microseconds, so an id handed out before a Roost restart is still older than
  every id after it (a resume after a restart gets the whole buffer, not nothing).
- ``publish`` never blocks and never raises: a subscriber that stops reading is
  dropped (its stream ends with a ``stream.overflow`` event) rather than slowing
  Roost down.
- The buffer holds the last ``capacity`` events; older ones are gone.
- Listeners (``add_listener``) see every event synchronously, in order, as it is
  published (metrics count from them); one that raises is logged, never stops the
  others or the publisher.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from roost.ports.clock import Clock

__all__ = ["EventHub", "HubEvent", "HubListener"]

log = logging.getLogger("roost.events")


@dataclasses.dataclass(frozen=True, slots=True)
class HubEvent:
    id: int
    kind: str
    data: dict[str, Any]
    at: float

    def to_json(self) -> dict[str, Any]:
        # The event's own fields last: data never hides the id SSE resumes from.
        return {**self.data, "id": self.id, "kind": self.kind, "at": self.at}


#: Told of every event as it is published (synchronously: it must not block).
HubListener = Callable[[HubEvent], None]


class _Subscriber:
    __slots__ = ("overflowed", "queue")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[HubEvent] = asyncio.Queue(size)
        self.overflowed = False


class EventHub:
    """Events stamped with ``clock.now()`` (the engine's injected clock)."""

    def __init__(
        self, *, clock: Clock, capacity: int = 10_000, subscriber_queue: int = 10_000
    ) -> None:
        self._clock = clock
        self._buffer: collections.deque[HubEvent] = collections.deque(maxlen=capacity)
        self._ids = itertools.count(int(clock.now() * 1_000_000))
        self._subscribers: set[_Subscriber] = set()
        self._queue_size = subscriber_queue
        self._listeners: list[HubListener] = []

    def add_listener(self, listener: HubListener) -> None:
        """Call ``listener(event)`` for every event published from now on."""
        self._listeners.append(listener)

    def publish(self, kind: str, data: dict[str, Any], *, at: float | None = None) -> HubEvent:
        event = HubEvent(next(self._ids), kind, data, self._clock.now() if at is None else at)
        self._buffer.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", kind)
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.overflowed = True
                self._subscribers.discard(sub)
        return event

    def since(self, last_id: int | None) -> list[HubEvent]:
        if last_id is None:
            return []
        return [e for e in self._buffer if e.id > last_id]

    def recent(self, limit: int) -> list[HubEvent]:
        return list(self._buffer)[-limit:] if limit > 0 else []

    async def subscribe(self, last_id: int | None = None) -> AsyncIterator[HubEvent]:
        """Backlog after ``last_id``, then live events, until cancelled."""
        sub = _Subscriber(self._queue_size)
        self._subscribers.add(sub)
        try:
            newest = last_id
            for event in self.since(last_id):
                newest = event.id
                yield event
            while True:
                if sub.overflowed and sub.queue.empty():
                    yield HubEvent(0, "stream.overflow", {"reason": "subscriber too slow"}, 0.0)
                    return
                event = await sub.queue.get()
                if newest is not None and event.id <= newest:
                    continue  # already sent from the backlog
                yield event
        finally:
            self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

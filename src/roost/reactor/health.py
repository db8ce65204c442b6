"""Roost's own health: what keeps it from doing its job right now.

Two conditions are tracked: the Docker engine unreachable (``engine``) and the
state database failing writes (``store``). They are the engine's and the disk's
bad days, not the agents': while one holds, Roost waits and retries instead of
failing agents or losing messages.

Invariants:
- One notice when a condition begins and one when it ends, however many calls
  report it meanwhile (``engine.unavailable`` / ``engine.recovered``,
  ``store.degraded`` / ``store.recovered``), each logged as one line.
- ``problems()`` names every condition that holds now with its reason
  (``GET /healthz`` shows it as ``degraded``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from roost.aio import TaskSet
from roost.ports.clock import Clock

__all__ = ["Condition", "Health"]

log = logging.getLogger("roost.health")

Condition = Literal["engine", "store"]

_NOTICES: dict[Condition, tuple[str, str]] = {
    "engine": ("engine.unavailable", "engine.recovered"),
    "store": ("store.degraded", "store.recovered"),
}

Announce = Callable[[str, dict[str, Any]], Coroutine[Any, Any, None]]


class Health:
    """The conditions that hold now, and their notices."""

    def __init__(self, *, clock: Clock, announce: Announce) -> None:
        self._clock = clock
        self._announce = announce
        self._since: dict[Condition, float] = {}
        self._reasons: dict[Condition, str] = {}
        self._notices = TaskSet(log)

    def holds(self, condition: Condition) -> bool:
        return condition in self._since

    def problems(self) -> dict[str, str]:
        """Every condition that holds now, with its reason."""
        return {condition: self._reasons[condition] for condition in sorted(self._since)}

    def fail(self, condition: Condition, reason: str) -> bool:
        """Report the condition; True when it just began (then it is announced)."""
        self._reasons[condition] = reason
        if condition in self._since:
            return False
        self._since[condition] = self._clock.monotonic()
        kind = _NOTICES[condition][0]
        log.warning("%s: %s", kind, reason)
        self._notices.spawn(self._announce(kind, {"reason": reason}), f"roost.{kind}")
        return True

    def clear(self, condition: Condition) -> bool:
        """The condition is over; True when it held (then its end is announced)."""
        since = self._since.pop(condition, None)
        if since is None:
            return False
        reason = self._reasons.pop(condition, "")
        lasted = round(self._clock.monotonic() - since, 3)
        kind = _NOTICES[condition][1]
        log.warning("%s after %.1f s (was: %s)", kind, lasted, reason)
        self._notices.spawn(
            self._announce(kind, {"after_seconds": lasted, "was": reason}), f"roost.{kind}"
        )
        return True

    async def close(self) -> None:
        await self._notices.join()

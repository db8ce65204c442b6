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
- A condition without a probe ends when a success is reported (``clear``).
- A condition given a probe (``probe_with``) ends only when the probe succeeds
  after ``SETTLE`` seconds without a reported failure; it is rechecked with
  backoff (``RECHECK``) while it holds, and at once when a success is reported.
  So a full disk that is freed is announced recovered even when nothing else
  writes, and a nearly full one, where small writes still fit and larger ones
  fail, is not announced recovered and degraded over and over.
- ``until_written``: a state write the database refuses is retried with backoff
  until stored (``store`` reported meanwhile), never dropped and never counted
  against an agent.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from roost import aio, errors
from roost.core.backoff import Backoff
from roost.ports.clock import Clock

__all__ = [
    "RECHECK",
    "SETTLE",
    "WRITE_RETRY",
    "Condition",
    "Health",
    "Probe",
    "until_written",
]

log = logging.getLogger("roost.health")

Condition = Literal["engine", "store"]

_NOTICES: dict[Condition, tuple[str, str]] = {
    "engine": ("engine.unavailable", "engine.recovered"),
    "store": ("store.degraded", "store.recovered"),
}

Announce = Callable[[str, dict[str, Any]], Coroutine[Any, Any, None]]
#: Checks that a condition is over; raises a ``RoostError`` while it holds.
Probe = Callable[[], Coroutine[Any, Any, object]]

#: Rechecks of a condition that has a probe: soon at first, then once a second.
RECHECK = Backoff.doubling(0.05, 1.0)
#: Seconds without a reported failure before a probed condition may end.
SETTLE = 1.0
#: Retries of a write the state database refused (an agent's record, a delivery's
#: outcome): retried until stored, never dropped.
WRITE_RETRY = Backoff.doubling(0.05, 5.0)

T = TypeVar("T")


async def until_written(
    write: Callable[[], Awaitable[T]],
    *,
    clock: Clock,
    health: Health | None,
    refused: Callable[[errors.StoreError], None] | None = None,
) -> T:
    """``write()`` (a state write), again with ``WRITE_RETRY`` on ``clock`` while the
    database refuses it; ``store`` is reported failed meanwhile and cleared once it is
    written. ``refused`` is told of the first refusal."""
    failures = 0
    while True:
        try:
            result = await write()
        except errors.StoreError as exc:
            if health is not None:
                health.fail("store", str(exc))
            if failures == 0 and refused is not None:
                refused(exc)
            await clock.sleep(WRITE_RETRY.delay(failures) or 0.0)
            failures += 1
            continue
        if health is not None:
            health.clear("store")
        return result


class Health:
    """The conditions that hold now, and their notices."""

    def __init__(self, *, clock: Clock, announce: Announce) -> None:
        self._clock = clock
        self._announce = announce
        self._since: dict[Condition, float] = {}
        self._reasons: dict[Condition, str] = {}
        self._last_failure: dict[Condition, float] = {}
        self._notices = aio.TaskSet(log)
        self._probes: dict[Condition, Probe] = {}
        #: set when a success is reported: the recheck looks at once.
        self._succeeded: dict[Condition, asyncio.Event] = {}
        self._rechecks = aio.TaskSet(log)

    def probe_with(self, condition: Condition, probe: Probe) -> None:
        """Let ``probe`` decide when ``condition`` ends (see the module docstring)."""
        self._probes[condition] = probe
        self._succeeded[condition] = asyncio.Event()

    def holds(self, condition: Condition) -> bool:
        return condition in self._since

    def problems(self) -> dict[str, str]:
        """Every condition that holds now, with its reason."""
        return {condition: self._reasons[condition] for condition in sorted(self._since)}

    def fail(self, condition: Condition, reason: str) -> bool:
        """Report the condition; True when it just began (then it is announced)."""
        self._reasons[condition] = reason
        self._last_failure[condition] = self._clock.monotonic()
        if condition in self._since:
            return False
        self._since[condition] = self._clock.monotonic()
        kind = _NOTICES[condition][0]
        log.warning("%s: %s", kind, reason)
        self._notices.spawn(self._announce(kind, {"reason": reason}), f"roost.{kind}")
        probe = self._probes.get(condition)
        if probe is not None:
            self._rechecks.spawn(self._recheck(condition, probe), f"roost.{condition}-recheck")
        return True

    def clear(self, condition: Condition) -> bool:
        """A success: the condition is over (then its end is announced and True is
        returned), or, when it has a probe, the probe looks again now."""
        if condition not in self._since:
            return False
        succeeded = self._succeeded.get(condition)
        if succeeded is not None:
            succeeded.set()
            return False
        return self._end(condition)

    def _end(self, condition: Condition) -> bool:
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

    def _quiet_for(self, condition: Condition) -> float:
        return self._clock.monotonic() - self._last_failure.get(condition, -math.inf)

    async def _recheck(self, condition: Condition, probe: Probe) -> None:
        succeeded = self._succeeded[condition]
        succeeded.clear()
        failures = 0
        while condition in self._since:
            quiet = self._quiet_for(condition)
            if quiet < SETTLE:
                await self._clock.sleep(SETTLE - quiet)
                continue
            try:
                await probe()
            except errors.RoostError:
                failures += 1
                await aio.sleep(self._clock, RECHECK.delay(failures) or 0.0, wakeup=succeeded)
                succeeded.clear()
                continue
            if self._quiet_for(condition) >= SETTLE:  # no failure while it probed
                self._end(condition)

    async def close(self) -> None:
        await self._rechecks.close()
        await self._notices.join()

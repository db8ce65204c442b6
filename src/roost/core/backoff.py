"""Backoff as data: the delays between attempts, one type for every retry in Roost.

``Backoff(delays)`` lists the delay before each retry (kopf's ``error_delays``);
after the last one it either gives up (a budget: ``delay`` returns None) or, with
``repeat=True``, keeps waiting the last delay. ``Backoff.doubling(first, cap)``
is the exponential shape (first, 2×first, 4×first ... capped).

Users: crash restarts (``restart_delay``: ``restart_backoff`` doubling up to
``restart_backoff_max``), delivery retries, transient Docker errors of jobs, webhook
retries, the Docker event stream's reconnects.
"""

from __future__ import annotations

import dataclasses
import functools

from roost.core.policy import Policy

__all__ = ["Backoff", "restart_delay", "restart_delays"]

#: Doubling stops growing the tuple once it reaches the cap, or after this many steps.
_MAX_DOUBLINGS = 62


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """The delay before retry ``n + 1`` is ``delays[n]`` (``n`` failures so far)."""

    delays: tuple[float, ...]
    #: past the last delay: repeat it (True) or give up (False, a retry budget).
    repeat: bool = False

    def __post_init__(self) -> None:
        if any(d < 0 for d in self.delays):
            raise ValueError(f"backoff delays must not be negative: {self.delays}")
        if self.repeat and not self.delays:
            raise ValueError("a repeating backoff needs at least one delay")

    @staticmethod
    def doubling(first: float, cap: float) -> Backoff:
        """``first``, doubling each time, capped at ``cap``, repeating the cap.
        ``first <= 0``: no delay at all."""
        return _doubling(first, cap)

    def delay(self, failures: int) -> float | None:
        """The delay before the next attempt after ``failures`` failures (counted
        from 0), or None when a budget is spent."""
        n = max(failures, 0)
        if n < len(self.delays):
            return self.delays[n]
        return self.delays[-1] if self.repeat else None

    @property
    def budget(self) -> int | None:
        """How many retries a budget allows; None when it repeats forever."""
        return None if self.repeat else len(self.delays)


def restart_delay(policy: Policy, restarts_so_far: int) -> float:
    """The delay before restart number ``restarts_so_far + 1``: ``restart_backoff``
    doubling up to ``restart_backoff_max``."""
    delay = Backoff.doubling(policy.restart_backoff, policy.restart_backoff_max).delay(
        restarts_so_far
    )
    assert delay is not None  # doubling repeats
    return delay


def restart_delays(policy: Policy) -> tuple[float, ...]:
    """The whole sequence of delays up to ``max_restarts`` (for display and docs)."""
    return tuple(restart_delay(policy, n) for n in range(policy.max_restarts))


@functools.cache
def _doubling(first: float, cap: float) -> Backoff:
    if first <= 0:
        return Backoff((0.0,), repeat=True)
    delays: list[float] = []
    delay = first
    for _ in range(_MAX_DOUBLINGS):
        delays.append(min(delay, cap))
        if delay >= cap:
            break
        delay *= 2
    return Backoff(tuple(delays), repeat=True)

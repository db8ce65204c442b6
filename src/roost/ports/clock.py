"""The clock port. Time-driven logic (idle, backoff, timeouts) reads time only here,
so tests can run it on fake time."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Clock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall clock; stored in records)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic clock (for measuring durations)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep on this clock. Cancellation interrupts it."""
        ...

"""Roost's asyncio kit: one interruptible sleep on an injected clock, one owner of
background tasks.

- :func:`sleep` — ``await sleep(clock, delay, wakeup=event)`` waits ``delay``
  seconds on ``clock`` (the system clock, or ``FakeClock`` in tests) or until
  ``wakeup`` is set, whichever comes first, and says which. Every wait in Roost
  that must be cut short (a retry pause when the agent fails, a lane waiting for
  work) is this one function.
- :class:`TaskSet` — every background task is named, owned and awaited (kopf's
  habit): ``spawn`` starts a guarded task (an unexpected exception is logged with
  the task's name, never lost, never raised into the event loop's handler), and
  ``close`` cancels what is left and waits for it, so shutdown follows a written
  order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

__all__ = ["SleepClock", "TaskSet", "sleep"]

T = TypeVar("T")


class SleepClock(Protocol):
    async def sleep(self, seconds: float) -> None: ...


async def sleep(clock: SleepClock, delay: float, *, wakeup: asyncio.Event | None = None) -> bool:
    """Sleep ``delay`` seconds on ``clock``, or until ``wakeup`` is set.

    Returns True when ``wakeup`` cut the sleep short (or was set already)."""
    if wakeup is None:
        await clock.sleep(delay)
        return False
    if wakeup.is_set():
        return True
    timer = asyncio.ensure_future(clock.sleep(delay))
    woken = asyncio.ensure_future(wakeup.wait())
    try:
        await asyncio.wait((timer, woken), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (timer, woken):
            if not task.done():
                task.cancel()
        await asyncio.gather(timer, woken, return_exceptions=True)
    return wakeup.is_set()


class TaskSet:
    """Background tasks owned by one component (see the module docstring)."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T | None]:
        """Run ``work`` as a task named ``name``; an exception it raises is logged."""

        async def guarded() -> T | None:
            try:
                return await work
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("%s failed", name)
                return None

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def join(self) -> None:
        """Wait for every task to finish on its own."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel every task and wait until all have ended."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

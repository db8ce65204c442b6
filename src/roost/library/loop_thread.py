"""``LoopThread``: a private asyncio event loop on a thread of its own.

Role: the synchronous library classes run their async twin's coroutines here,
as kopf's ``KopfRunner`` runs an operator: ``run(coroutine)`` submits it to the
private loop and blocks the calling thread until it is done. That works the same
from a plain script, from any thread, and from code that itself runs inside an
event loop (a FastAPI handler, Jupyter): the caller's loop is blocked for the
call, but nothing Roost does needs that loop, so nothing waits on it.

Invariants:
- The thread starts on the first ``run`` and ends in ``stop`` (idempotent); a
  ``run`` after ``stop`` starts a fresh one. No ``atexit`` or ``__del__``: the
  thread is a daemon, so a script that never calls ``stop`` still exits.
- ``stop`` lets the loop finish the way ``asyncio.run`` does: tasks still
  running are cancelled and awaited, async generators and the default executor
  are shut down, then the loop is closed.
- Calling ``run`` or ``stop`` from the loop's own thread would deadlock: it
  raises ``RuntimeError`` instead.
- A caller interrupted while waiting (``KeyboardInterrupt``) cancels its work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """A private event loop on a daemon thread named ``name`` (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        """Whether the thread and its loop are up."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the private loop; block until it returns or raises."""
        if self._on_own_thread():
            work.close()
            raise RuntimeError(
                f"{self._name}: a synchronous Roost call from inside its own event loop "
                "would deadlock; use the Async class there"
            )
        loop = self._started()
        future = asyncio.run_coroutine_threadsafe(work, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted while waiting: do not leave the work running
            raise

    def stop(self) -> None:
        """Finish the loop (cancelling what still runs) and join the thread. Idempotent."""
        if self._on_own_thread():
            raise RuntimeError(f"{self._name}: cannot stop the loop from inside it")
        with self._lock:
            thread, loop, stopping = self._thread, self._loop, self._stopping
            self._thread = self._loop = self._stopping = None
        if thread is None or loop is None or stopping is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(stopping.set)
        thread.join()

    # -- internals ---------------------------------------------------------------------

    def _on_own_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._loop is None:
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._main, args=(ready,), name=self._name, daemon=True
                )
                thread.start()
                ready.wait()
                self._thread = thread
            assert self._loop is not None
            return self._loop

    def _main(self, ready: threading.Event) -> None:
        try:
            with asyncio.Runner() as runner:
                runner.run(self._serve(ready))
        finally:
            ready.set()  # never leave _started waiting, even if the loop failed to start

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        ready.set()
        await self._stopping.wait()

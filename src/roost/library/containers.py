"""``ContainerManager`` and ``AsyncContainerManager``: agents started on demand and
kept alive, a drop-in for the synchronous code Roost replaces.

``AsyncContainerManager`` is the core (an ``EmbeddedEngine``); ``ContainerManager``
wraps one and runs it on a private event-loop thread (``LoopThread``), so its
methods are plain calls with the replaced code's signatures.

Semantics kept from the replaced code:
- ``ContainerManager()`` needs no arguments; construction raises
  ``ContainerError`` when Docker is unreachable.
- ``start_agent(agent_type, *, image, port)``: pull the image if absent, publish
  the agent's container port (``container_port``, 8000) on host ``port`` (bound
  to ``bind``, 127.0.0.1), wait until ``GET health_path`` answers 200, return
  ``http://localhost:{port}``. ``port=None``: a free host port Docker picks.
  Any ``agent_type`` string works (``agent_name_for`` derives the agent's name).
- ``handle_container_exit(agent_type, *, image, port)``: within the restart
  limit the agent is running again (healthy, at the same URL) when it returns;
  once it is permanently failed this logs at CRITICAL level and returns None,
  with no new container. It never raises for "already failed".
- One restart, no backoff (``max_restarts=1, restart_backoff=0``), overridable.
- ``stop_all()`` stops and removes every container and the temporary state
  directory; it is idempotent, and ``with`` / ``async with`` call it on exit.

Invariants:
- One exit is counted once: Roost's own crash detection (Docker's ``die``
  event) and ``handle_container_exit`` report the same container's exit to the
  same lifecycle, which ignores an exit of a container that no longer backs the
  agent, whichever of the two comes first.
- A ``start_agent`` that raises leaves nothing running for that agent (it is
  stopped again, its diagnostics kept for ``exit_info``).
- Agents never idle by default (``idle_timeout=0``): their callers talk to them
  directly, so Roost sees none of their activity.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import ValidationError

from roost import errors
from roost.config import AgentSettings, ResolvedAgent, resolve_agent
from roost.config.problems import config_error
from roost.core.records import AgentRecord, ExitInfo, SessionHealth
from roost.core.states import ACTIVE_STATES, AgentState
from roost.engine import Engine
from roost.library.embedded import EmbeddedEngine, SyncTwin, agent_name_for

__all__ = ["AsyncContainerManager", "ContainerManager"]

log = logging.getLogger("roost.library")

T = TypeVar("T")

#: Bind addresses a caller on this host reaches as "localhost".
_LOCAL_BINDS = frozenset({"127.0.0.1", "0.0.0.0", "::", "::1"})
#: States in which a new spec is taken up only by a restart.
_LIVE_STATES = frozenset({*ACTIVE_STATES, AgentState.PAUSED, AgentState.STARTING})


class AsyncContainerManager(EmbeddedEngine):
    """Start agents on demand and keep them alive (async; see the module docstring).

    ``container_port``: the port agents listen on inside their container;
    ``bind``: the host address their ``port`` is published on; ``health_path``:
    what answers 200 when an agent is ready. Any other ``[defaults]`` key goes in
    ``defaults`` (e.g. ``{"env": {"MODE": "echo"}, "memory": "256m"}``).
    """

    def __init__(
        self,
        *,
        max_restarts: int = 1,
        restart_backoff: float = 0.0,
        container_port: int = 8000,
        bind: str = "127.0.0.1",
        health_path: str = "/health",
        idle_timeout: float = 0.0,
        startup_timeout: float = 120.0,
        docker_host: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        instance: str | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            defaults={
                "max_restarts": max_restarts,
                "restart_backoff": restart_backoff,
                "restart_backoff_max": max(restart_backoff, 300.0),
                "port": container_port,
                "host_ip": bind,
                "health_path": health_path,
                "idle_timeout": idle_timeout,
                "startup_timeout": startup_timeout,
                **(defaults or {}),
            },
            docker_host=docker_host,
            state_dir=state_dir,
            instance=instance,
        )

    # -- the replaced code's verbs ---------------------------------------------------

    async def start_agent(self, agent_type: str, *, image: str, port: int | None = None) -> str:
        """Start (or reuse) the agent's container; return its URL once it is healthy.
        ``ContainerError`` (with the log tail) when it cannot be made healthy."""
        engine = await self._ensure_engine()
        agents = engine.agents
        name, changed = await self._agent(engine, agent_type, image, port)
        state = agents.get(name).state
        if state is AgentState.FAILED:
            await agents.act(name, "reset", reason="start_agent")  # an explicit start
        elif changed and state in _LIVE_STATES:
            await agents.act(name, "restart", reason="start_agent: new image or port")
        try:
            record = await agents.wake(
                name,
                reason="start_agent",
                timeout=self._start_timeout(engine, name),
                fail_fast=True,
            )
        except errors.ContainerError:
            # Nothing keeps running (or restarting) behind a start that failed.
            try:
                await agents.act(name, "stop", reason="start_agent failed")
            except errors.StateError as exc:
                log.warning("could not stop agent %s after a failed start: %s", name, exc)
            raise
        return self._url(record)

    async def handle_container_exit(
        self, agent_type: str, *, image: str, port: int | None = None
    ) -> None:
        """The agent's container exited: restart it within the limit, and return once
        it is healthy again. Once it is permanently failed, log that (CRITICAL) and
        return None without starting anything."""
        engine = await self._ensure_engine()
        agents = engine.agents
        name, _ = await self._agent(engine, agent_type, image, port)
        record = agents.get(name)
        if record.state in ACTIVE_STATES:
            # The caller may see the exit before Docker's die event reaches us: look
            # now. The die event, when it comes, is about a container the agent no
            # longer has, so the exit is counted once either way.
            record = await agents.observe(name)
        if record.state is AgentState.FAILED:
            self._report_failed(agent_type, record)
            return
        if record.state in ACTIVE_STATES:
            return  # its container runs: nothing exited (or it is back already)
        if record.state in (AgentState.CREATED, AgentState.STOPPED):
            # Exit code 0 is not a crash, but the caller wants the agent back.
            await agents.act(name, "start", reason="handle_container_exit")
        spec = agents.spec(name)
        # Long enough for every restart the limit allows, each with its backoff.
        timeout = (spec.max_restarts + 1) * (
            self._start_timeout(engine, name) + spec.restart_backoff_max
        )
        try:
            await agents.wake(name, reason="handle_container_exit", timeout=timeout)
        except errors.ContainerError:
            record = agents.get(name)
            if record.state is not AgentState.FAILED:
                raise
            self._report_failed(agent_type, record)

    async def stop_all(self) -> None:
        """Stop and remove every agent's container, stop the engine and remove its
        temporary state. Idempotent; the next ``start_agent`` starts afresh."""
        await self._shutdown_engine()

    # -- looking ---------------------------------------------------------------------

    def health(self, agent_type: str) -> SessionHealth:
        """``healthy`` while it answers its health checks, ``starting`` while it
        (re)starts, ``unhealthy`` once it crashed or failed (its own HEALTHCHECK or
        Roost's probes said so, or it exited), else ``unknown``."""
        record = self._record(agent_type)
        if record is None:
            return SessionHealth.UNKNOWN
        if record.state in ACTIVE_STATES:
            return SessionHealth.HEALTHY
        if record.state in (AgentState.STARTING, AgentState.RESTARTING):
            return SessionHealth.STARTING
        if record.state in (AgentState.CRASHED, AgentState.FAILED):
            return SessionHealth.UNHEALTHY
        return SessionHealth.UNKNOWN

    def exit_info(self, agent_type: str) -> ExitInfo | None:
        """How the agent's last container ended (exit code, OOM, error, log tail)."""
        record = self._record(agent_type)
        return record.last_exit if record is not None else None

    def state(self, agent_type: str) -> AgentState | None:
        record = self._record(agent_type)
        return record.state if record is not None else None

    def url(self, agent_type: str) -> str | None:
        """The agent's URL while it is healthy, else None."""
        record = self._record(agent_type)
        if record is None or not record.awake:
            return None
        return self._url(record)

    # -- helpers ---------------------------------------------------------------------

    def _record(self, agent_type: str) -> AgentRecord | None:
        engine = self._engine
        name = agent_name_for(agent_type)
        if engine is None or name not in engine.agents:
            return None
        return engine.agents.get(name)

    def _spec(self, agent_type: str, image: str, port: int | None) -> ResolvedAgent:
        where = f"<{type(self).__name__}>"
        try:
            table = AgentSettings.model_validate({"image": image, "host_port": port or 0})
        except ValidationError as exc:
            raise config_error(exc, file=where, prefix=()) from None
        try:
            return resolve_agent(agent_name_for(agent_type), self._settings.defaults, table)
        except ValueError as exc:
            raise errors.ConfigError(f"{where}: {exc}") from None

    async def _agent(
        self, engine: Engine, agent_type: str, image: str, port: int | None
    ) -> tuple[str, bool]:
        """Register the agent, or give it this image and port; return its name and
        whether its container must change."""
        spec = self._spec(agent_type, image, port)
        agents = engine.agents
        if spec.name not in agents:
            await agents.register(spec, agent_id=agent_type)
            return spec.name, False
        changed = agents.spec(spec.name).config_hash != spec.config_hash
        await agents.reconfigure(spec)
        return spec.name, changed

    def _start_timeout(self, engine: Engine, name: str) -> float:
        """A backstop for one start: pulling, then the agent's own startup_timeout."""
        spec = engine.agents.spec(name)
        return engine.settings.docker.pull_timeout + spec.startup_timeout + 30.0

    @staticmethod
    def _url(record: AgentRecord) -> str:
        assert record.url is not None
        published = urlsplit(record.url)
        host = published.hostname or "localhost"
        if host in _LOCAL_BINDS:
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{published.port}"

    @staticmethod
    def _report_failed(agent_type: str, record: AgentRecord) -> None:
        last = record.last_exit
        log.critical(
            "agent %r failed permanently after %d restart(s) and is not restarted "
            "(exit code %s, OOM killed %s): %s",
            agent_type,
            record.restart_count,
            last.exit_code if last else None,
            last.oom_killed if last else False,
            record.last_error or (last.error if last else "") or "exited",
        )


class ContainerManager(SyncTwin[AsyncContainerManager]):
    """``AsyncContainerManager`` as plain calls, run on a private event-loop thread
    (started on first use, stopped by ``stop_all``/``close``/leaving ``with``).
    Takes the same options. Usable from scripts, threads and code that already
    runs inside an event loop."""

    def __init__(self, **options: Any) -> None:
        super().__init__(self._new_core(**options))

    def _new_core(self, **options: Any) -> AsyncContainerManager:
        """The async core; tests override this to run it on a ``FakeRuntime``."""
        return AsyncContainerManager(**options)

    def start_agent(self, agent_type: str, *, image: str, port: int | None = None) -> str:
        """See ``AsyncContainerManager.start_agent``."""
        return self._loop.run(self._core.start_agent(agent_type, image=image, port=port))

    def handle_container_exit(
        self, agent_type: str, *, image: str, port: int | None = None
    ) -> None:
        """See ``AsyncContainerManager.handle_container_exit``."""
        self._loop.run(self._core.handle_container_exit(agent_type, image=image, port=port))

    def stop_all(self) -> None:
        """Stop and remove every container, then the loop thread. Idempotent."""
        if self._loop.running:
            try:
                self._loop.run(self._core.stop_all())
            finally:
                self._loop.stop()

    close = stop_all

    def health(self, agent_type: str) -> SessionHealth:
        return self._read(self._core.health, agent_type)

    def exit_info(self, agent_type: str) -> ExitInfo | None:
        return self._read(self._core.exit_info, agent_type)

    def state(self, agent_type: str) -> AgentState | None:
        return self._read(self._core.state, agent_type)

    def url(self, agent_type: str) -> str | None:
        return self._read(self._core.url, agent_type)

    def _read(self, look: Callable[[str], T], agent_type: str) -> T:
        """Read on the loop thread while the engine runs (one consistent view),
        directly when nothing runs."""
        if not self._loop.running:
            return look(agent_type)

        async def read() -> T:
            return look(agent_type)

        return self._loop.run(read())

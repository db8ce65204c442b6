"""The library API: ``ContainerManager``, a drop-in for the code Roost replaces.

It runs a whole Roost engine inside the caller's event loop (started on the
first call), with its own state directory and instance id, so two managers in
one process, or a manager beside a ``roost up`` daemon, never touch each
other's containers.

Semantics kept from the replaced code: construction fails with
``ContainerError`` when Docker is unreachable; ``start_agent`` pulls the image
only if absent, starts the container, waits until its health check answers and
returns its URL; with ``max_restarts=1, restart_backoff=0`` one unexpected exit
is restarted and a second marks the agent permanently failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import httpx

from roost import errors
from roost.config import AgentSettings, ResolvedAgent, Settings, parse_settings, resolve_agent
from roost.core.records import ExitInfo, SessionHealth
from roost.core.states import ACTIVE_STATES, AgentState
from roost.engine import Engine

__all__ = ["ContainerManager", "EmbeddedEngine", "agent_name_for"]


def agent_name_for(agent_type: str) -> str:
    """Turn any agent type into a DNS label (the agent's name in Roost)."""
    name = re.sub(r"[^a-z0-9-]+", "-", agent_type.lower()).strip("-")[:63].strip("-")
    if not name:
        raise errors.ConfigError(f"agent type {agent_type!r} gives no usable name")
    return name


def _docker_ping(host: str | None) -> None:
    """Synchronous reachability check, so construction fails like the replaced code."""
    target = host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        if target.startswith("unix://"):
            path = target.removeprefix("unix://")
            if not os.path.exists(path):
                # Checked first: httpcore leaks the socket of a failed unix connect.
                raise FileNotFoundError(f"no socket at {path}")
            transport = httpx.HTTPTransport(uds=path)
            with httpx.Client(transport=transport, timeout=5.0) as client:
                client.get("http://docker/_ping").raise_for_status()
        else:
            base = target.replace("tcp://", "http://", 1)
            with httpx.Client(timeout=5.0) as client:
                client.get(base.rstrip("/") + "/_ping").raise_for_status()
    except (httpx.HTTPError, OSError) as exc:
        raise errors.DockerUnavailable(
            f"Docker is not reachable at {target}: {exc} (is dockerd running?)"
        ) from exc


class EmbeddedEngine:
    """A whole Roost engine inside the caller's event loop, started on first use.

    The shared bootstrapping of the library classes: a synchronous Docker ping at
    construction (``ContainerError`` when unreachable, like the replaced code),
    settings of its own (state directory, default a fresh temporary one; instance
    id, default ``<prefix>-<random>``), and an engine that ``_ensure_engine``
    starts once however many callers race for it.
    """

    def __init__(
        self,
        *,
        max_restarts: int,
        restart_backoff: float,
        idle_timeout: float,
        startup_timeout: float,
        docker_host: str | None,
        state_dir: str | os.PathLike[str] | None,
        instance: str | None,
        defaults: dict[str, Any] | None,
        sections: dict[str, Any] | None = None,
        instance_prefix: str = "lib",
    ) -> None:
        _docker_ping(docker_host)
        self._state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp("-roost"))
        self._settings: Settings = parse_settings(
            {
                "server": {"state_dir": str(self._state_dir)},
                "docker": {
                    "host": docker_host or "",
                    "instance": instance or f"{instance_prefix}-{secrets.token_hex(4)}",
                },
                "defaults": {
                    "max_restarts": max_restarts,
                    "restart_backoff": restart_backoff,
                    "restart_backoff_max": max(restart_backoff, 300.0),
                    "idle_timeout": idle_timeout,
                    "startup_timeout": startup_timeout,
                    **(defaults or {}),
                },
                **(sections or {}),
            },
            file=f"<{type(self).__name__}>",
        )
        self._engine: Engine | None = None
        self._starting: asyncio.Lock | None = None
        self._stopped = False

    @property
    def instance(self) -> str:
        return self._settings.docker.instance

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def engine(self) -> Engine | None:
        return self._engine

    async def _ensure_engine(self) -> Engine:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._engine is None:
                engine = self._new_engine()
                await engine.start()
                self._engine = engine
                self._stopped = False
            return self._engine

    def _new_engine(self) -> Engine:
        """The engine to run; tests override this to run on a ``FakeRuntime``."""
        return Engine(self._settings)

    async def _shutdown_engine(self) -> None:
        """Stop every container (removing them) and the engine. Idempotent."""
        if self._engine is None or self._stopped:
            return
        self._stopped = True
        engine, self._engine = self._engine, None
        await engine.stop(leave_running=False, remove=True)


class ContainerManager(EmbeddedEngine):
    """Start agents on demand and keep them alive (library contract).

    ``max_restarts``/``restart_backoff`` keep the replaced code's names; any other
    ``[defaults]`` key can be passed in ``defaults``.
    """

    def __init__(
        self,
        *,
        max_restarts: int = 3,
        restart_backoff: float = 10.0,
        idle_timeout: float = 0.0,
        startup_timeout: float = 120.0,
        docker_host: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        instance: str | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            max_restarts=max_restarts,
            restart_backoff=restart_backoff,
            idle_timeout=idle_timeout,
            startup_timeout=startup_timeout,
            docker_host=docker_host,
            state_dir=state_dir,
            instance=instance,
            defaults=defaults,
        )

    def _spec(self, agent_type: str, image: str, port: int) -> ResolvedAgent:
        name = agent_name_for(agent_type)
        return resolve_agent(name, self._settings.defaults, AgentSettings(image=image, port=port))

    async def _agent(self, agent_type: str, image: str, port: int) -> str:
        engine = await self._ensure_engine()
        spec = self._spec(agent_type, image, port)
        if spec.name not in engine.agents:
            await engine.agents.register(spec, agent_id=agent_type)
        else:
            await engine.agents.reconfigure(spec)  # new image/port: recreated on next start
        return spec.name

    async def start_agent(self, agent_type: str, *, image: str, port: int = 8000) -> str:
        """Start (or reuse) the agent's container; return its URL once healthy."""
        engine = await self._ensure_engine()
        name = await self._agent(agent_type, image, port)
        timeout = engine.agents.spec(name).startup_timeout + 30.0
        record = await engine.agents.wake(
            name, reason="start_agent", timeout=timeout, fail_fast=True
        )
        assert record.url is not None
        return record.url

    async def handle_container_exit(self, agent_type: str, *, image: str, port: int = 8000) -> str:
        """React to the agent's container having exited: restart it within the
        restart limit and return the new URL, or raise ``ContainerError`` once the
        agent is permanently failed."""
        engine = await self._ensure_engine()
        name = await self._agent(agent_type, image, port)
        agents = engine.agents
        if agents.get(name).state in ACTIVE_STATES:
            # The caller may have seen the exit before Docker's event reached us.
            await agents.observe(name)
        if agents.get(name).state is AgentState.FAILED:
            raise self._failed_error(name)
        if agents.get(name).state is AgentState.STOPPED:
            # Exit code 0 is not a crash, but the caller wants the agent back.
            await agents.act(name, "start", reason="handle_container_exit")
        spec = agents.spec(name)
        timeout = spec.startup_timeout + spec.restart_backoff_max + 30.0
        try:
            record = await agents.wake(name, reason="handle_container_exit", timeout=timeout)
        except errors.ContainerError:
            if self.state(agent_type) is AgentState.FAILED:
                raise self._failed_error(name) from None
            raise
        assert record.url is not None
        return record.url

    def _failed_error(self, name: str) -> errors.ContainerError:
        assert self._engine is not None
        r = self._engine.agents.get(name)
        exit_info = r.last_exit
        return errors.ContainerError(
            f"agent {name!r} failed permanently after {r.restart_count} restarts"
            + (f": {r.last_error or (exit_info.error if exit_info else '')}".rstrip(": ")),
            log_tail=exit_info.log_tail if exit_info else "",
        )

    def health(self, agent_type: str) -> SessionHealth:
        if self._engine is None:
            return SessionHealth.UNKNOWN
        name = agent_name_for(agent_type)
        if name not in self._engine.agents:
            return SessionHealth.UNKNOWN
        state = self._engine.agents.get(name).state
        if state in ACTIVE_STATES:
            return SessionHealth.HEALTHY
        if state in (AgentState.STARTING, AgentState.RESTARTING):
            return SessionHealth.STARTING
        if state in (AgentState.CRASHED, AgentState.FAILED):
            return SessionHealth.UNHEALTHY
        return SessionHealth.UNKNOWN

    def exit_info(self, agent_type: str) -> ExitInfo | None:
        if self._engine is None:
            return None
        name = agent_name_for(agent_type)
        return self._engine.agents.get(name).last_exit if name in self._engine.agents else None

    def state(self, agent_type: str) -> AgentState | None:
        if self._engine is None:
            return None
        name = agent_name_for(agent_type)
        return self._engine.agents.get(name).state if name in self._engine.agents else None

    async def stop_all(self) -> None:
        """Stop every agent's container and shut the engine down. Idempotent."""
        await self._shutdown_engine()

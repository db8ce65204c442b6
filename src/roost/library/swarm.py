"""``DockerAgentRunner`` and ``AsyncDockerAgentRunner``: swarm agents spawned at run
time, a drop-in for the synchronous code Roost replaces.

``AsyncDockerAgentRunner`` is the core (an ``EmbeddedEngine``: its own state
directory and instance id, started on first use); ``DockerAgentRunner`` wraps one
and runs it on a private event-loop thread, so its methods are plain calls.
Each spawned agent is a Roost agent (a ``config.SpawnedAgent``), so a crashed one
is restarted with backoff like any other. It gets ``COORDINATOR_URL``,
``AGENT_NAME``, ``AGENT_ID`` and ``AGENT_CAPABILITIES`` plus the runner's
``extra_env``, joins the shared network and mounts the shared volume (both
created when absent; see ``reactor.spawning``).

Invariants:
- ``spawn`` accepts any ``name`` (``"Echo"``): the agent's name in Roost is
  derived from it and the agent's id, and ``AGENT_NAME`` is ``name`` as given.
  Without an ``agent_id`` each spawn gets a fresh UUID, so spawning one name
  twice gives two agents; spawning one ``agent_id`` twice is a ``Conflict``.
- ``spawn`` returns only once the agent answers its health check; when it
  cannot, the agent is removed again and the error (``ContainerError`` or a
  subclass) propagates: a failed spawn leaves nothing behind.
- ``stop`` returns True only when the container is verifiably gone afterwards
  (``inspect`` says it does not exist); an unknown id, another instance's
  container or any failure is False. Never a false success.
- The runner touches only containers, networks and volumes carrying its own
  instance label. ``stop_all`` removes its containers, then the network and
  volume if this runner created them (one another Roost still uses stays, with a
  warning), then the engine and its temporary state: nothing is left behind.
- Spawned agents never idle by default (``idle_timeout=0``): they talk to their
  coordinator directly, so Roost sees none of their activity.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from roost import errors
from roost.config import SpawnedAgent
from roost.core import labels
from roost.core.states import ACTIVE_STATES
from roost.engine import Engine
from roost.library.embedded import EmbeddedEngine, SyncTwin, derived_name
from roost.reactor import spawning

__all__ = ["AgentContainer", "AsyncDockerAgentRunner", "DockerAgentRunner"]

log = logging.getLogger("roost.runner")

#: Shortest container id prefix ``stop``/``is_running`` accept (Docker's short id).
SHORT_ID_LENGTH = 12


@dataclasses.dataclass(frozen=True, slots=True)
class AgentContainer:
    """One spawned agent as ``list_containers`` reports it. ``container_id`` and
    ``url`` are None while it has no (healthy) container."""

    container_id: str | None
    agent_id: str
    name: str
    image: str
    #: comma-joined, as given to ``spawn``.
    capabilities: str
    #: the agent's lifecycle state (``running``, ``restarting``, ...).
    state: str
    url: str | None


class AsyncDockerAgentRunner(EmbeddedEngine):
    """Spawn swarm agents as containers and stop them (async; see the module docstring).

    ``image``: what ``spawn`` runs when it names none; ``coordinator_url``: what
    agents get as ``COORDINATOR_URL`` (None: Roost's own URL as containers see
    it); ``extra_env``: added to every agent's environment. ``network``/``volume``
    name the shared network and volume ('' for none), ``volume_path`` is where the
    volume is mounted. Any other ``[defaults]`` key goes in ``defaults``.
    """

    def __init__(
        self,
        image: str = "roost-mimic:latest",
        coordinator_url: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        *,
        network: str = "roost-swarm",
        volume: str = "roost-swarm-data",
        volume_path: str = "/data",
        max_restarts: int = 3,
        restart_backoff: float = 10.0,
        idle_timeout: float = 0.0,
        startup_timeout: float = 120.0,
        docker_host: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        instance: str | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        self._extra_env = dict(extra_env or {})
        for key in self._extra_env:
            if key in spawning.RESERVED_ENV:
                raise errors.ConfigError(
                    f"extra_env.{key}: {key} is set by Roost for every spawned agent",
                    key=f"extra_env.{key}",
                )
        super().__init__(
            defaults={
                "max_restarts": max_restarts,
                "restart_backoff": restart_backoff,
                "restart_backoff_max": max(restart_backoff, 300.0),
                "idle_timeout": idle_timeout,
                "startup_timeout": startup_timeout,
                **(defaults or {}),
            },
            docker_host=docker_host,
            state_dir=state_dir,
            instance=instance,
            sections={
                "swarm": {
                    "coordinator_url": coordinator_url or "",
                    "network": network,
                    "volume": volume,
                    "volume_path": volume_path,
                    "image": image,
                }
            },
            instance_prefix="swarm",
        )

    @property
    def coordinator_url(self) -> str:
        return self._settings.coordinator_url

    @property
    def network(self) -> str:
        return self._settings.swarm.network

    @property
    def volume(self) -> str:
        return self._settings.swarm.volume

    @property
    def image(self) -> str:
        """The image ``spawn`` runs when it names none."""
        return self._settings.swarm.image

    # -- spawning -----------------------------------------------------------------

    async def spawn(
        self,
        name: str,
        agent_id: str | None = None,
        capabilities: str = "",
        image: str | None = None,
    ) -> dict[str, Any]:
        """Start agent ``name`` and wait until it is healthy.

        Returns ``{container_id, agent_id, name, image, capabilities, url}``
        (``capabilities`` comma-joined). ``Conflict`` if this ``agent_id`` runs
        already; ``ConfigError`` naming the bad argument; ``ContainerError`` (with
        the log tail) if it does not become healthy."""
        engine = await self._ensure_engine()
        identity = agent_id if agent_id is not None else str(uuid.uuid4())
        spec = spawning.spawned_agent_spec(
            engine.settings,
            name=derived_name(name, unique=f"{name}\0{identity}"),
            agent_name=name,
            agent_id=identity,
            capabilities=capabilities,
            image=image,
            env=self._extra_env,
        )
        await engine.agents.register(spec, agent_id=spec.agent_id)
        try:
            record = await engine.agents.wake(
                spec.name, reason="spawn", timeout=spec.startup_timeout + 30.0, fail_fast=True
            )
        except BaseException:
            # Leave nothing behind, even when cancelled (shielded: the cleanup must finish).
            await asyncio.shield(self._forget_quietly(engine, spec.name))
            raise
        assert record.container_id is not None
        return {
            "container_id": record.container_id,
            "agent_id": spec.agent_id,
            "name": name,
            "image": spec.image,
            "capabilities": ",".join(spec.capabilities),
            "url": record.url,
        }

    @staticmethod
    async def _forget_quietly(engine: Engine, name: str) -> None:
        try:
            await engine.agents.delete(name)
        except errors.RoostError as exc:
            log.warning("could not remove agent %s after a failed spawn: %s", name, exc)

    # -- stopping -----------------------------------------------------------------

    async def stop(self, container_id: str) -> bool:
        """Stop and remove the container of one of this runner's agents and forget
        the agent. True only if the container is gone afterwards."""
        engine = self._engine
        if engine is None or not container_id:
            return False
        try:
            full_id = await self._stop_and_remove(engine, container_id)
            if full_id is None:
                return False
            if await self._exists(engine, full_id):
                log.warning("container %s still exists after stop", full_id[:12])
                return False
        except errors.RoostError as exc:
            log.warning("stop of container %s failed: %s", container_id[:12], exc)
            return False
        return True

    async def _stop_and_remove(self, engine: Engine, container_id: str) -> str | None:
        """Stop and remove; return the full id, or None when unknown or not ours."""
        name = self._agent_of(engine, container_id)
        if name is not None:
            full_id = engine.agents.get(name).container_id or container_id
            await engine.agents.delete(name)
            return full_id
        # Not (or no longer) an agent's: maybe one left behind by a stop that failed
        # half-way. Only ever one carrying this runner's labels.
        try:
            state = await engine.runtime.inspect(container_id)
        except errors.ContainerNotFound:
            return None
        if not self._owns(state.labels):
            return None
        await engine.runtime.stop(state.id, grace=engine.settings.defaults.stop_timeout)
        await engine.runtime.remove(state.id, force=True)
        return state.id

    @staticmethod
    async def _exists(engine: Engine, container_id: str) -> bool:
        try:
            await engine.runtime.inspect(container_id)
        except errors.ContainerNotFound:
            return False
        return True

    async def stop_all(self) -> int:
        """Stop and remove every agent's container, the network and volume this
        runner created, then the engine and its temporary state (the next
        ``spawn`` starts afresh). Returns how many containers were stopped;
        idempotent."""
        engine = self._engine
        if engine is None:
            return 0
        container_ids = [
            record.container_id for record in engine.agents.records() if record.container_id
        ]
        results = await asyncio.gather(*(self.stop(cid) for cid in container_ids))
        for name in engine.agents.names():  # agents that had no container
            await self._forget_quietly(engine, name)
        await self._remove_swarm_resources(engine)
        await self._shutdown_engine()
        return sum(results)

    async def _remove_swarm_resources(self, engine: Engine) -> None:
        """The shared network and volume, if they carry this runner's labels."""
        owned = labels.ownership(self.instance)
        runtime = engine.runtime
        for kind, name, remove in (
            ("network", self.network, runtime.remove_network),
            ("volume", self.volume, runtime.remove_volume),
        ):
            if not name:
                continue
            try:
                if await remove(name, labels=owned):
                    log.info("removed the swarm %s %s", kind, name)
            except errors.RoostError as exc:
                log.warning("left the swarm %s %s in place: %s", kind, name, exc)

    # -- looking ------------------------------------------------------------------

    async def list_containers(self) -> list[AgentContainer]:
        """This runner's agents, by name (then agent id)."""
        engine = self._engine
        if engine is None:
            return []
        rows = []
        for record in engine.agents.records():
            spec = engine.agents.spec(record.name)
            spawned = spec if isinstance(spec, SpawnedAgent) else None
            rows.append(
                AgentContainer(
                    container_id=record.container_id,
                    agent_id=spawned.agent_id if spawned else record.name,
                    name=spec.env.get(spawning.AGENT_NAME, record.name),
                    image=spec.image,
                    capabilities=",".join(spawned.capabilities) if spawned else "",
                    state=record.state.value,
                    url=record.url if record.state in ACTIVE_STATES else None,
                )
            )
        return sorted(rows, key=lambda row: (row.name, row.agent_id))

    async def is_running(self, container_id: str) -> bool:
        """Whether this runner's container ``container_id`` runs (and is not paused).
        Unknown ids and other instances' containers are False."""
        engine = self._engine
        if engine is None or not container_id:
            return False
        name = self._agent_of(engine, container_id)
        if name is not None:
            container_id = engine.agents.get(name).container_id or container_id
        try:
            state = await engine.runtime.inspect(container_id)
        except errors.ContainerNotFound:
            return False
        return self._owns(state.labels) and state.running and not state.paused

    # -- helpers ------------------------------------------------------------------

    def _owns(self, found: Mapping[str, str]) -> bool:
        wanted = labels.ownership(self.instance)
        return all(found.get(key) == value for key, value in wanted.items())

    @staticmethod
    def _agent_of(engine: Engine, container_id: str) -> str | None:
        """The agent whose current container is ``container_id`` (full id, or a
        prefix of at least SHORT_ID_LENGTH characters)."""
        exact = len(container_id) < SHORT_ID_LENGTH
        for record in engine.agents.records():
            name, current = record.name, record.container_id
            if current is None:
                continue
            if current == container_id or (not exact and current.startswith(container_id)):
                return name
        return None


class DockerAgentRunner(SyncTwin[AsyncDockerAgentRunner]):
    """``AsyncDockerAgentRunner`` as plain calls, run on a private event-loop thread
    (started on first use, stopped by ``stop_all``/``close``/leaving ``with``).
    Takes the same arguments."""

    def __init__(
        self,
        image: str = "roost-mimic:latest",
        coordinator_url: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(self._new_core(image, coordinator_url, extra_env, **options))

    def _new_core(
        self,
        image: str,
        coordinator_url: str | None,
        extra_env: Mapping[str, str] | None,
        **options: Any,
    ) -> AsyncDockerAgentRunner:
        """The async core; tests override this to run it on a ``FakeRuntime``."""
        return AsyncDockerAgentRunner(image, coordinator_url, extra_env, **options)

    def spawn(
        self,
        name: str,
        agent_id: str | None = None,
        capabilities: str = "",
        image: str | None = None,
    ) -> dict[str, Any]:
        """See ``AsyncDockerAgentRunner.spawn``."""
        return self._loop.run(self._core.spawn(name, agent_id, capabilities, image))

    def stop(self, container_id: str) -> bool:
        """See ``AsyncDockerAgentRunner.stop``."""
        if not self._loop.running:
            return False  # nothing was spawned (or stop_all ran): nothing of ours runs
        return self._loop.run(self._core.stop(container_id))

    def stop_all(self) -> int:
        """Stop and remove everything, then the loop thread. Idempotent."""
        if not self._loop.running:
            return 0
        try:
            return self._loop.run(self._core.stop_all())
        finally:
            self._loop.stop()

    def close(self) -> None:
        self.stop_all()

    def list_containers(self) -> list[AgentContainer]:
        """See ``AsyncDockerAgentRunner.list_containers``."""
        if not self._loop.running:
            return []
        return self._loop.run(self._core.list_containers())

    def is_running(self, container_id: str) -> bool:
        """See ``AsyncDockerAgentRunner.is_running``."""
        if not self._loop.running:
            return False
        return self._loop.run(self._core.is_running(container_id))

"""The library API for swarms: ``DockerAgentRunner``, a drop-in for the code Roost replaces.

A coordinator spawns agents at run time; each one is a Roost agent (a
``config.SpawnedAgent``) in an engine of the runner's own (see
``library.EmbeddedEngine``: own state directory and instance id, started on
first use), so crashed agents are restarted with backoff like any other.
Spawned agents get ``COORDINATOR_URL``, ``AGENT_NAME``, ``AGENT_ID`` and
``AGENT_CAPABILITIES``, join the shared network and mount the shared volume
(both created if missing; see ``reactor.swarming``).

Invariants:
- ``spawn`` returns only once the agent answers its health check; when it
  cannot, the agent is removed again and the error (``ContainerError`` or a
  subclass) propagates: a failed spawn leaves nothing behind.
- ``stop`` returns True only when the container is verifiably gone afterwards
  (``inspect`` says it does not exist); an unknown id, another instance's
  container or any failure is False. Never a false success.
- The runner touches only containers carrying its own instance label.
- Spawned agents never idle by default (``idle_timeout=0``): they talk to their
  coordinator directly, so Roost sees none of their activity.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from roost import errors
from roost.config import SpawnedAgent
from roost.core import labels
from roost.core.states import ACTIVE_STATES
from roost.engine import Engine
from roost.library import EmbeddedEngine
from roost.reactor import swarming

__all__ = ["DockerAgentRunner"]

log = logging.getLogger("roost.runner")

#: Shortest container id prefix ``stop``/``is_running`` accept (Docker's short id).
SHORT_ID_LENGTH = 12


class DockerAgentRunner(EmbeddedEngine):
    """Spawn swarm agents as containers and stop them (library contract).

    ``coordinator_url`` is what agents get as ``COORDINATOR_URL`` (None: Roost's
    own URL as containers see it). ``network``/``volume`` name the shared network
    and volume ('' for none); ``volume_path`` is where the volume is mounted;
    ``default_image`` is used when ``spawn`` names no image. Any other
    ``[defaults]`` key can be passed in ``defaults``.
    """

    def __init__(
        self,
        *,
        coordinator_url: str | None = None,
        network: str = "roost-swarm",
        volume: str = "roost-swarm-data",
        volume_path: str = "/data",
        default_image: str = "roost-mimic:latest",
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
            sections={
                "swarm": {
                    "coordinator_url": coordinator_url or "",
                    "network": network,
                    "volume": volume,
                    "volume_path": volume_path,
                    "image": default_image,
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
    def default_image(self) -> str:
        return self._settings.swarm.image

    # -- spawning -----------------------------------------------------------------

    async def spawn(
        self,
        name: str,
        agent_id: str | None = None,
        capabilities: str = "",
        image: str | None = None,
    ) -> dict[str, Any]:
        """Start agent ``name`` (a DNS label) and wait until it is healthy.

        Returns ``{container_id, agent_id, name, image, capabilities, url}``;
        ``capabilities`` comma-joined. ``Conflict`` if the name is taken;
        ``ConfigError`` naming the bad argument; ``ContainerError`` (with the log
        tail) if it does not become healthy."""
        engine = await self._ensure_engine()
        spec = swarming.spawned_agent_spec(
            engine.settings,
            name=name,
            agent_id=agent_id,
            capabilities=capabilities,
            image=image,
        )
        await engine.agents.register(spec, agent_id=spec.agent_id)
        try:
            record = await engine.agents.wake(
                name, reason="spawn", timeout=spec.startup_timeout + 30.0, fail_fast=True
            )
        except BaseException:
            # Leave nothing behind, even when cancelled (shielded: the cleanup must finish).
            await asyncio.shield(self._forget_quietly(engine, name))
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
        """Stop and remove every agent's container, then shut the runner's engine
        down (the next ``spawn`` starts it again). Returns how many containers were
        stopped."""
        engine = self._engine
        if engine is None or self._stopped:
            return 0
        container_ids = [
            record.container_id for record in engine.agents.records() if record.container_id
        ]
        results = await asyncio.gather(*(self.stop(cid) for cid in container_ids))
        for name in engine.agents.names():  # agents that had no container
            await self._forget_quietly(engine, name)
        await self._shutdown_engine()
        return sum(results)

    # -- looking ------------------------------------------------------------------

    async def list_containers(self) -> list[dict[str, Any]]:
        """This runner's agents: ``{container_id, name, agent_id, state, url, image,
        capabilities}`` each, sorted by name (``container_id``/``url`` None when
        there is none)."""
        engine = self._engine
        if engine is None:
            return []
        rows = []
        for name in engine.agents.names():
            record = engine.agents.get(name)
            spec = engine.agents.spec(name)
            live = record.state in ACTIVE_STATES
            rows.append(
                {
                    "container_id": record.container_id,
                    "name": name,
                    "agent_id": spec.agent_id if isinstance(spec, SpawnedAgent) else name,
                    "state": record.state.value,
                    "url": record.url if live else None,
                    "image": spec.image,
                    "capabilities": ",".join(spec.capabilities)
                    if isinstance(spec, SpawnedAgent)
                    else "",
                }
            )
        return rows

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

"""The composition root: builds a running Roost from ``Settings``.

Start-up order (each step must succeed before the next):
1. take the state-directory lock (one Roost per state directory);
2. open and migrate the SQLite store;
3. reach Docker (DockerUnavailable names the host and what to do);
4. load agents: configured ones are inserted or their spec refreshed, ones
   registered over the API are restored from the store, configured agents that
   left the configuration are deleted (their containers become orphans);
5. subscribe to Docker events, then reconcile (adopt / remove orphans / mark
   vanished), so nothing that happens during the listing is missed.

Shutdown runs the same list backwards: stop (or leave running) containers, stop
actors, close Docker, the store and the lock.
"""

from __future__ import annotations

import contextlib
import logging
from types import TracebackType
from typing import Any

from roost import errors
from roost.adapters.aiohttp_agent_client import AiohttpAgentClient
from roost.adapters.docker_runtime import DockerRuntime
from roost.adapters.sqlite_store import SqliteStore
from roost.adapters.state_lock import StateDirLock
from roost.adapters.system_clock import SystemClock
from roost.adapters.webhook_notifier import WebhookNotifier
from roost.config import ResolvedAgent, Settings
from roost.core.records import AgentRecord
from roost.ports.agent_http import AgentClient
from roost.ports.clock import Clock
from roost.ports.notifier import Notifier
from roost.ports.runtime import ContainerRuntime
from roost.ports.store import Store
from roost.reactor.supervising import Supervisor

__all__ = ["Engine"]

log = logging.getLogger("roost.engine")


class Engine:
    def __init__(
        self,
        settings: Settings,
        *,
        runtime: ContainerRuntime | None = None,
        store: Store | None = None,
        notifier: Notifier | None = None,
        clock: Clock | None = None,
        agent_client: AgentClient | None = None,
        lock: bool = True,
    ) -> None:
        self.settings = settings
        state_dir = settings.state_path()
        self._lock = StateDirLock(state_dir) if lock else None
        self.runtime: ContainerRuntime = runtime or DockerRuntime(
            settings.docker.host or None, connection_limit=settings.docker.connection_limit
        )
        self.store: Store = store or SqliteStore(state_dir / "roost.db")
        self.notifier: Notifier = notifier or WebhookNotifier(
            settings.notify.webhook, timeout=settings.notify.timeout
        )
        self.clock: Clock = clock or SystemClock()
        self.agent_client: AgentClient = agent_client or AiohttpAgentClient()
        self.docker_api_version = ""
        self.supervisor = Supervisor(
            store=self.store,
            runtime=self.runtime,
            notifier=self.notifier,
            clock=self.clock,
            agent_client=self.agent_client,
            instance=settings.docker.instance,
            public_url=settings.server.resolved_public_url,
            publish_host=settings.docker.publish_host,
            network=settings.docker.network or None,
            pull_timeout=settings.docker.pull_timeout,
        )
        self._started = False
        self._closed = False

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._lock is not None:
            self._lock.acquire()
        try:
            await self.store.open()
            self.docker_api_version = await self.runtime.ping()
            await self._load_agents()
            self.supervisor.start_watching()
            await self.supervisor.reconcile()
        except BaseException:
            await self._close_resources()
            raise
        self._started = True
        log.info(
            "roost started: instance %r, %d agents, docker API %s",
            self.settings.docker.instance,
            len(self.supervisor.actors),
            self.docker_api_version,
        )

    async def stop(self, *, leave_running: bool | None = None, remove: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        leave = self.settings.docker.leave_running if leave_running is None else leave_running
        if self._started:
            await self.supervisor.shutdown(leave_running=leave, remove=remove)
        await self._close_resources()

    async def _close_resources(self) -> None:
        for closer in (self.agent_client.close, self.runtime.close, self.store.close):
            try:
                await closer()
            except Exception:
                log.exception("error while closing %s", closer)
        aclose = getattr(self.notifier, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.exception("error while closing the notifier")
        if self._lock is not None:
            self._lock.release()

    # -- agents -----------------------------------------------------------------------

    async def _load_agents(self) -> None:
        configured = self.settings.resolved_agents()
        stored = {s.record.name: s for s in await self.store.list_agents()}
        for name, spec in configured.items():
            spec_json = _spec_json(spec)
            existing = stored.pop(name, None)
            if existing is None:
                record = await self.store.insert_agent(
                    AgentRecord(name=name, state_since=self.clock.now()), spec_json
                )
            else:
                record = existing.record
                if existing.spec != spec_json or existing.source != "config":
                    await self.store.update_spec(name, spec_json, source="config")
            self.supervisor.add_actor(record, spec)
        for name, leftover in stored.items():
            if leftover.source == "config":
                log.info("agent %s left the configuration; forgetting it", name)
                await self.store.delete_agent(name)
                continue
            try:
                spec = ResolvedAgent.from_json(leftover.spec)
            except errors.ConfigError as exc:
                log.error("agent %s: stored spec is invalid, skipping it: %s", name, exc)
                continue
            self.supervisor.add_actor(leftover.record, spec)

    async def register_agent(self, spec: ResolvedAgent, *, agent_id: str = "") -> AgentRecord:
        """Add an agent at run time (persisted; behaves like a configured one)."""
        if spec.name in self.supervisor.actors:
            raise errors.Conflict(f"an agent named {spec.name!r} already exists")
        record = await self.store.insert_agent(
            AgentRecord(name=spec.name, state_since=self.clock.now()),
            _spec_json(spec),
            source="api",
        )
        self.supervisor.add_actor(record, spec, agent_id=agent_id)
        return record

    async def delete_agent(self, name: str) -> None:
        """Stop and remove an agent's container and forget the agent."""
        actor = self.supervisor.actor(name)
        record = actor.record
        await self.supervisor.remove_actor(name)
        if record.container_id is not None:
            with contextlib.suppress(errors.ContainerNotFound):
                await self.runtime.remove(record.container_id, force=True)
        await self.store.delete_agent(name)


def _spec_json(spec: ResolvedAgent) -> dict[str, Any]:
    return spec.model_dump(mode="json")

"""The composition root: builds a running Roost from ``Settings``.

Start-up order (each step must succeed before the next):
1. take the state-directory lock (one Roost per state directory);
2. open and migrate the SQLite store;
3. reach Docker (DockerUnavailable names the host and what to do);
4. load agents: configured ones are inserted or their spec refreshed, ones
   registered over the API are restored from the store (a spawned agent's
   network and volume are re-created if missing), configured agents that left
   the configuration are deleted (their containers become orphans);
5. subscribe to Docker events, then reconcile (adopt / remove orphans / mark
   vanished), so nothing that happens during the listing is missed;
6. start the job runner: re-attach to jobs left running, then dispatch the queue.

Shutdown runs the same list backwards: stop (or leave running) containers, stop
actors, close Docker, the store and the lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from roost import errors
from roost.adapters.docker_runtime import DockerRuntime
from roost.adapters.http_agent_client import HttpAgentClient
from roost.adapters.sqlite_inbox import SqliteInbox
from roost.adapters.sqlite_jobs import SqliteJobStore
from roost.adapters.sqlite_store import SqliteStore
from roost.adapters.state_lock import StateDirLock
from roost.adapters.system_clock import SystemClock
from roost.adapters.webhook_notifier import WebhookNotifier
from roost.config import ResolvedAgent, Settings, SpawnedAgent
from roost.core import labels
from roost.core.records import AgentRecord, StateChange
from roost.ports.agent_http import AgentClient
from roost.ports.clock import Clock
from roost.ports.inbox import Inbox
from roost.ports.jobs import Job, JobStore
from roost.ports.notifier import Notifier
from roost.ports.runtime import ContainerRuntime
from roost.ports.store import Store
from roost.reactor import swarming
from roost.reactor.delivering import Dispatcher
from roost.reactor.eventing import EventHub
from roost.reactor.jobbing import JobRunner
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
        job_store: JobStore | None = None,
        inbox: Inbox | None = None,
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
        self.agent_client: AgentClient = agent_client or HttpAgentClient()
        self.docker_api_version = ""
        #: every lifecycle change, message status change and notice, for SSE.
        self.events = EventHub()
        self.supervisor = Supervisor(
            store=self.store,
            runtime=self.runtime,
            # The supervisor's notices (agent.failed) reach the event stream and the
            # webhook alike, with the same payload.
            notifier=_Announcer(self),
            clock=self.clock,
            agent_client=self.agent_client,
            instance=settings.docker.instance,
            public_url=settings.server.resolved_public_url,
            publish_host=settings.docker.publish_host,
            network=settings.docker.network or None,
            pull_timeout=settings.docker.pull_timeout,
        )
        self.supervisor.add_listener(self._publish_changes)
        if job_store is None:
            if not isinstance(self.store, SqliteStore):
                raise TypeError("Engine: pass job_store= when store is not a SqliteStore")
            job_store = SqliteJobStore(self.store, secret_env=settings.jobs.secret_env)
        #: one-shot jobs (reactor.jobbing); started after the reconcile, stopped first.
        self.jobs = JobRunner(
            store=job_store,
            runtime=self.runtime,
            clock=self.clock,
            instance=settings.docker.instance,
            config=settings.jobs,
            default_memory=settings.defaults.memory or None,
            pids_limit=settings.defaults.pids_limit or None,
            network=settings.docker.network or None,
        )
        self.jobs.add_listener(self._publish_job)
        if inbox is None:
            if not isinstance(self.store, SqliteStore):
                raise TypeError("Engine: pass inbox= when store is not a SqliteStore")
            inbox = SqliteInbox(self.store)
        #: durable messages (same SQLite file) and their delivery lanes (reactor.delivering).
        self.inbox: Inbox = inbox
        self.dispatcher = Dispatcher(
            supervisor=self.supervisor,
            inbox=inbox,
            agent_client=self.agent_client,
            publish=self.events.publish,
            announce=self.announce,
        )
        #: front-end components' close (proxy session, leases), run first on stop.
        self._closers: list[Callable[[], Awaitable[None]]] = []
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
            await self.inbox.open()
            self.docker_api_version = await self.runtime.ping()
            await self._load_agents()
            self.supervisor.start_watching()
            await self.supervisor.reconcile()
            await self.jobs.start()
            await self.dispatcher.start()
        except BaseException:
            await self.dispatcher.stop()
            await self.jobs.stop(leave_running=True)
            # Actors and the event watcher may exist already: stop them, touch nothing.
            await self.supervisor.shutdown(leave_running=True)
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
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                log.exception("error while closing %s", closer)
        leave = self.settings.docker.leave_running if leave_running is None else leave_running
        if self._started:
            await self.dispatcher.stop()
            await self.jobs.stop(leave_running=leave)
            await self.supervisor.shutdown(leave_running=leave, remove=remove)
        await self._close_resources()

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Have ``stop`` call ``closer`` first (front ends built on the engine, e.g. the
        gateway's proxy session and leases, which the engine cannot import)."""
        self._closers.append(closer)

    async def _close_resources(self) -> None:
        closers = (self.agent_client.close, self.runtime.close, self.inbox.close, self.store.close)
        for closer in closers:
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

    # -- events -----------------------------------------------------------------------

    def _publish_changes(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        for change in changes:
            self.events.publish(
                "agent.state",
                {
                    "agent": record.name,
                    "from": change.from_state.value,
                    "to": change.to_state.value,
                    "reason": change.reason,
                    "restart_count": record.restart_count,
                    "container_id": record.container_id,
                },
                at=change.at,
            )

    def _publish_job(self, job: Job) -> None:
        self.events.publish(
            "job.state",
            {k: v for k, v in job.to_json().items() if k != "log_tail"},
            at=self.clock.now(),
        )

    async def announce(self, kind: str, data: dict[str, Any], *, webhook: bool = True) -> None:
        """Publish a notice on the event stream and (by default) to the admin webhook."""
        self.events.publish(kind, data)
        if webhook:
            await self.notifier.notify(kind, data)

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
            if isinstance(spec, SpawnedAgent):
                try:
                    await swarming.ensure_swarm_resources(
                        self.runtime, spec, instance=self.settings.docker.instance
                    )
                except errors.RoostError as exc:
                    log.error("agent %s: cannot prepare its network/volume: %s", name, exc)
            self._add_actor(leftover.record, spec)

    def _add_actor(self, record: AgentRecord, spec: ResolvedAgent, *, agent_id: str = "") -> None:
        if not isinstance(spec, SpawnedAgent):
            self.supervisor.add_actor(record, spec, agent_id=agent_id)
            return
        actor = self.supervisor.add_actor(record, spec, agent_id=agent_id or spec.agent_id)
        # Set before the actor's loop first runs (add_actor only schedules it).
        actor.network = spec.network or None
        actor.binds = spec.binds

    async def register_agent(self, spec: ResolvedAgent, *, agent_id: str = "") -> AgentRecord:
        """Add an agent at run time (persisted; behaves like a configured one).

        A ``SpawnedAgent``'s network and volume are created first when absent, so a
        failure there registers nothing. Conflict if the name is taken."""
        if spec.name in self.supervisor.actors:
            raise errors.Conflict(f"an agent named {spec.name!r} already exists")
        if isinstance(spec, SpawnedAgent):
            await swarming.ensure_swarm_resources(
                self.runtime, spec, instance=self.settings.docker.instance
            )
        record = await self.store.insert_agent(
            AgentRecord(name=spec.name, state_since=self.clock.now()),
            _spec_json(spec),
            source="api",
        )
        self._add_actor(record, spec, agent_id=agent_id)
        return record

    async def delete_agent(self, name: str) -> None:
        """Stop (SIGTERM, ``stop_timeout``, SIGKILL) and remove the agent's container,
        and forget the agent. NotFound if there is no such agent.

        The agent is forgotten before its container goes: if Docker fails here, the
        error propagates and the container is an orphan that the next reconcile
        removes. Every container labelled for the agent is removed, not only the
        recorded one: a start cut short by the removal may have created one that
        was not recorded yet."""
        actor = self.supervisor.actor(name)
        grace = actor.policy.stop_timeout
        await self.supervisor.remove_actor(name)
        recorded = actor.record.container_id
        await self.store.delete_agent(name)
        found = await self.runtime.list(
            {**labels.ownership(self.settings.docker.instance), labels.AGENT: name}
        )
        ids = {c.id for c in found} | ({recorded} if recorded is not None else set())
        for container_id in sorted(ids):
            await self.runtime.stop(container_id, grace=grace)
            await self.runtime.remove(container_id, force=True)


def _spec_json(spec: ResolvedAgent) -> dict[str, Any]:
    return spec.model_dump(mode="json")


class _Announcer:
    """The supervisor's ``Notifier``: ``Engine.announce`` (event stream + webhook)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        await self._engine.announce(kind, payload)

"""The composition root: builds a running Roost from ``Settings``.

Start-up order (each step must succeed before the next):
1. take the state-directory lock (one Roost per state directory);
2. open and migrate the SQLite database (its one owner, ``Database``), then the
   store and inbox repositories built on it;
3. reach Docker (DockerUnavailable names the host and what to do);
4. load agents: configured ones are inserted or their spec refreshed, ones
   registered over the API are restored from the store (a spawned agent's
   network and volume are re-created if missing), configured agents that left
   the configuration are deleted (their containers become orphans);
5. subscribe to Docker events, then reconcile (adopt / remove orphans / mark
   vanished), so nothing that happens during the listing is missed;
6. start the job runner: re-attach to jobs left running, then dispatch the queue.

Shutdown runs the same list backwards: stop (or leave running) containers, stop
actors, close Docker, the repositories, the database and the lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from roost import errors
from roost.adapters.aiohttp_agent_client import AiohttpAgentClient
from roost.adapters.docker_runtime import DockerRuntime
from roost.adapters.sqlite_database import Database
from roost.adapters.sqlite_inbox import SqliteInbox
from roost.adapters.sqlite_jobs import SqliteJobStore
from roost.adapters.sqlite_store import SqliteStore
from roost.adapters.state_lock import StateDirLock, instance_id
from roost.adapters.system_clock import SystemClock
from roost.adapters.webhook_notifier import WebhookNotifier
from roost.config import ResolvedAgent, Settings, SpawnedAgent
from roost.core.records import AgentRecord, StateChange
from roost.ports.agent_http import AgentClient
from roost.ports.clock import Clock
from roost.ports.inbox import Inbox
from roost.ports.jobs import Job, JobStore
from roost.ports.notifier import Notifier
from roost.ports.runtime import ContainerRuntime
from roost.ports.store import Store
from roost.reactor import swarming
from roost.reactor.agents import Agents
from roost.reactor.delivering import Dispatcher
from roost.reactor.eventing import EventHub
from roost.reactor.health import Health
from roost.reactor.jobbing import JobRunner
from roost.reactor.leasing import Leases
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
        #: the roost.instance label of every container this engine owns.
        self.instance = settings.docker.instance or instance_id(state_dir)
        self._lock = StateDirLock(state_dir) if lock else None
        self.runtime: ContainerRuntime = runtime or DockerRuntime(
            settings.docker.host or None, connection_limit=settings.docker.connection_limit
        )
        #: the state file's one owner; None while no repository on it is built here
        #: (tests may inject every repository: store=, job_store=, inbox=).
        self.database: Database | None = None
        self.store: Store = store or SqliteStore(self._database())
        self.notifier: Notifier = notifier or WebhookNotifier(
            settings.notify.webhook, timeout=settings.notify.timeout
        )
        self.clock: Clock = clock or SystemClock()
        self.agent_client: AgentClient = agent_client or AiohttpAgentClient()
        self.docker_api_version = ""
        #: every lifecycle change, message status change and notice, for SSE.
        self.events = EventHub(clock=self.clock)
        #: Roost's own conditions: the engine unreachable, the state database failing.
        self.health = Health(clock=self.clock, announce=self.announce)
        self.supervisor = Supervisor(
            store=self.store,
            health=self.health,
            runtime=self.runtime,
            # The supervisor's notices (agent.failed) reach the event stream and the
            # webhook alike, with the same payload.
            notifier=_Announcer(self),
            clock=self.clock,
            agent_client=self.agent_client,
            instance=self.instance,
            public_url=settings.server.resolved_public_url,
            publish_host=settings.docker.publish_host,
            network=settings.docker.network or None,
            pull_timeout=settings.docker.pull_timeout,
        )
        self.supervisor.add_listener(self._publish_changes)
        #: the one door into the agents for every front end (see reactor.agents).
        self.agents = Agents(
            supervisor=self.supervisor,
            store=self.store,
            runtime=self.runtime,
            clock=self.clock,
            announce=self.announce,
            instance=self.instance,
        )
        if job_store is None:
            job_store = SqliteJobStore(self._database(), secret_env=settings.jobs.secret_env)
        #: one-shot jobs (reactor.jobbing); started after the reconcile, stopped first.
        self.jobs = JobRunner(
            store=job_store,
            runtime=self.runtime,
            clock=self.clock,
            instance=self.instance,
            config=settings.jobs,
            default_memory=settings.defaults.memory or None,
            pids_limit=settings.defaults.pids_limit or None,
            network=settings.docker.network or None,
        )
        self.jobs.add_listener(self._publish_job)
        if inbox is None:
            inbox = SqliteInbox(self._database())
        #: durable messages (same SQLite file) and their delivery lanes (reactor.delivering).
        self.inbox: Inbox = inbox
        self.dispatcher = Dispatcher(
            agents=self.agents,
            inbox=inbox,
            agent_client=self.agent_client,
            clock=self.clock,
            publish=self.events.publish,
            health=self.health,
        )
        #: leases that keep agents awake (in memory; ended first on stop).
        self.leases = Leases(self.agents, clock=self.clock, events=self.events)
        if self.database is not None:
            # A full disk that is freed ends the store's condition even if nothing
            # else writes meanwhile.
            self.health.probe_with("store", self.database.check_writable)
        #: front-end components' close (proxy session, event streams), run first on stop.
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
            if self.database is not None:
                await self.database.open()
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
            self.instance,
            len(self.supervisor.actors),
            self.docker_api_version,
        )

    async def stop(self, *, leave_running: bool | None = None, remove: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        for closer in (*reversed(self._closers), self.leases.close):
            try:
                await closer()
            except Exception:
                log.exception("error while closing %s", closer)
        leave = self.settings.docker.leave_running if leave_running is None else leave_running
        if self._started:
            await self.dispatcher.stop()
            await self.jobs.stop(leave_running=leave)
            await self.supervisor.shutdown(leave_running=leave, remove=remove)
            await self.agents.close()
            await self.health.close()
        await self._close_resources()

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Have ``stop`` call ``closer`` first (front ends built on the engine, e.g. the
        proxy's connections and open event streams, which the engine cannot import)."""
        self._closers.append(closer)

    async def _close_resources(self) -> None:
        closers = (self.agent_client.close, self.runtime.close, self.inbox.close, self.store.close)
        database = () if self.database is None else (self.database.close,)
        for closer in (*closers, *database):
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

    def _database(self) -> Database:
        """The state file's owner, built on first need (never when every repository
        is injected)."""
        if self.database is None:
            self.database = Database(self.settings.state_path() / "roost.db")
        return self.database

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
            agent_id = ""
            if isinstance(spec, SpawnedAgent):
                agent_id = spec.agent_id
                try:
                    await swarming.ensure_swarm_resources(
                        self.runtime, spec, instance=self.instance
                    )
                except errors.RoostError as exc:
                    log.error("agent %s: cannot prepare its network/volume: %s", name, exc)
            self.supervisor.add_actor(leftover.record, spec, agent_id=agent_id)


def _spec_json(spec: ResolvedAgent) -> dict[str, Any]:
    return spec.model_dump(mode="json")


class _Announcer:
    """The supervisor's ``Notifier``: ``Engine.announce`` (event stream + webhook)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        await self._engine.announce(kind, payload)

"""The composition root: builds a running Roost from ``Settings``.

Start-up order (each step must succeed before the next):
1. take the state-directory lock (one Roost per state directory);
2. open and migrate the SQLite database (its one owner, ``Database``), then the
   store and inbox repositories built on it;
3. reach Docker (DockerUnavailable names the host and what to do) and claim the
   instance id there (``reactor.owning``: a second live Roost with the same
   instance on the engine is refused, naming it), and make sure the agents'
   network exists (``roost-agents`` by default: created if missing,
   inter-container traffic off; its gateway is where the agent listener binds;
   with ``[docker] backend = "swarm"`` the swarm manager must answer instead, and
   the agent listener binds where ``server.agent_listen`` says);
   then run the front ends' openers (``add_opener``: ``roost.serving`` binds the
   agent listener there), before any agent is touched;
4. load agents: configured ones are inserted or their spec refreshed, ones
   registered over the API are restored from the store (a spawned agent's
   network and volume are re-created if missing), configured agents that left
   the configuration are deleted (their containers become orphans);
5. subscribe to Docker events, then reconcile (adopt / remove orphans / mark
   vanished), so nothing that happens during the listing is missed;
6. start the job runner: re-attach to jobs left running, then dispatch the queue.

Shutdown runs the same list backwards: stop (or leave running) containers, stop
actors, release the instance, close Docker, the repositories, the database and
the lock.

``faults`` counts what fails outside the lifecycle's view, where it happens:
webhook notifications given up (the notifier's ``on_failure``) and failed Docker
API calls (``docker_runtime.API_ERROR_HOOKS``, hooked while the engine runs on
its own Docker runtime). The metrics read them; nothing here decides on them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from roost import errors
from roost.adapters import docker_runtime
from roost.adapters.docker_runtime import DockerRuntime
from roost.adapters.engine_backend import EngineBackend
from roost.adapters.http_agent_client import HttpAgentClient
from roost.adapters.sqlite_database import Database
from roost.adapters.sqlite_inbox import SqliteInbox
from roost.adapters.sqlite_jobs import SqliteJobStore
from roost.adapters.sqlite_store import SqliteStore
from roost.adapters.sqlite_tokens import SqliteTokenStore
from roost.adapters.state_lock import StateDirLock, instance_id
from roost.adapters.system_clock import SystemClock
from roost.adapters.webhook_notifier import WebhookNotifier
from roost.config import ResolvedAgent, Settings, SpawnedAgent, load_settings
from roost.core import labels
from roost.core.records import AgentRecord, StateChange
from roost.ports.agent_http import AgentClient
from roost.ports.backend import AgentBackend
from roost.ports.clock import Clock
from roost.ports.inbox import Inbox
from roost.ports.jobs import Job, JobStore
from roost.ports.notifier import Notifier
from roost.ports.runtime import ContainerRuntime
from roost.ports.store import Store
from roost.ports.tokens import TokenStore
from roost.reactor import owning, spawning
from roost.reactor.agents import Agents
from roost.reactor.channels import Channels
from roost.reactor.credentials import Credentials
from roost.reactor.delivering import Dispatcher
from roost.reactor.eventing import EventHub
from roost.reactor.health import Health
from roost.reactor.jobbing import JobRunner
from roost.reactor.leasing import Leases
from roost.reactor.supervising import Supervisor

__all__ = ["Engine", "Faults"]

log = logging.getLogger("roost.engine")


@dataclasses.dataclass
class Faults:
    """Failures counted where they happen (see the module docstring)."""

    #: webhook notifications given up, by kind.
    webhook_failures: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    #: failed Docker API calls, by status ("unreachable" or Docker's HTTP status).
    docker_api_errors: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )

    def webhook_failed(self, kind: str) -> None:
        self.webhook_failures[kind] += 1

    def docker_api_error(self, status: str) -> None:
        self.docker_api_errors[status] += 1


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
        tokens: TokenStore | None = None,
        backend: AgentBackend | None = None,
        lock: bool = True,
    ) -> None:
        self.settings = settings
        #: reloads apply one at a time, in the order they were asked for.
        self._reloading = asyncio.Lock()
        #: failures counted where they happen, for metrics.
        self.faults = Faults()
        state_dir = settings.state_path()
        #: the roost.instance label of every container this engine owns.
        self.instance = settings.docker.instance or instance_id(state_dir)
        self._lock = StateDirLock(state_dir) if lock else None
        self.runtime: ContainerRuntime = runtime or DockerRuntime(
            settings.docker.host or None, connection_limit=settings.docker.connection_limit
        )
        #: what runs the agents (``[docker] backend``): the engine's containers (over
        #: ``runtime``), or a swarm's services; jobs always use ``runtime``.
        self.backend: AgentBackend = backend or _backend_for(settings, self.runtime)
        #: the state file's one owner; None while no repository on it is built here
        #: (tests may inject every repository: store=, job_store=, inbox=).
        self.database: Database | None = None
        self.store: Store = store or SqliteStore(self._database())
        self.notifier: Notifier = notifier or WebhookNotifier(
            settings.notify.webhook,
            timeout=settings.notify.timeout,
            on_failure=self.faults.webhook_failed,
        )
        self.clock: Clock = clock or SystemClock()
        self.agent_client: AgentClient = agent_client or HttpAgentClient()
        self.docker_api_version = ""
        #: every lifecycle change, message status change and notice, for SSE.
        self.events = EventHub(clock=self.clock)
        #: Roost's own conditions: the engine unreachable, the state database failing.
        self.health = Health(clock=self.clock, announce=self.announce)
        #: per-container agent tokens, stored as hashes (same SQLite file).
        self.credentials = Credentials(tokens or SqliteTokenStore(self._database()))
        #: WebSocket agents' connections; a revoked token closes its connection.
        self.channels = Channels(clock=self.clock)
        self.credentials.on_revoke(
            lambda agent: self.channels.revoke(agent, self.credentials.current(agent))
        )
        #: the network agents join (None: Docker's default bridge) and its gateway,
        #: known once started (the agent listener binds there by default).
        self.agents_network = (
            settings.agents_network
            if self.backend.kind == "engine"
            # Swarm services join no bridge of the manager's: docker.network, if set,
            # names an attachable overlay network they join.
            else settings.docker.network or None
        )
        self.agents_gateway: str | None = None
        self.supervisor = Supervisor(
            store=self.store,
            health=self.health,
            backend=self.backend,
            # The supervisor's notices (agent.failed) reach the event stream and the
            # webhook alike, with the same payload.
            notifier=_Announcer(self),
            clock=self.clock,
            agent_client=self.agent_client,
            instance=self.instance,
            public_url=settings.server.resolved_public_url,
            publish_host=settings.docker.publish_host,
            network=self.agents_network,
            pull_timeout=settings.docker.pull_timeout,
            max_concurrent_starts=settings.docker.max_concurrent_starts,
            credentials=self.credentials,
            channels=self.channels,
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
            credentials=self.credentials,
            backend=self.backend,
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
            cap_drop=settings.defaults.cap_drop,
            cap_add=settings.defaults.cap_add,
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
            channels=self.channels,
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
        #: front-end components' start (the agent listener), run before agents load.
        self._openers: list[Callable[[], Awaitable[None]]] = []
        self._started = False
        self._closed = False
        #: this engine holds its instance's owner marker in Docker (reactor.owning).
        self._claimed = False

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
        if isinstance(self.runtime, DockerRuntime):
            docker_runtime.API_ERROR_HOOKS.append(self.faults.docker_api_error)
        try:
            if self.database is not None:
                await self.database.open()
            await self.store.open()
            await self.inbox.open()
            await self.credentials.load()
            self.docker_api_version = await self.runtime.ping()
            await owning.claim_instance(self.runtime, self.instance, self.settings.state_path())
            self._claimed = True
            if self.backend.kind == "engine":
                await self._prepare_agents_network()
            else:
                await self.backend.ping()  # the swarm manager answers (jobs use the engine)
            for opener in self._openers:
                await opener()
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
            await self.release_agents()
            await self.dispatcher.stop()
            await self.jobs.stop(leave_running=leave)
            await self.supervisor.shutdown(leave_running=leave, remove=remove)
            await self.agents.close()
            await self.health.close()
        await self._close_resources()

    async def release_agents(self) -> None:
        """Let go of the agents' own connections (shutdown, before the servers wait
        for open requests): WebSockets close, waiting polls answer 204 at once.
        Agents reconnect or poll again to the next Roost."""
        self.dispatcher.pulls.close()
        await self.channels.close()

    def add_opener(self, opener: Callable[[], Awaitable[None]]) -> None:
        """Have ``start`` await ``opener`` once Docker answers and the agents' network
        exists, before any agent is loaded (e.g. binding the agent listener on that
        network's gateway, so ROOST_URL is known before a container is created).
        An opener that raises stops the start."""
        self._openers.append(opener)

    @property
    def agent_url(self) -> str:
        """The agent listener's URL as containers see it (their ROOST_URL); empty
        while none is served (then they get ``server.public_url``)."""
        return self.supervisor.agent_url

    @agent_url.setter
    def agent_url(self, url: str) -> None:
        self.supervisor.agent_url = url

    async def _prepare_agents_network(self) -> None:
        """Create Roost's agents' network if missing (only the one Roost names:
        ``docker.network`` is the user's and used as it is), and learn its gateway."""
        name = self.agents_network
        if name is None:
            name = "bridge"
        elif not self.settings.docker.network:
            await self.runtime.ensure_network(name, labels={labels.MANAGED: "true"}, isolated=True)
        try:
            self.agents_gateway = await self.runtime.network_gateway(name)
        except errors.NotFound:
            log.warning("network %r (docker.network) does not exist yet", name)
            self.agents_gateway = None

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Have ``stop`` call ``closer`` first (front ends built on the engine, e.g. the
        proxy's connections and open event streams, which the engine cannot import)."""
        self._closers.append(closer)

    async def _close_resources(self) -> None:
        if self._claimed:
            await owning.release_instance(self.runtime, self.instance)
            self._claimed = False
        closers = (
            self.agent_client.close,
            self.backend.close,
            self.runtime.close,
            self.inbox.close,
            self.store.close,
        )
        # (The token store needs no closing: its writes are awaited by their callers.)
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
        if self.faults.docker_api_error in docker_runtime.API_ERROR_HOOKS:
            docker_runtime.API_ERROR_HOOKS.remove(self.faults.docker_api_error)
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
        # The job's id goes as ``job``: an event's own ``id`` is the hub's (SSE resume).
        data = {k: v for k, v in job.to_json().items() if k not in ("log_tail", "id")}
        self.events.publish("job.state", {"job": job.id, **data}, at=self.clock.now())

    async def announce(self, kind: str, data: dict[str, Any], *, webhook: bool = True) -> None:
        """Publish a notice on the event stream and (by default) to the admin webhook."""
        self.events.publish(kind, data)
        if webhook:
            await self.notifier.notify(kind, data)

    # -- reload -----------------------------------------------------------------------

    #: Sections a reload cannot apply while running (they shape the process itself).
    RESTART_SECTIONS = ("server", "docker", "jobs", "swarm", "notify")

    async def reload_from_file(self, *, restart: bool = False) -> dict[str, Any]:
        """Re-read the file these settings came from and apply it (see ``reload``).
        ConfigError (naming the key, nothing changed) when the file is invalid;
        StateError when Roost runs on built-in defaults (there is no file)."""
        source = self.settings.source_file
        if source is None:
            raise errors.StateError(
                "Roost runs on built-in defaults (no config file): there is nothing to reload"
            )
        async with self._reloading:  # read and applied in one turn: the latest file wins
            settings = await asyncio.to_thread(
                functools.partial(load_settings, source, refuse_empty=True)
            )
            return await self._reload(settings, restart=restart)

    async def reload(self, settings: Settings, *, restart: bool = False) -> dict[str, Any]:
        """Apply a re-read configuration (SIGHUP, ``roost reload``): its agents and
        ``[defaults]`` now; sections that need a new process are reported, not applied.
        ``settings`` was validated already, so a bad file never gets here. Reloads
        apply one at a time (two SIGHUPs in a row must not diff against one base)."""
        async with self._reloading:
            return await self._reload(settings, restart=restart)

    async def _reload(self, settings: Settings, *, restart: bool) -> dict[str, Any]:
        needs_restart = [
            section
            for section in self.RESTART_SECTIONS
            if getattr(settings, section) != getattr(self.settings, section)
        ]
        report: dict[str, Any] = dict(
            await self.agents.apply_config(settings.resolved_agents(), restart=restart)
        )
        report["needs_restart"] = needs_restart
        report["source_file"] = settings.source_file
        # What needs a new process stays as it runs (each later reload reports it
        # again, and e.g. a changed docker.leave_running is not half-applied at stop).
        self.settings = settings.model_copy(
            update={section: getattr(self.settings, section) for section in needs_restart}
        )
        log.info(
            "configuration reloaded from %s: %s",
            settings.source_file or "<defaults>",
            ", ".join(f"{k} {v}" for k, v in report.items() if isinstance(v, list) and v)
            or "nothing changed",
        )
        await self.announce("config.reloaded", report, webhook=False)
        return report

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
                    await spawning.ensure_spawn_resources(
                        self.runtime, spec, instance=self.instance
                    )
                except errors.RoostError as exc:
                    log.error("agent %s: cannot prepare its network/volume: %s", name, exc)
            self.supervisor.add_actor(leftover.record, spec, agent_id=agent_id)


def _backend_for(settings: Settings, runtime: ContainerRuntime) -> AgentBackend:
    """The agent backend ``[docker] backend`` names, built on first need."""
    if settings.docker.backend == "swarm":
        # Imported here: an engine-backed Roost never loads the Swarm adapter.
        from roost.adapters.swarm_backend import SwarmBackend

        return SwarmBackend(
            settings.docker.host or None,
            node_hosts=settings.docker.node_hosts,
            connection_limit=settings.docker.connection_limit,
        )
    return EngineBackend(runtime)


def _spec_json(spec: ResolvedAgent) -> dict[str, Any]:
    return spec.model_dump(mode="json")


class _Announcer:
    """The supervisor's ``Notifier``: ``Engine.announce`` (event stream + webhook)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        await self._engine.announce(kind, payload)

"""The one door into the agents: ``Agents``, the facade every front end uses.

Role: the api, the edge (proxy), the dispatcher, the leases, the library and the
runner reach agents only through this object (``engine.agents``), never through
the supervisor's actors. It offers what they need and nothing of the reactor's
insides:

- looking: ``names``, ``get`` (the record), ``spec``, ``describe`` (an agent as
  JSON, contract: DESIGN.md "Interfaces"), ``details`` (with history), ``logs``,
  ``allowed_actions`` (what the state allows now, as ``transition`` decides),
  ``routes`` (every agent's event type patterns, in configuration order);
- acting: ``wake`` (hold until the agent is ready: answers its health check, or
  is connected), ``act`` (start/stop/pause/wake/restart/reset requested), ``observe`` (re-read the
  agent's container from the engine now), ``busy`` (activity in flight),
  ``touch`` (a sign of life from the agent itself: a poll, a heartbeat);
- the registry: ``register`` and ``delete`` of agents added at run time
  (``on_delete`` tells the delivery side, and the agent's token is revoked).

Invariants:
- ``wake`` announces ``agent.waking`` at most once per wake, after the agent's
  ``waking_notice_after`` on the injected clock, however many requests (proxied,
  delivered, leased) wait for the same wake; the notice is cleared when the agent
  is up again.
- ``delete`` refuses (Conflict) an agent from the configuration file: it would
  come back on the next start. ``register`` and ``delete`` publish
  ``agent.registered`` / ``agent.deleted`` on the event hub.
- Unknown names raise ``NotFound`` naming the agent; refused actions
  ``StateError`` naming the state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, Literal

from roost import errors
from roost.aio import TaskSet
from roost.config import ResolvedAgent, SpawnedAgent
from roost.core import events as ev
from roost.core import labels
from roost.core.policy import Policy
from roost.core.records import AgentRecord, StateChange
from roost.core.states import ACTIVE_STATES, AgentState
from roost.core.transition import transition
from roost.ports.backend import AgentBackend
from roost.ports.clock import Clock
from roost.ports.runtime import ContainerRuntime
from roost.ports.store import Store
from roost.reactor import spawning
from roost.reactor.credentials import Credentials
from roost.reactor.supervising import AgentActor, StateListener, Supervisor

__all__ = ["ACTIONS", "Action", "Agents", "Announce", "Busy", "describe"]

log = logging.getLogger("roost.agents")

Action = Literal["start", "stop", "pause", "wake", "restart", "reset"]
#: Lifecycle actions (``POST /api/agents/{name}/{action}``, ``roost ACTION NAME``).
ACTIONS: tuple[Action, ...] = ("start", "stop", "pause", "wake", "restart", "reset")
#: Publish a notice on the event stream and (``webhook=True``) to the admin's webhook.
Announce = Callable[..., Coroutine[Any, Any, None]]

_REQUESTS: dict[str, Callable[[str], ev.Event]] = {
    "start": ev.StartRequested,
    "wake": ev.StartRequested,
    "stop": ev.StopRequested,
    "pause": ev.PauseRequested,
    "restart": ev.RestartRequested,
    "reset": ev.ResetRequested,
}


class Busy:
    """``Agents.busy``: the actor's busy span, yielding its ``touch``.

    A plain class rather than a generator-based context manager: it sits on every
    proxied request's path, where the generator machinery cost ~1.5 µs more."""

    __slots__ = ("_actor", "_span")

    def __init__(self, actor: AgentActor) -> None:
        self._actor = actor
        self._span = actor.busy()

    async def __aenter__(self) -> Callable[[], None]:
        await self._span.__aenter__()
        return self._actor.touch

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._span.__aexit__(exc_type, exc, tb)


def describe(record: AgentRecord, spec: ResolvedAgent | None = None) -> dict[str, Any]:
    """An agent as JSON (contract: DESIGN.md "Interfaces"), with its swarm identity
    when it was spawned."""
    body: dict[str, Any] = {
        "name": record.name,
        "state": record.state.value,
        "container_id": record.container_id,
        "url": record.url if record.state in ACTIVE_STATES else None,
        "restart_count": record.restart_count,
        "last_activity_at": record.last_activity_at,
        "last_exit": record.last_exit.to_json_with_tail() if record.last_exit else None,
        "last_error": record.last_error or None,
        "state_since": record.state_since,
        "config_hash": record.config_hash,
    }
    if spec is not None:
        body["image"] = spec.image
        body["delivery"] = spec.delivery
        body["event_types"] = list(spec.routes)
    if isinstance(spec, SpawnedAgent):
        body["agent_id"] = spec.agent_id
        body["capabilities"] = list(spec.capabilities)
    return body


def _new_run(followed: tuple[str, float | None] | None) -> Callable[[AgentRecord], bool]:
    """True once the agent runs a container (or a run of it) other than ``followed``."""

    def new(record: AgentRecord) -> bool:
        return (
            record.container_id is not None
            and record.state in ACTIVE_STATES
            and (record.container_id, record.running_since) != followed
        )

    return new


class Agents:
    """Every agent of one engine, behind one narrow door (see the module docstring)."""

    def __init__(
        self,
        *,
        supervisor: Supervisor,
        store: Store,
        runtime: ContainerRuntime,
        clock: Clock,
        announce: Announce,
        instance: str,
        credentials: Credentials | None = None,
        backend: AgentBackend | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._credentials = credentials
        self._deletion_listeners: list[Callable[[str], None]] = []
        self._store = store
        #: the engine's runtime: spawned agents' networks and volumes live there.
        self._runtime = runtime
        #: what runs the agents (the supervisor's backend): logs, status, removal.
        self._backend = backend if backend is not None else supervisor.backend
        self._clock = clock
        self._announce = announce
        self._instance = instance
        #: agents whose current wake has been announced (cleared once they are up).
        self._announced: set[str] = set()
        self._notices = TaskSet(log)
        #: agent → (record, spec, actions) of the last ``allowed_actions`` answer.
        self._allowed: dict[str, tuple[AgentRecord, Policy, tuple[Action, ...]]] = {}
        supervisor.add_listener(self._on_change)

    async def close(self) -> None:
        """Wait for waking notices in flight (shutdown)."""
        await self._notices.close()

    # -- looking ---------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._supervisor.actors

    def __len__(self) -> int:
        return len(self._supervisor.actors)

    def names(self) -> list[str]:
        return sorted(self._supervisor.actors)

    def records(self) -> list[AgentRecord]:
        """Every agent's current record, by name."""
        return [self._supervisor.actors[name].record for name in self.names()]

    def get(self, name: str) -> AgentRecord:
        """The agent's current record; NotFound naming it when there is none."""
        return self._supervisor.actor(name).record

    def spec(self, name: str) -> ResolvedAgent:
        spec = self._supervisor.actor(name).spec
        assert isinstance(spec, ResolvedAgent)
        return spec

    def describe(self, name: str) -> dict[str, Any]:
        actor = self._supervisor.actor(name)
        body = describe(actor.record, self.spec(name))
        body["degraded"] = actor.degraded
        return body

    def allowed_actions(self, name: str) -> list[Action]:
        """The actions the agent's state allows now and that would change something,
        as the core decides them: each request is tried on the current record with
        ``transition`` (pure; nothing is done). ``start`` and ``wake`` are the same
        request, so they are allowed together."""
        actor = self._supervisor.actor(name)
        # (the actor's policy: the spec as the backend allows it, e.g. no pause on a swarm)
        record, policy = actor.record, actor.policy
        cached = self._allowed.get(name)
        # Records and specs are frozen: the same two objects give the same answer
        # (the time only stamps what a request would change, never whether it may).
        if cached is not None and cached[0] is record and cached[1] is policy:
            return list(cached[2])
        now = self._clock.now()
        allowed: list[Action] = []
        for action in ACTIONS:
            decision = transition(record, _REQUESTS[action](""), now=now, policy=policy)
            if decision.rejected is None and (decision.changes or decision.commands):
                allowed.append(action)
        self._allowed[name] = (record, policy, tuple(allowed))
        return allowed

    async def details(self, name: str, *, history: int = 20) -> dict[str, Any]:
        """``describe`` plus the latest ``history`` state changes (oldest first), the
        latest exits with their log tails (newest first), and the agent's settings
        (env values left out: they may be secrets)."""
        body = self.describe(name)
        body["config"] = self.spec(name).shown()
        body["exits"] = [
            {**info.to_json_with_tail(), "container_id": info.container_id}
            for info in await self._store.exits(name)
        ]
        entries = await self._store.history(name, limit=history)
        body["history"] = [
            {
                "from": e.change.from_state.value,
                "to": e.change.to_state.value,
                "reason": e.change.reason,
                "at": e.change.at,
            }
            for e in entries
        ]
        return body

    async def logs(
        self, name: str, *, tail: int, since: float | None = None, timestamps: bool = False
    ) -> str:
        """The last ``tail`` lines of the agent's current container's output (written
        since ``since``, epoch seconds, when given)."""
        record = self.get(name)
        if record.container_id is None:
            raise errors.NotFound(
                f"agent {name!r} has no container ({record.state.value}); "
                "its last crash's output is in logs --previous"
            )
        try:
            chunks = self._backend.logs(
                record.container_id, tail=tail, since=since, timestamps=timestamps
            )
            return "".join([chunk async for chunk in chunks])
        except errors.ContainerNotFound:
            raise errors.NotFound(
                f"agent {name!r}: container {record.container_id[:12]} no longer exists"
            ) from None

    async def previous_logs(self, name: str) -> str:
        """The log tail kept from the agent's latest exit (it survives the container
        and a Roost restart). NotFound when no exit was kept."""
        self.get(name)
        exits = await self._store.exits(name, limit=1)
        if not exits:
            raise errors.NotFound(f"agent {name!r} has no recorded exit")
        return exits[0].log_tail

    async def follow_logs(
        self,
        name: str,
        *,
        tail: int | None = 100,
        since: float | None = None,
        timestamps: bool = False,
        wait_step: float = 30.0,
    ) -> AsyncIterator[str]:
        """The agent's output as it comes, across restarts: each new container is
        announced by a line ``--- container <id> started ---``. Runs until the
        caller stops reading (or the agent is deleted)."""
        actor = self._supervisor.actor(name)
        followed: tuple[str, float | None] | None = None
        first = True
        while not actor.closed:
            record = actor.record
            run = (record.container_id, record.running_since) if record.container_id else None
            if run is None or run == followed or record.state not in ACTIVE_STATES:
                # Nothing (new) to follow yet: wait for the next run of the agent.
                await actor.wait_for(_new_run(followed), wait_step)
                continue
            cid = run[0]
            assert cid is not None
            if not first:
                yield f"--- container {cid[:12]} started ---\n"
            try:
                async for chunk in self._backend.logs(
                    cid,
                    follow=True,
                    tail=tail if first else None,
                    since=since if first else record.running_since,
                    timestamps=timestamps,
                ):
                    yield chunk
            except errors.ContainerNotFound:
                pass
            followed = run
            first = False

    def routes(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every agent's event type patterns, in configuration order (configured
        agents as the file lists them, then the registered ones as they came)."""
        return [(name, actor.spec.routes) for name, actor in self._supervisor.actors.items()]

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(record, changes)`` after every persisted state change."""
        self._supervisor.add_listener(listener)

    def on_delete(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(name)`` once an agent has been deleted."""
        self._deletion_listeners.append(listener)

    # -- acting ----------------------------------------------------------------------

    async def wake(
        self,
        name: str,
        *,
        reason: str,
        timeout: float | None = None,
        fail_fast: bool = False,
    ) -> AgentRecord:
        """Wake the agent if needed and hold until it answers its health check.

        ``timeout`` defaults to the agent's ``hold_timeout``; ``fail_fast`` raises at
        the first failed start instead of waiting through restarts. Raises
        ``StartupTimeout`` (still waking), ``StateError`` (failed, or shutting down)
        or ``ContainerError`` (it could not start).
        """
        actor = self._supervisor.actor(name)
        record = actor.record
        if record.awake:
            actor.touch()
            return record
        spec = self.spec(name)
        started = self._clock.monotonic()
        notice = self._notices.spawn(
            self._notice_after(name, record.state, started, spec.waking_notice_after),
            f"roost.waking-notice[{name}]",
        )
        try:
            return await self._supervisor.ensure_running(
                name,
                timeout=spec.hold_timeout if timeout is None else timeout,
                reason=reason,
                fail_fast=fail_fast,
            )
        finally:
            notice.cancel()

    async def act(self, name: str, action: Action, *, reason: str = "") -> AgentRecord:
        """Request a lifecycle action; returns once it is decided (and persisted).
        StateError when the agent's state refuses it."""
        make = _REQUESTS.get(action)
        if make is None:
            raise errors.StateError(
                f"unknown action {action!r}; valid actions: {', '.join(ACTIONS)}"
            )
        return await self._supervisor.request(name, make(reason or f"{action} requested"))

    async def observe(self, name: str) -> AgentRecord:
        """Read the agent's container from the engine now, and let the lifecycle react
        to what it finds (an exit or a disappearance the event stream has not told
        yet). Returns the record after that."""
        actor = self._supervisor.actor(name)
        cid = actor.record.container_id
        if cid is not None:
            try:
                state = await self._backend.status(cid)
            except errors.ContainerNotFound:
                await actor.submit(ev.ContainerVanished(cid))
            else:
                if not state.running and state.exit is not None:
                    await actor.submit(ev.ContainerExited(cid, state.exit))
        return actor.record

    def address(self, record: AgentRecord) -> str | None:
        """Where Roost's own requests to the agent go: its container's own address
        when it answered its health check there (``roost.reactor.addressing``), else
        ``record.url``."""
        return self._supervisor.addresses.url(record)

    def busy(self, name: str) -> Busy:
        """Activity in flight (a delivery, a stream, a lease): idling never fires
        meanwhile. ``async with agents.busy(name) as touch``: call ``touch`` on every
        sign of life (e.g. a frame). NotFound naming the agent when there is none."""
        return Busy(self._supervisor.actor(name))

    def touch(self, name: str) -> None:
        """A sign of life from the agent itself (a poll, a heartbeat): it is in use."""
        self._supervisor.actor(name).touch()

    # -- the registry ----------------------------------------------------------------

    async def register(self, spec: ResolvedAgent, *, agent_id: str = "") -> AgentRecord:
        """Add an agent at run time (persisted; it behaves like a configured one).

        A ``SpawnedAgent``'s network and volume are created first when absent, so a
        failure there registers nothing. Conflict if the name is taken."""
        if spec.name in self._supervisor.actors:
            raise errors.Conflict(f"an agent named {spec.name!r} already exists")
        if isinstance(spec, SpawnedAgent):
            await spawning.ensure_spawn_resources(self._runtime, spec, instance=self._instance)
        record = await self._store.insert_agent(
            AgentRecord(name=spec.name, state_since=self._clock.now()),
            spec.model_dump(mode="json"),
            source="api",
        )
        if not agent_id and isinstance(spec, SpawnedAgent):
            agent_id = spec.agent_id
        self._supervisor.add_actor(record, spec, agent_id=agent_id)
        await self._announce(
            "agent.registered",
            {
                "agent": spec.name,
                "agent_id": spec.agent_id if isinstance(spec, SpawnedAgent) else spec.name,
                "capabilities": list(spec.capabilities) if isinstance(spec, SpawnedAgent) else [],
            },
            webhook=False,
        )
        return record

    async def reconfigure(self, spec: ResolvedAgent) -> None:
        """Give a registered agent a new spec; a changed container is recreated at
        its next start."""
        actor = self._supervisor.actor(spec.name)
        if actor.spec == spec:
            return
        await self._store.update_spec(spec.name, spec.model_dump(mode="json"), source="api")
        actor.spec = spec

    async def delete(self, name: str) -> None:
        """Stop (SIGTERM, ``stop_timeout``, SIGKILL) and remove the agent's container,
        and forget the agent. NotFound for an unknown agent; Conflict for one from the
        configuration file."""
        self._supervisor.actor(name)
        stored = await self._store.get_agent(name)
        if stored is not None and stored.source == "config":
            raise errors.Conflict(
                f"agent {name!r} is configured in the config file; remove it there instead"
            )
        await self._remove(name)
        await self._announce("agent.deleted", {"agent": name}, webhook=False)

    async def apply_config(
        self, configured: dict[str, ResolvedAgent], *, restart: bool = False
    ) -> dict[str, list[str]]:
        """Make the configured agents what ``configured`` says (a config reload):
        new ones are added, ones that left the file are stopped and forgotten, changed
        ones get their new spec — a changed container is recreated at its next start,
        or at once (running agents) with ``restart``. Agents registered over the API
        are left alone. Each change is an event. Returns the names by what happened."""
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        stored = {s.record.name: s for s in await self._store.list_agents()}
        for name, spec in configured.items():
            spec_json = spec.model_dump(mode="json")
            existing = stored.get(name)
            if existing is None:
                record = await self._store.insert_agent(
                    AgentRecord(name=name, state_since=self._clock.now()), spec_json
                )
                self._supervisor.add_actor(record, spec)
                report["added"].append(name)
                await self._announce("agent.added", {"agent": name}, webhook=False)
                continue
            if existing.spec == spec_json and existing.source == "config":
                continue
            await self._store.update_spec(name, spec_json, source="config")
            actor = self._supervisor.actor(name)
            recreate = actor.spec.config_hash != spec.config_hash
            actor.spec = spec
            report["changed"].append(name)
            await self._announce(
                "agent.changed",
                {"agent": name, "container_changed": recreate, "restarting": recreate and restart},
                webhook=False,
            )
            if recreate and restart and actor.record.state in ACTIVE_STATES:
                await self.act(name, "restart", reason="config reloaded with --restart")
        for name, existing in stored.items():
            if existing.source == "config" and name not in configured:
                await self._remove(name)
                report["removed"].append(name)
                await self._announce("agent.removed", {"agent": name}, webhook=False)
        return report

    async def _remove(self, name: str) -> None:
        """Stop and remove the agent's containers and forget it.

        The agent is forgotten before its container goes: if Docker fails here, the
        error propagates and the container is an orphan that the next reconcile
        removes. Every container labelled for the agent is removed, not only the
        recorded one: a start cut short by the removal may have created one that
        was not recorded yet."""
        actor = self._supervisor.actor(name)
        grace = actor.spec.stop_timeout
        recorded = actor.record.container_id
        await self._supervisor.remove_actor(name)
        self._allowed.pop(name, None)
        await self._store.delete_agent(name)
        if self._credentials is not None:
            await self._credentials.forget(name)
        for listener in self._deletion_listeners:
            try:
                listener(name)
            except Exception:
                log.exception("agent %s: a deletion listener failed", name)
        found = await self._backend.list({**labels.ownership(self._instance), labels.AGENT: name})
        ids = {c.id for c in found} | ({recorded} if recorded is not None else set())
        for container_id in sorted(ids):
            await self._backend.sleep(container_id, mode="stop", grace=grace)
            await self._backend.remove(container_id)

    # -- waking notices --------------------------------------------------------------

    async def _notice_after(
        self, name: str, state: AgentState, started: float, delay: float
    ) -> None:
        await self._clock.sleep(delay)
        if name in self._announced:
            return
        self._announced.add(name)
        data = {
            "agent": name,
            "state": state.value,
            "waited_ms": round((self._clock.monotonic() - started) * 1000),
        }
        # Its own task: the wake finishing must not cut a webhook POST half-way.
        self._notices.spawn(self._announce("agent.waking", data), f"roost.waking[{name}]")

    def _on_change(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        if any(change.to_state in ACTIVE_STATES for change in changes):
            self._announced.discard(record.name)

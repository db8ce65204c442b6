"""The supervisor: one serialised actor per agent, driving the pure core.

Each ``AgentActor`` owns its agent's record and processes events strictly one
at a time: ``transition`` → persist (compare-and-set) → carry out commands.
Intent is written before anything is done, so a Roost killed at any line
restarts from a record that says what it was doing; the reconciler finishes it.

Every agent runs on the agent backend (``ports.backend``: a container on one
Docker Engine, a service on a Docker Swarm); the supervisor asks it, never the
container runtime, and chooses from its capabilities (the idle ladder stops
instead of pausing where the backend has no pause; an agent whose node went down
starts again elsewhere, uncounted).

Long Docker work never blocks the actor loop:
- the start procedure (create → record the container → start → HTTP readiness;
  the image is pulled only when the create finds it absent) runs as the actor's
  *start task*; it reports back with events and is cancelled whenever the agent
  leaves ``starting``;
- stops and removals run as owned background operations; a start first waits
  for them (so a wake never races a stop of the same container).

Concurrent start/wake requests merge: the second one finds the agent already
``starting`` and simply waits for the same outcome.

The engine's and the disk's bad days (``reactor.health``):
- A Docker call that fails because the engine is unreachable marks the engine
  down (one notice), and a start that failed that way waits for it without
  counting against ``max_restarts``; a recovery loop pings the engine, and when it
  answers it reconciles and releases the waiting starts (``EngineRecovered``).
  An unexpected exit makes Roost ping the engine (a stopping daemon stops its
  containers after it stopped accepting connections, and would even start them
  again on the connections still open). Exits seen just before the engine went
  down, or while it is down, are blamed on it; before an exit makes an agent
  ``failed`` the engine is pinged. A failed
  liveness probe while the engine is down (or found down by a ping then) is not
  counted: the probe goes through the engine's port proxy. While it is down
  nothing logs a traceback per call.
- A record that cannot be written is retried with backoff until the write
  succeeds: the actor never moves past what is stored, and the store's condition
  is announced once when it begins and once when it ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from roost import errors
from roost.aio import TaskSet
from roost.config import ResolvedAgent, SpawnedAgent
from roost.core import commands as cmd
from roost.core import events as ev
from roost.core import labels
from roost.core.backoff import Backoff
from roost.core.policy import Policy, without_pause
from roost.core.reconciling import Observed, plan_reconcile
from roost.core.records import AgentRecord, ExitInfo, SessionHealth, StateChange
from roost.core.states import ACTIVE_STATES, AgentState
from roost.core.transition import Decision, next_deadline, transition
from roost.ports.agent_http import AgentClient, ProbeResult
from roost.ports.backend import AgentBackend
from roost.ports.clock import Clock
from roost.ports.notifier import Notifier
from roost.ports.runtime import ContainerSpec, RuntimeEvent
from roost.ports.store import Store
from roost.reactor.addressing import Addresses, container_url
from roost.reactor.channels import Channels
from roost.reactor.credentials import TOKEN_ENV, Credentials
from roost.reactor.health import Health, until_written

__all__ = ["AgentActor", "StateListener", "Supervisor"]

log = logging.getLogger("roost.supervisor")

S = AgentState
#: How often readiness is polled while a container starts (millisecond granularity).
READINESS_POLL_INTERVAL = 0.005
#: Per-probe HTTP timeout during readiness: a listening-but-hung app must not stall us.
READINESS_PROBE_TIMEOUT = 1.0
#: What is kept of a crashed container's output: its last lines, at most this many bytes.
LOG_TAIL_LINES = 100
LOG_TAIL_BYTES = 16 * 1024
#: Liveness probes due within this many seconds are sent together (see _liveness_loop).
LIVENESS_BATCH_WINDOW = 1.0
#: Pings of an unreachable engine: quick at first, then twice a second, so a
#: recovery is seen within 0.5 s (a ping of a daemon that is not there costs a
#: failed connect; the issue asks for agents back within 2 s of the engine).
ENGINE_PING = Backoff.doubling(0.05, 0.5)
#: Exits this many seconds before the engine is found down are blamed on it (a
#: daemon that stops kills its containers first; dockerd waits up to 15 s).
ENGINE_EXIT_WINDOW = 20.0
#: Docker health statuses that are a HEALTHCHECK verdict ("starting" is not).
_VERDICTS = frozenset({SessionHealth.HEALTHY, SessionHealth.UNHEALTHY})


#: Called after every persisted decision: (agent record, state changes).
StateListener = Callable[[AgentRecord, tuple[StateChange, ...]], None]


class _Envelope:
    __slots__ = ("after", "attempt", "event", "reply")

    def __init__(
        self,
        event: ev.Event,
        reply: asyncio.Future[Decision] | None,
        attempt: int | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.event = event
        self.reply = reply
        #: for reports of a start procedure: which attempt sent it.
        self.attempt = attempt
        #: called once the event has been handled (persisted, its commands begun).
        self.after = after


class AgentActor:
    """Owns one agent: its record, its event queue, its start/timer/liveness tasks.

    An actor that has nothing to do holds no task and no queue: its loop task runs
    while events are queued and ends when the queue is empty (the next event starts
    another), its timer is an entry in the supervisor's one timer heap, and
    waiters, Docker operations and notices get their containers on first use.
    Thousands of registered agents cost their records and specs, little more."""

    __slots__ = (
        "_attempt",
        "_busy",
        "_inbox",
        "_known_url",
        "_last_touch_posted",
        "_loop_task",
        "_notices",
        "_op_targets",
        "_ops",
        "_paused_healthy",
        "_policy_of",
        "_port_holders",
        "_probe_target",
        "_start_task",
        "_state_before",
        "_timer_at",
        "_timer_seq",
        "_waiters",
        "agent_id",
        "closed",
        "degraded",
        "next_probe_at",
        "record",
        "spec",
        "start_failures",
        "sup",
    )

    def __init__(
        self, supervisor: Supervisor, record: AgentRecord, spec: ResolvedAgent, agent_id: str
    ) -> None:
        self.sup = supervisor
        self.record = record
        self.spec = spec
        self.agent_id = agent_id
        #: events waiting to be handled (None: none since the loop last ran dry).
        self._inbox: collections.deque[_Envelope] | None = None
        #: runs while events are queued; None or done when the actor is idle.
        self._loop_task: asyncio.Task[None] | None = None
        #: wait_for's callers: (predicate, future resolved when it held after a change).
        self._waiters: list[tuple[Callable[[AgentRecord], bool], asyncio.Future[None]]] | None
        self._waiters = None
        self._start_task: asyncio.Task[None] | None = None
        #: the deadline of this actor's entry in the supervisor's timer heap, and the
        #: entry's number (an entry with another number is stale).
        self._timer_at: float | None = None
        self._timer_seq = 0
        #: (container id, URL) probed for liveness while running; None otherwise.
        self._probe_target: tuple[str, str] | None = None
        self.next_probe_at = 0.0
        #: Docker stop/pause/remove operations in flight (a start waits for them).
        self._ops: TaskSet | None = None
        #: notifications in flight (nobody waits for them but shutdown).
        self._notices: TaskSet | None = None
        #: which container each Docker operation in flight is about.
        self._op_targets: dict[asyncio.Task[Any], str] | None = None
        #: stops and removals in flight of containers that may still hold host ports.
        self._port_holders: set[asyncio.Task[Any]] | None = None
        self._busy = 0
        #: numbers start procedures; reports from superseded ones are dropped.
        self._attempt = 0
        #: the state before the event being handled (a wake from paused is fast).
        self._state_before = record.state
        #: (container id, URL) last seen healthy: a paused container keeps its port.
        self._known_url: tuple[str, str] | None = None
        #: the container Roost paused while it was healthy (see _resumes_healthy).
        self._paused_healthy: str | None = None
        self._last_touch_posted = 0.0
        #: start failures handled (in the record); fail-fast waiters compare it.
        self.start_failures = 0
        #: why the agent cannot move on right now (its state cannot be written), or None.
        self.degraded: str | None = None
        #: (spec, its policy on a backend without pause), made once per spec.
        self._policy_of: tuple[ResolvedAgent, Policy] | None = None
        self.closed = False

    # -- lifecycle of the actor itself --------------------------------------------

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def policy(self) -> Policy:
        """The lifecycle numbers ``transition`` obeys: the spec itself, seen through
        what the backend can do (``without_pause`` where it cannot pause)."""
        spec = self.spec
        if self.sup.backend.capabilities.can_pause:
            return spec
        if self._policy_of is None or self._policy_of[0] is not spec:
            self._policy_of = (spec, without_pause(spec))
        return self._policy_of[1]

    async def close(self) -> None:
        """Stop the actor's tasks. Docker operations in flight are awaited; events
        still queued are dropped (their submitters get a StateError)."""
        self.closed = True
        self._stop_probing()
        self.sup._timers.cancel(self)
        tasks = [self._loop_task, self._start_task]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        inbox, self._inbox = self._inbox, None
        for envelope in inbox or ():
            if envelope.reply is not None and not envelope.reply.done():
                envelope.reply.set_exception(
                    errors.StateError(f"agent {self.name!r} is shutting down")
                )
        for owned in (self._ops, self._notices):
            if owned is not None:
                await owned.join()

    # -- input ----------------------------------------------------------------------

    def post(self, event: ev.Event, *, after: Callable[[], None] | None = None) -> None:
        """Queue an event without waiting for it (used by watchers and timers).
        ``after``: called once it has been handled (its record persisted and its
        commands begun: tasks they started run after it)."""
        if not self.closed:
            self._enqueue(_Envelope(event, None, after=after))

    async def submit(self, event: ev.Event, *, attempt: int | None = None) -> Decision:
        """Queue an event and wait until it has been decided, persisted and acted on.

        ``attempt``: the start attempt reporting it; a report from an attempt that
        was superseded (restart, stop) is dropped and its container removed.
        """
        if self.closed:
            raise errors.StateError(f"agent {self.name!r} is shutting down")
        reply: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._enqueue(_Envelope(event, reply, attempt))
        return await reply

    def _enqueue(self, envelope: _Envelope) -> None:
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = collections.deque()
        inbox.append(envelope)
        task = self._loop_task
        if task is None or task.done():
            self._loop_task = asyncio.create_task(self._loop(), name=f"roost.agent[{self.name}]")

    def touch(self) -> None:
        """Record activity cheaply: at most one persisted write per second."""
        now = self.sup.clock.now()
        if self.record.state is S.IDLE or now - self._last_touch_posted >= 1.0:
            self._last_touch_posted = now
            self.post(ev.Activity())

    @contextlib.asynccontextmanager
    async def busy(self) -> AsyncIterator[None]:
        """Activity in flight (delivery, stream, lease): idling never fires meanwhile."""
        self._busy += 1
        self.touch()
        try:
            yield
        finally:
            self._busy -= 1
            self.touch()

    @property
    def is_busy(self) -> bool:
        return self._busy > 0

    @property
    def start_in_flight(self) -> bool:
        return self._start_task is not None and not self._start_task.done()

    # -- waiting --------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[AgentRecord], bool], timeout: float) -> bool:
        """Wait until ``predicate`` holds for the record (checked now, then after every
        handled event); False if it did not within ``timeout`` seconds."""
        if predicate(self.record):
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, waiter)
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(entry)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await waiter
        finally:
            waiters = self._waiters
            if waiters is not None:
                waiters.remove(entry)
                if not waiters:
                    self._waiters = None
        return waiter.done() and not waiter.cancelled()

    def _wake_waiters(self) -> None:
        for predicate, waiter in self._waiters or ():
            if not waiter.done() and predicate(self.record):
                waiter.set_result(None)

    # -- the loop -------------------------------------------------------------------

    async def _loop(self) -> None:
        """Handle queued events in order until none is left, then end (no await
        between the last look at the queue and the end: an event queued after it
        starts a new loop task)."""
        while self._inbox:
            envelope = self._inbox.popleft()
            if envelope.attempt is not None and envelope.attempt != self._attempt:
                # A superseded start created a container after all: nobody owns it.
                if isinstance(envelope.event, ev.ContainerCreated):
                    self._op(self.sup.backend.remove(envelope.event.container_id), "remove")
                if envelope.reply is not None and not envelope.reply.done():
                    envelope.reply.set_result(Decision(self.record, rejected="superseded"))
                continue
            try:
                decision = await self._handle(envelope.event)
            except Exception as exc:
                log.exception("agent %s: failed to handle %s", self.name, envelope.event)
                if envelope.reply is not None and not envelope.reply.done():
                    envelope.reply.set_exception(exc)
                continue
            finally:
                if envelope.after is not None:
                    envelope.after()
            if envelope.reply is not None and not envelope.reply.done():
                envelope.reply.set_result(decision)
        # Idle: nothing of the loop stays (this task ends with no await after this).
        self._inbox = None
        self._loop_task = None

    async def _handle(self, event: ev.Event) -> Decision:
        before = self.record
        self._state_before = before.state
        now = self.sup.clock.now()
        decision = transition(self.record, event, now=now, policy=self.policy)
        if isinstance(event, ev.ContainerExited) and _gives_up(decision):
            # The admin's notice needs the diagnostics: read them first. Crashes
            # that restart decide from the die event alone (restart within ms) and
            # read them while removing the container (RemoveContainer.diagnose).
            # An engine that cannot say why is going away itself: its exit, not ours.
            event = await self._enrich_exit(event)
            if not event.engine_down and await self.sup.engine_unreachable():
                # A stopping dockerd stops its containers after closing its listener,
                # and meanwhile still answers on open connections (the inspect
                # above): asked on a new one, it is gone. Its exit, not the agent's.
                event = dataclasses.replace(event, engine_down=True)
            now = self.sup.clock.now()
            decision = transition(self.record, event, now=now, policy=self.policy)
        if decision.rejected is None and decision.record != self.record:
            # Intent first: persist before acting (compare-and-set on version).
            self.record = await self._persist(decision)
            decision = Decision(self.record, decision.commands, decision.changes)
        for change in decision.changes:
            log.info(
                "agent %s: %s -> %s (%s)",
                self.name,
                change.from_state.value,
                change.to_state.value,
                change.reason,
            )
        if self.record.url is not None and self.record.container_id is not None:
            self._known_url = (self.record.container_id, self.record.url)
        if self.record.state is S.PAUSED and before.state is not S.PAUSED:
            self._paused_healthy = _healthy_container(before)
        for command in decision.commands:
            self._execute(command)
        if self.record.state is not S.STARTING and self._start_task is not None:
            self._start_task.cancel()
            self._start_task = None
        self._reschedule()
        self._manage_liveness()
        if decision.changes:
            self.sup._publish(self.record, decision.changes)
        if isinstance(event, ev.StartFailed):
            # Counted once the failure is in the record, so a fail-fast waiter
            # never wakes before it and reports a state without the reason.
            self.start_failures += 1
        self._wake_waiters()
        return decision

    async def _persist(self, decision: Decision) -> AgentRecord:
        """Write the decided record; while the database refuses, retry with backoff
        (the actor does not move past what is stored, and does nothing meanwhile)."""
        exit_info = decision.record.last_exit

        def refused(exc: errors.StoreError) -> None:
            self.degraded = f"cannot write its state: {exc}"

        stored = await until_written(
            lambda: self.sup.store.update_agent(
                decision.record,
                changes=decision.changes,
                exit=exit_info if exit_info != self.record.last_exit else None,
            ),
            clock=self.sup.clock,
            health=self.sup.health,
            refused=refused,
        )
        self.degraded = None
        return stored

    async def _enrich_exit(
        self, event: ev.ContainerExited, *, always: bool = False
    ) -> ev.ContainerExited:
        """Gather diagnostics for an unexpected exit of the current container while it
        still exists (the crash path removes it): finished-at, OOM, error, log tail."""
        r = self.record
        if not always and (r.container_id != event.container_id or r.expected_exit):
            return event
        be = self.sup.backend
        state_res, tail_res = await asyncio.gather(
            be.status(event.container_id),
            be.logs_tail(event.container_id, lines=LOG_TAIL_LINES),
            return_exceptions=True,
        )
        if isinstance(state_res, errors.DockerUnavailable):
            self.sup.engine_failed(state_res)
            return dataclasses.replace(event, engine_down=True)
        info = event.exit
        if not isinstance(state_res, BaseException) and state_res.exit is not None:
            found = state_res.exit
            info = ExitInfo(
                exit_code=found.exit_code if found.exit_code is not None else info.exit_code,
                oom_killed=found.oom_killed or info.oom_killed,
                error=found.error or info.error,
                finished_at=found.finished_at or info.finished_at,
            )
        tail = "" if isinstance(tail_res, BaseException) else _clip_tail(tail_res)
        return ev.ContainerExited(
            event.container_id,
            ExitInfo(info.exit_code, info.oom_killed, info.error, info.finished_at, tail),
        )

    # -- commands -------------------------------------------------------------------

    def _execute(self, command: cmd.Command) -> None:
        be = self.sup.backend
        match command:
            case cmd.StartContainer(replace=replace):
                if self._start_task is not None:
                    self._start_task.cancel()
                self._attempt += 1
                self._start_task = asyncio.create_task(
                    self._start_procedure(
                        replace, self._attempt, paused_before=self._state_before is S.PAUSED
                    ),
                    name=f"roost.start[{self.name}]",
                )
            case cmd.CancelStart():
                if self._start_task is not None:
                    self._start_task.cancel()
                    self._start_task = None
            case cmd.PauseContainer(container_id=cid):
                self._op(self._pause(cid), "pause", container_id=cid)
            case cmd.StopContainer(container_id=cid, timeout=grace, remove=remove):
                self._op(self._stop(cid, grace, remove), "stop", container_id=cid, holds_port=True)
            case cmd.RemoveContainer(container_id=cid, diagnose=diagnose):
                work = self._diagnose_and_remove(cid) if diagnose else be.remove(cid)
                # A container removed for a crash has exited: its ports are free already.
                self._op(work, "remove", container_id=cid, holds_port=not diagnose)
            case cmd.Notify(kind=kind, payload=payload):
                self._op(self.sup.notifier.notify(kind, payload), "notify", docker=False)

    def _op(
        self,
        work: Awaitable[None],
        what: str,
        *,
        docker: bool = True,
        container_id: str | None = None,
        holds_port: bool = False,
    ) -> None:
        async def tolerant() -> None:
            try:
                await work
            except errors.ContainerNotFound:
                pass  # gone already: what the operation wanted
            except errors.DockerUnavailable as exc:
                self.sup.engine_failed(exc)
            except errors.RoostError as exc:
                log.warning("agent %s: %s failed: %s", self.name, what, exc)

        if docker:
            if self._ops is None:
                self._ops = TaskSet(log)
            owner = self._ops
        else:
            if self._notices is None:
                self._notices = TaskSet(log)
            owner = self._notices
        task = owner.spawn(tolerant(), f"roost.{what}[{self.name}]")
        if container_id is not None:
            if self._op_targets is None:
                self._op_targets = {}
            self._op_targets[task] = container_id
            task.add_done_callback(self._forget_target)
        if holds_port:
            # Its container may still publish the agent's ports until this ends.
            if self._port_holders is None:
                self._port_holders = set()
            self._port_holders.add(task)
            task.add_done_callback(self._port_holders.discard)

    def _forget_target(self, task: asyncio.Task[Any]) -> None:
        if self._op_targets is not None:
            self._op_targets.pop(task, None)

    async def _diagnose_and_remove(self, cid: str) -> None:
        """Read a crashed container's exit details and log tail, report them, remove it."""
        event = await self._enrich_exit(ev.ContainerExited(cid, ExitInfo()), always=True)
        self.post(ev.ExitDetails(cid, event.exit))
        await self.sup.backend.remove(cid)

    async def _pause(self, cid: str) -> None:
        try:
            await self.sup.backend.sleep(cid, mode="pause")
        except errors.ContainerNotFound:
            self.post(ev.ContainerVanished(cid))

    async def _stop(self, cid: str, grace: float, remove: bool) -> None:
        be = self.sup.backend
        # (The backend thaws a paused container first: a frozen process cannot
        # handle SIGTERM.)
        await be.sleep(cid, mode="stop", grace=grace)
        if remove:
            await be.remove(cid)

    async def _quiesce(self, container_id: str | None) -> None:
        """Wait for Docker operations in flight on ``container_id`` (the container a
        start may reuse), so a wake never races a stop of the same container.
        Operations on other containers (removing a crashed one) go on meanwhile."""
        if container_id is None or not self._op_targets:
            return
        pending = [t for t, cid in self._op_targets.items() if cid == container_id]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # -- the start procedure --------------------------------------------------------

    def container_spec(self, token: str | None = None) -> ContainerSpec:
        """The container to create; ``token`` (its ROOST_AGENT_TOKEN) goes into its
        environment only: never into labels, the name or a log line."""
        spec = self.spec
        env = {
            **dict(spec.env),
            "ROOST_AGENT": spec.name,
            "ROOST_AGENT_ID": self.agent_id,
            # The agent listener, when Roost serves one; else the admin URL as before.
            "ROOST_URL": self.sup.agent_url or self.sup.public_url,
        }
        if token is not None:
            env[TOKEN_ENV] = token
        return ContainerSpec(
            image=spec.image,
            labels=labels.agent_labels(self.sup.instance, spec.name, spec.config_hash),
            name=f"roost-{self.sup.instance}-{spec.name}-{secrets.token_hex(3)}",
            env=env,
            command=tuple(spec.command) if spec.command else None,
            port=spec.port,
            publish_host=spec.host_ip or self.sup.publish_host,
            host_port=spec.host_port or None,
            network=(spec.network if isinstance(spec, SpawnedAgent) else "") or self.sup.network,
            memory=spec.memory or None,  # 0: no limit
            cpus=spec.cpus,
            pids_limit=spec.pids_limit or None,
            no_new_privileges=spec.no_new_privileges,
            binds=spec.binds if isinstance(spec, SpawnedAgent) else (),
            # Linux needs this for ROOST_URL's default host.docker.internal to resolve.
            extra_hosts=("host.docker.internal:host-gateway",),
            cap_drop=spec.cap_drop,
            cap_add=spec.cap_add,
            read_only_rootfs=spec.read_only_rootfs,
            tmpfs=("/tmp",) if spec.read_only_rootfs else (),
            user=spec.user,
            private_cgroupns=spec.private_cgroupns,
        )

    def _wired(self, env: tuple[str, ...]) -> bool:
        """Whether a stopped container, started again as it is, would reach Roost: its
        ROOST_URL is the agent listener's now, and it holds the agent's valid token (a
        container made before either changed, e.g. before a new ``server.agent_listen``
        or by a Roost without tokens, would not)."""
        if self.sup.agent_url and f"ROOST_URL={self.sup.agent_url}" not in env:
            return False
        credentials = self.sup.credentials
        if credentials is None:
            return True
        prefix = f"{TOKEN_ENV}="
        tokens = [entry.removeprefix(prefix) for entry in env if entry.startswith(prefix)]
        return bool(tokens) and credentials.verify(tokens[-1]) == self.name

    async def _start_procedure(
        self, replace: str | None, attempt: int, *, paused_before: bool = False
    ) -> None:
        be = self.sup.backend
        cid: str | None = None
        try:
            if replace is not None:
                # The old container is detached already: its removal runs beside us.
                self._op(
                    be.remove(replace),
                    "remove",
                    container_id=replace,
                    holds_port=True,
                )
            cid = self.record.container_id
            await self._quiesce(cid)
            want_hash = self.spec.config_hash
            known = self._known_url
            if paused_before and cid is not None and known is not None and known[0] == cid:
                # Waking what we paused ourselves: unpause (~15 ms) and probe the URL
                # it had, without the two inspects of the careful path below.
                try:
                    await be.wake(cid, paused=True)
                except errors.RoostError:
                    pass  # not paused after all (or gone): take the careful path
                else:
                    if self._resumes_healthy(cid):
                        url = known[1]
                    else:
                        url = await self._wait_ready(cid, known_url=known[1])
                    self.post(ev.BecameHealthy(cid, url))
                    return
            existing = None
            if cid is not None:
                try:
                    existing = await be.status(cid)
                except errors.ContainerNotFound:
                    existing = None
                if existing is not None and existing.labels.get(labels.CONFIG_HASH) != want_hash:
                    log.info("agent %s: spec changed; recreating its container", self.name)
                    await be.remove(cid)
                    existing = None
                if existing is not None and not self._wired(existing.env):
                    log.info(
                        "agent %s: its container's ROOST_URL or token is stale; recreating it",
                        self.name,
                    )
                    await be.remove(cid)
                    existing = None
                if existing is not None and existing.status in ("dead", "removing"):
                    await be.remove(cid)
                    existing = None
            if existing is None:
                if self.spec.host_port and self._port_holders:
                    # A fixed host port is held until the container it was published
                    # for stops: wait for such stops and removals in flight (the old
                    # container of a restart, a liveness or HEALTHCHECK kill).
                    await asyncio.gather(*self._port_holders, return_exceptions=True)
                cid = await self._create_and_run(want_hash, attempt)
                if cid is None:
                    return  # overtaken; the actor removes the container
            elif existing.paused:
                await be.wake(existing.id, paused=True)
            elif not existing.running:
                async with self.sup.start_slots:
                    await be.wake(existing.id, timeout=self.policy.startup_timeout)
            assert cid is not None
            url = await self._wait_ready(cid)
        except asyncio.CancelledError:
            raise
        except errors.ImageUnavailable as exc:
            self._start_failed(cid, str(exc), terminal=True)
            return
        except errors.StartupTimeout as exc:
            self._start_failed(cid, str(exc), tail=exc.log_tail)
            return
        except errors.RoostError as exc:
            # The engine's failure is not the agent's: tell them apart before counting.
            engine_down = isinstance(exc, errors.DockerUnavailable)
            if engine_down:
                self.sup.engine_failed(exc)
            elif isinstance(exc, errors.ContainerError) and not _refused(exc):
                engine_down = await self.sup.engine_unreachable()
            self._start_failed(cid, f"start failed: {exc}", engine_down=engine_down)
            return
        self.post(ev.BecameHealthy(cid, url))

    async def _create_and_run(self, want_hash: str, attempt: int) -> str | None:
        """Create the agent's container, record it, run it; its id, or None when a
        newer start overtook this one (the actor removes the container).

        Only what must come first comes first: the image is not looked up before
        the create (a create refuses an absent image, and only then is it pulled,
        outside the start pool, and the create repeated), and the container's new
        token is stored while the container is created. The container is recorded
        (``ContainerCreated``: intent before action) only once the token's hash is
        durable, and started only once it is recorded."""
        be = self.sup.backend
        credentials = self.sup.credentials
        # A new container, a new token; the replaced container's token stops working
        # once it is stored.
        token = credentials.mint() if credentials is not None else None
        spec = self.container_spec(token)
        storing: asyncio.Task[None] | None = None
        pulled = False
        try:
            while True:
                async with self.sup.start_slots:
                    if credentials is not None and token is not None and storing is None:
                        # Runs once this task waits for Docker's answer to the create.
                        # A full disk holds the start here; it is not the agent's failure.
                        storing = asyncio.create_task(
                            until_written(
                                lambda: credentials.install(self.name, token),
                                clock=self.sup.clock,
                                health=self.sup.health,
                            ),
                            name=f"roost.token[{self.name}]",
                        )
                    try:
                        cid = await be.ensure(spec, placement=self.spec.placement)
                    except errors.ImageUnavailable:
                        if pulled:
                            raise
                    else:
                        if storing is not None:
                            await self._stored_or_removed(storing, cid)
                        await self.submit(ev.ContainerCreated(cid, want_hash), attempt=attempt)
                        if self.record.container_id != cid:
                            return None
                        await be.wake(cid, timeout=self.policy.startup_timeout)
                        return cid
                # The image is absent: pull it outside the start pool (a pull may take
                # minutes), then create again.
                await be.ensure_image(self.spec.image, pull_timeout=self.sup.pull_timeout)
                pulled = True
        finally:
            # Owned and awaited on every way out (a failed create's error is the start's).
            if storing is not None:
                if not storing.done():
                    storing.cancel()  # a start given up: its token is not needed
                    await asyncio.wait([storing])
                if not storing.cancelled():
                    storing.exception()

    async def _stored_or_removed(self, storing: asyncio.Task[None], cid: str) -> None:
        """Wait for the new token's hash to be stored; if it cannot be, the container
        holding that token goes (unrecorded) and the store's error is the start's."""
        try:
            await storing
        except BaseException:
            with contextlib.suppress(errors.RoostError):
                await self.sup.backend.remove(cid)
            raise

    def _start_failed(
        self,
        cid: str | None,
        error: str,
        *,
        terminal: bool = False,
        tail: str = "",
        engine_down: bool = False,
    ) -> None:
        if not engine_down:  # the engine's own notice says it once for every agent
            log.warning("agent %s: %s", self.name, error.splitlines()[0] if error else "")
        self.post(
            ev.StartFailed(
                cid,
                error,
                ExitInfo(error=error, log_tail=tail),
                terminal,
                engine_down=engine_down,
            )
        )

    def _resumes_healthy(self, cid: str) -> bool:
        """Whether a container just unpaused is known healthy without a probe: Roost
        froze it itself while it was healthy (running, its last liveness probe
        passed) and it ran no instruction since, so it is exactly as healthy as it
        was: the knowledge every message to a running agent relies on between two
        liveness probes. A cold start has no such knowledge and polls readiness.
        Push mode only: a WebSocket agent must still be connected (its wait stays),
        and a pull agent needs nothing."""
        return self.spec.delivery == "push" and self._paused_healthy == cid

    async def _wait_ready(self, cid: str, *, known_url: str | None = None) -> str:
        """Wait until the agent is ready; its URL. Push mode: poll the health path over
        HTTP at millisecond granularity until it answers 200. Pull mode: the container
        runs (the agent needs no HTTP server). WebSocket mode: it runs and the agent
        has connected within ``connect_timeout``."""
        be = self.sup.backend
        clock = self.sup.clock
        deadline = clock.monotonic() + self.policy.startup_timeout
        direct: str | None = None  # the container's own address (roost.reactor.addressing)
        if known_url is not None:
            url = known_url
        else:
            endpoint = await be.endpoint(cid)
            if endpoint is None:
                raise errors.ContainerError(
                    f"agent {self.name!r}: container {cid[:12]} publishes no port {self.spec.port}"
                )
            url = endpoint.url
            direct = container_url(endpoint.own_ip, self.spec.port)
        if self.spec.delivery == "pull":
            return url
        if self.spec.delivery == "websocket":
            await self._wait_connected(cid)
            return url
        last = ""
        polls = 0
        while True:
            result = await self.sup.addresses.probe_ready(
                self.name,
                cid,
                url,
                direct,
                self.spec.health_path,
                timeout=READINESS_PROBE_TIMEOUT,
            )
            if result.ok:
                return url
            last = result.detail
            polls += 1
            if polls % 100 == 0:
                # Rarely, check that it is still alive (the die event also tells us).
                state = await be.status(cid)
                if not state.running:
                    raise errors.ContainerError(
                        f"agent {self.name!r}: container exited during startup"
                    )
            if clock.monotonic() >= deadline:
                tail = ""
                with contextlib.suppress(errors.RoostError):
                    tail = await be.logs_tail(cid, lines=LOG_TAIL_LINES)
                raise errors.StartupTimeout(
                    f"agent {self.name!r} did not answer GET {self.spec.health_path} with 200 "
                    f"within {self.policy.startup_timeout:g}s (last: {last or 'no answer'})"
                    + (f"; log tail:\n{tail}" if tail else ""),
                    log_tail=tail,
                )
            await clock.sleep(READINESS_POLL_INTERVAL)

    async def _wait_connected(self, cid: str) -> None:
        """WebSocket mode: the agent connects within ``connect_timeout``, or its start
        failed (StartupTimeout with the log tail: backoff, max_restarts, the alert)."""
        channels = self.sup.channels
        timeout = self.spec.connect_timeout
        if channels is not None and await channels.wait_connected(self.name, timeout):
            return
        tail = ""
        with contextlib.suppress(errors.RoostError):
            tail = await self.sup.backend.logs_tail(cid, lines=LOG_TAIL_LINES)
        raise errors.StartupTimeout(
            f"agent {self.name!r} did not connect to GET /api/agents/{self.name}/ws within "
            f"{timeout:g}s (connect_timeout)" + (f"; log tail:\n{tail}" if tail else ""),
            log_tail=tail,
        )

    # -- timers and liveness ----------------------------------------------------------

    def _reschedule(self) -> None:
        deadline = next_deadline(self.record, self.policy)
        if deadline != self._timer_at:
            self.sup._timers.schedule(self, deadline)

    def _timer_fired(self) -> None:
        self.post(ev.Tick(busy=self.is_busy))

    def _manage_liveness(self) -> None:
        """Keep this agent in (or out of) the supervisor's batched liveness probing."""
        # A pull agent serves no health check: its polls are its signs of life.
        live = (
            self.record.state in ACTIVE_STATES
            and self.policy.liveness_interval > 0
            and self.spec.delivery != "pull"
        )
        cid, url = self.record.container_id, self.record.url
        if live and cid is not None and url is not None:
            if self._probe_target is None or self._probe_target[0] != cid:
                self._probe_target = (cid, url)
                self.next_probe_at = self.sup.clock.monotonic() + self.policy.liveness_interval
                self.sup._probing.add(self)
                self.sup._liveness_wanted(self.next_probe_at)
        else:
            self._stop_probing()

    def _stop_probing(self) -> None:
        if self._probe_target is not None:
            self._probe_target = None
            self.sup._probing.discard(self)

    @property
    def probing(self) -> bool:
        return self._probe_target is not None and not self.closed

    async def probe_liveness(self) -> None:
        """One liveness probe; only failures (and the recovery after one) are posted."""
        target = self._probe_target
        if target is None:
            return
        cid, url = target
        interval = self.policy.liveness_interval
        self.next_probe_at = self.sup.clock.monotonic() + interval
        if self.spec.delivery == "websocket":
            # Alive means connected: a container that runs but lost its WebSocket for
            # liveness_failures probes in a row is restarted.
            connected = self.sup.channels is not None and self.sup.channels.connected(self.name)
            result = ProbeResult(connected, None, "" if connected else "WebSocket not connected")
        else:
            result = await self.sup.agent_client.probe(
                url + self.spec.health_path, timeout=max(0.05, min(interval, 5.0))
            )
        if result.ok and not self.record.liveness_failures:
            return
        if not result.ok and (
            self.sup.health.holds("engine") or await self.sup.engine_unreachable()
        ):
            # Probes reach the agent through the engine's port proxy, which goes down
            # with the engine even when the container runs on (live-restore): not
            # the agent's failure. The reconcile after the outage finds real exits.
            return
        if self.record.container_id == cid:
            self.post(ev.LivenessProbed(cid, result.ok, result.detail))


class _TimerHeap:
    """Every actor's next timer deadline (idle, pause, restart backoff, start
    timeout) in one heap, served by one task, instead of a sleeping task per agent
    (~1.5 KiB each, thousands at once).

    An entry is (deadline, number, actor); the actor remembers its live entry's
    number (``_timer_seq``), so scheduling again or cancelling makes the older entry
    stale: skipped when it comes up, and swept out once stale entries outnumber the
    live ones (an agent in use reschedules at most once a second). The task sleeps
    until the earliest deadline on the clock; an earlier one arriving restarts it.
    Due entries post a ``Tick`` to their actor, as the per-agent timers did."""

    #: Stale entries tolerated before a sweep (and only when they are the majority).
    SWEEP_AT = 64

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, AgentActor]] = []
        self._numbers = itertools.count(1)
        self._stale = 0
        self._task: asyncio.Task[None] | None = None
        #: the deadline the task sleeps toward (None: not sleeping).
        self._wake_at: float | None = None
        self._closed = False

    def schedule(self, actor: AgentActor, deadline: float | None) -> None:
        """Make ``deadline`` the actor's one timer (None: it has none)."""
        if actor._timer_seq:
            self._stale += 1
        actor._timer_at = deadline
        if deadline is None or self._closed:
            actor._timer_seq = 0
            return
        number = next(self._numbers)
        actor._timer_seq = number
        heapq.heappush(self._heap, (deadline, number, actor))
        if self._stale > self.SWEEP_AT and self._stale * 2 > len(self._heap):
            self._heap[:] = [e for e in self._heap if e[2]._timer_seq == e[1]]
            heapq.heapify(self._heap)
            self._stale = 0
        task = self._task
        if task is not None and not task.done():
            if self._wake_at is None or self._wake_at <= deadline:
                return  # firing now, or waking early enough anyway
            task.cancel()  # asleep past the new deadline: restart it
        self._task = asyncio.create_task(self._run(), name="roost.timers")

    def cancel(self, actor: AgentActor) -> None:
        self.schedule(actor, None)

    async def _run(self) -> None:
        heap = self._heap
        while heap:
            deadline, number, actor = heap[0]
            if actor._timer_seq != number:
                heapq.heappop(heap)
                self._stale -= 1
                continue
            delay = deadline - self._clock.now()
            if delay > 0:
                self._wake_at = deadline
                try:
                    await self._clock.sleep(delay)
                finally:
                    self._wake_at = None
                continue
            heapq.heappop(heap)
            actor._timer_seq = 0
            actor._timer_at = None
            actor._timer_fired()

    async def close(self) -> None:
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._heap.clear()
        self._stale = 0


class Supervisor:
    """All agent actors, plus the Docker event watcher and the reconciler."""

    def __init__(
        self,
        *,
        store: Store,
        backend: AgentBackend,
        notifier: Notifier,
        clock: Clock,
        agent_client: AgentClient,
        instance: str,
        health: Health,
        public_url: str = "",
        credentials: Credentials | None = None,
        channels: Channels | None = None,
        publish_host: str = "127.0.0.1",
        network: str | None = None,
        pull_timeout: float = 300.0,
        max_concurrent_starts: int,
    ) -> None:
        self.store = store
        #: the start pool (``docker.max_concurrent_starts``): Docker tops out near
        #: 7 starts/s on 2 cores and more concurrency only queues inside dockerd; a
        #: pool of 3-4 keeps throughput and cuts latency.
        self.start_slots = asyncio.Semaphore(max_concurrent_starts)
        #: what runs the agents (one engine's containers, or a swarm's services).
        self.backend = backend
        self.notifier = notifier
        self.clock = clock
        self.agent_client = agent_client
        self.instance = instance
        self.public_url = public_url
        #: the agent listener's URL as containers see it (their ROOST_URL); set by
        #: the front end that serves it (``roost.serving``), else public_url is used.
        self.agent_url = ""
        #: per-container agent tokens (None: containers get none).
        self.credentials = credentials
        #: WebSocket agents' connections (readiness and liveness in that mode).
        self.channels = channels
        self.publish_host = publish_host
        self.network = network
        self.pull_timeout = pull_timeout
        self.actors: dict[str, AgentActor] = {}
        #: containers' own addresses where they answer (Roost's own requests go there).
        self.addresses = Addresses(agent_client)
        self._listeners: list[StateListener] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._reconcile_lock = asyncio.Lock()
        self._liveness_task: asyncio.Task[None] | None = None
        #: the actors with a liveness probe target (the liveness loop looks at these).
        self._probing: set[AgentActor] = set()
        #: every actor's next timer deadline, served by one task.
        self._timers = _TimerHeap(clock)
        #: when the liveness loop's current sleep ends (None: not sleeping).
        self._liveness_wake_at: float | None = None
        self._tasks = TaskSet(log)
        self._oom_seen: set[str] = set()
        #: Roost's own conditions (engine unreachable, store failing).
        self.health = health
        #: the latest exit seen per agent: (monotonic time, container, restart count before).
        self._recent_exits: dict[str, tuple[float, str, int]] = {}
        self._recovery: asyncio.Task[None] | None = None
        #: a background ping after an unexpected exit (one at a time).
        self._engine_check: asyncio.Task[bool | None] | None = None
        self.reconciles = 0
        self.closed = False

    # -- agents -------------------------------------------------------------------

    def add_actor(
        self, record: AgentRecord, spec: ResolvedAgent, *, agent_id: str = ""
    ) -> AgentActor:
        actor = AgentActor(self, record, spec, agent_id or record.name)
        self.actors[record.name] = actor
        return actor

    def actor(self, name: str) -> AgentActor:
        try:
            return self.actors[name]
        except KeyError:
            raise errors.NotFound(f"no agent named {name!r}") from None

    async def remove_actor(self, name: str) -> None:
        actor = self.actors.pop(name, None)
        self.addresses.forget(name)
        if actor is not None:
            await actor.close()

    def get(self, name: str) -> AgentRecord:
        return self.actor(name).record

    def records(self) -> list[AgentRecord]:
        return [a.record for a in self.actors.values()]

    async def request(self, name: str, event: ev.Event) -> AgentRecord:
        decision = await self.actor(name).submit(event)
        if decision.rejected is not None:
            raise errors.StateError(decision.rejected)
        return decision.record

    async def ensure_running(
        self, name: str, *, timeout: float, reason: str = "wake", fail_fast: bool = False
    ) -> AgentRecord:
        """Wake the agent if needed and wait until it answers its health check.

        ``fail_fast``: raise on the first failed start attempt (library semantics)
        instead of waiting through restarts until ``timeout``.
        """
        actor = self.actor(name)
        if actor.record.awake:
            actor.touch()
            return actor.record
        failures_before = actor.start_failures
        await self.request(name, ev.StartRequested(reason))

        def settled(r: AgentRecord) -> bool:
            if r.awake:
                return True
            if r.state in (S.FAILED, S.STOPPED, S.PAUSED):
                return True
            return fail_fast and (
                actor.start_failures > failures_before or r.state in (S.CRASHED, S.RESTARTING)
            )

        await actor.wait_for(settled, timeout)
        r = actor.record
        if r.awake:
            return r
        detail = r.last_error or (r.last_exit and r.last_exit.error) or ""
        tail = r.last_exit.log_tail if r.last_exit else ""
        if r.state in (S.STARTING, S.RESTARTING, S.CRASHED) and not fail_fast:
            raise errors.StartupTimeout(
                f"agent {name!r} is still {r.state.value} after {timeout:g}s"
                + (f": {detail}" if detail else ""),
                log_tail=tail,
            )
        raise errors.ContainerError(
            f"agent {name!r} did not become healthy: {r.state.value}"
            + (f": {detail}" if detail else ""),
            log_tail=tail,
        )

    # -- liveness -------------------------------------------------------------------

    def _liveness_wanted(self, at: float) -> None:
        """An agent's first probe is due at ``at``: make sure the loop wakes by then."""
        if self.closed:
            return
        task = self._liveness_task
        if task is not None and not task.done():
            if self._liveness_wake_at is None or self._liveness_wake_at <= at:
                return  # probing now, or waking early enough anyway
            task.cancel()  # asleep past the new deadline: restart it
        self._liveness_task = asyncio.create_task(self._liveness_loop(), name="roost.liveness")

    async def _liveness_loop(self) -> None:
        """Probe every running agent each ``liveness_interval``, in batches.

        Measured here: spread out, one probe at a time, a probe costs ~1 ms of CPU
        (cold caches, one wake-up per probe), which put 200 idle agents at 2.3 %
        CPU; probed together once a second the same probes cost ~0.3 ms each. So
        agents due within the next ``LIVENESS_BATCH_WINDOW`` (at most a quarter of
        their interval) are probed early, together.
        """
        while True:
            now = self.clock.monotonic()
            probing = self._probing
            if not probing:
                self._liveness_wake_at = None
                return
            due = [
                a
                for a in probing
                if a.next_probe_at
                <= now + min(LIVENESS_BATCH_WINDOW, a.policy.liveness_interval / 4)
            ]
            if due:
                self._liveness_wake_at = None
                await asyncio.gather(*(a.probe_liveness() for a in due), return_exceptions=True)
                continue
            wake_at = min(a.next_probe_at for a in probing)
            self._liveness_wake_at = wake_at
            await self.clock.sleep(wake_at - now)

    # -- observers ------------------------------------------------------------------

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def _publish(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        for listener in self._listeners:
            try:
                listener(record, changes)
            except Exception:
                log.exception("state listener failed")

    # -- Docker events and reconcile ----------------------------------------------------

    def start_watching(self) -> None:
        # Subscribe now, before the reconcile lists containers: DockerRuntime asks
        # for events since this call, so nothing between the two is lost.
        events = self.backend.observe(labels.ownership(self.instance))
        self._watch_task = asyncio.create_task(self._watch(events), name="roost.events")

    async def _watch(self, events: AsyncIterator[RuntimeEvent]) -> None:
        async for event in events:
            if event.kind == "lost":
                # The stream broke: the engine may be going away. Ask it now.
                self._check_engine_soon()
                continue
            if event.kind == "gap":
                if self.health.holds("engine"):
                    continue  # the recovery reconciles once the engine answers pings
                log.info("docker event stream had a gap; reconciling")
                self._spawn_reconcile()
                continue
            self._dispatch(event)

    # -- the engine's bad days ------------------------------------------------------------

    def engine_failed(self, exc: BaseException) -> None:
        """The engine did not answer: mark it down (once) and wait for it to return."""
        if self.closed or not self.health.fail("engine", str(exc) or type(exc).__name__):
            return
        now = self.clock.monotonic()
        for name, (seen_at, cid, restarts_before) in list(self._recent_exits.items()):
            actor = self.actors.get(name)
            if actor is not None and now - seen_at <= ENGINE_EXIT_WINDOW:
                actor.post(ev.ExitBlamedOnEngine(cid, restarts_before))
        self._recent_exits.clear()
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="roost.engine-recovery")

    def _check_engine_soon(self) -> None:
        """Ping the engine in the background, unless a check is under way already."""
        check = self._engine_check
        if self.closed or (check is not None and not check.done()):
            return
        self._engine_check = self._tasks.spawn(self.engine_unreachable(), "roost.engine-check")

    async def engine_unreachable(self) -> bool:
        """Ping the engine now; True (and marked down) when it does not answer."""
        try:
            await self.backend.ping()
        except errors.DockerUnavailable as exc:
            self.engine_failed(exc)
            return True
        except errors.RoostError:
            return False
        return False

    async def _recover(self) -> None:
        """Ping until the engine answers, then reconcile and release waiting starts.
        An engine gone again during that reconcile (marked down by it, or by this)
        starts it over: this task is the one recovery, so it must not end meanwhile."""
        while True:
            failures = 0
            while not self.closed:
                try:
                    await self.backend.ping()
                    break
                except errors.RoostError:
                    await self.clock.sleep(ENGINE_PING.delay(failures) or 0.0)
                    failures += 1
            if self.closed:
                return
            self.health.clear("engine")
            try:
                await self.reconcile(after_outage=True)
            except errors.DockerUnavailable as exc:
                self.engine_failed(exc)  # gone again already: start over
                continue
            except errors.RoostError as exc:
                # Whatever the engine refused, the waiting starts must not wait forever:
                # the next reconcile (after an event gap, or the next start) tries again.
                log.warning("reconcile after the engine came back failed: %s", exc)
            if not self.health.holds("engine"):
                break
        for actor in list(self.actors.values()):
            actor.post(ev.EngineRecovered())

    def _dispatch(self, event: RuntimeEvent) -> None:
        kind, cid = event.kind, event.container_id
        name = event.labels.get(labels.AGENT)
        if name is None or name not in self.actors:
            return  # job containers carry our labels too: the job runner watches those
        if kind == "oom":
            self._oom_seen.add(cid)  # Docker sends oom just before the die it causes
            return
        actor = self.actors[name]
        if kind == "die":
            oom = cid in self._oom_seen
            self._oom_seen.discard(cid)
            # An exit while the engine is known to be down comes from a daemon that is
            # stopping its containers (it still streams events on the open connection).
            down = self.health.holds("engine")
            check: Callable[[], None] | None = None
            if cid == actor.record.container_id and not actor.record.expected_exit:
                # Kept in case the engine turns out to be going down: then this exit
                # was its doing, and the restart it costs is given back.
                self._recent_exits[name] = (
                    self.clock.monotonic(),
                    cid,
                    actor.record.restart_count,
                )
                if not down:
                    # A stopping dockerd stops every container after it stopped taking
                    # connections (and still serves the open ones, starts included):
                    # ask it on a new connection. Once the exit is handled: the ping
                    # costs ~1.5 ms of this loop, which the restart's create must not
                    # wait for. Found down, the exit is blamed on it whenever the
                    # answer comes (ExitBlamedOnEngine cancels a start under way and
                    # lets its container go; the reconcile after the outage removes it).
                    check = self._check_engine_soon
            exit_info = ExitInfo(exit_code=event.exit_code, oom_killed=oom)
            actor.post(ev.ContainerExited(cid, exit_info, engine_down=down), after=check)
        elif kind == "destroy":
            actor.post(ev.ContainerVanished(cid))
        elif kind == "health_status" and event.health in _VERDICTS:
            # The verdict of the image's own HEALTHCHECK (no image has one: no event).
            actor.post(ev.HealthcheckReported(cid, healthy=event.health is SessionHealth.HEALTHY))
        elif kind == "node_lost":
            # The node under it went down (a swarm): not the agent's crash.
            log.warning("agent %s: node %s went down under %s", name, event.node or "?", cid[:12])
            actor.post(ev.NodeLost(cid, event.node))

    def _spawn_reconcile(self) -> None:
        self._tasks.spawn(self.reconcile(), "roost.reconcile (after an event-stream gap)")

    async def reconcile(self, *, after_outage: bool = False) -> None:
        """Re-list this instance's containers and reconcile both ways (pure plan).

        ``after_outage``: the engine just came back; exits and disappearances found
        now happened while it was away, so they restart without counting."""
        async with self._reconcile_lock:
            self.reconciles += 1
            try:
                containers = await self.backend.list(labels.ownership(self.instance))
            except errors.DockerUnavailable as exc:
                self.engine_failed(exc)
                if after_outage:
                    raise
                return
            observed: list[Observed] = []
            for c in containers:
                exit_info = None
                if c.status in ("exited", "dead"):
                    try:
                        exit_info = (await self.backend.status(c.id)).exit
                    except errors.DockerUnavailable:
                        raise
                    except errors.RoostError as exc:  # gone, or refused: decide without it
                        log.debug("reconcile: cannot inspect %s: %s", c.id[:12], exc)
                observed.append(Observed(c.id, c.labels, c.status, exit_info))
            plan = plan_reconcile(
                {n: a.record for n, a in self.actors.items()},
                observed,
                instance=self.instance,
                after_outage=after_outage,
            )
            # A start in flight owns its agent (e.g. a reconcile after an event gap):
            # the container it created but has not reported yet is no orphan, and
            # resuming or re-observing would start a second one.
            in_flight = {n for n, a in self.actors.items() if a.start_in_flight}
            owner = {c.id: c.labels.get(labels.AGENT) for c in containers}
            for cid in plan.orphans:
                if owner.get(cid) in in_flight:
                    continue
                log.info("removing orphan container %s", cid[:12])
                try:
                    await self.backend.remove(cid)
                except errors.ContainerNotFound:
                    pass  # gone already: what we wanted
                except errors.DockerUnavailable as exc:
                    self.engine_failed(exc)
                    if after_outage:
                        raise
                    return
                except errors.RoostError as exc:
                    # One container the engine will not remove (seen after a daemon
                    # restart) must not stop the reconcile; the next one tries again.
                    log.warning("cannot remove orphan container %s: %s", cid[:12], exc)
            waits = []
            for name, event in plan.events:
                if name in in_flight and isinstance(event, ev.Resumed | ev.ContainerObserved):
                    continue
                waits.append(self.actors[name].submit(event))
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)
            # Records that got no event (e.g. restored mid-backoff, with no
            # container) still need their timers.
            for actor in self.actors.values():
                if not actor.closed:
                    actor._reschedule()

    # -- shutdown -------------------------------------------------------------------

    async def shutdown(self, *, leave_running: bool, remove: bool = False) -> None:
        """Two phases: tell every agent (stop or leave running), then close actors.
        ``remove``: also remove every agent container of this instance (library
        ``stop_all``): the recorded ones, and any a start cut short by the shutdown
        created but had not recorded yet."""
        if self.closed:
            return
        self.closed = True
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        await self._tasks.join()
        if self._liveness_task is not None:
            self._liveness_task.cancel()
            await asyncio.gather(self._liveness_task, return_exceptions=True)
        await self._timers.close()
        await asyncio.gather(
            *(
                a.submit(ev.ShutdownRequested(leave_running=leave_running))
                for a in self.actors.values()
            ),
            return_exceptions=True,
        )
        await asyncio.gather(*(a.close() for a in self.actors.values()), return_exceptions=True)
        await self.addresses.close()
        if remove and not leave_running:
            ids = {a.record.container_id for a in self.actors.values() if a.record.container_id}
            try:
                found = await self.backend.list(labels.ownership(self.instance))
            except errors.RoostError as exc:
                log.warning("cannot list containers to remove at shutdown: %s", exc)
                found = []
            # Job containers carry the instance label too: the job runner owns those.
            ids |= {c.id for c in found if labels.AGENT in c.labels}
            await asyncio.gather(
                *(self.backend.remove(cid) for cid in sorted(ids)),
                return_exceptions=True,
            )


def _healthy_container(record: AgentRecord) -> str | None:
    """The record's container if it was running healthy (no liveness probe failed
    since the last that passed), else None."""
    if record.state in (S.RUNNING, S.IDLE) and record.liveness_failures == 0:
        return record.container_id
    return None


def _clip_tail(text: str) -> str:
    """The end of a log tail, at most ``LOG_TAIL_BYTES`` of it (whole lines)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= LOG_TAIL_BYTES:
        return text
    clipped = data[-LOG_TAIL_BYTES:].decode("utf-8", "ignore")
    return clipped.split("\n", 1)[1] if "\n" in clipped else clipped


def _refused(exc: errors.ContainerError) -> bool:
    """Docker refused the request itself (4xx): the engine is there."""
    return exc.status is not None and 400 <= exc.status < 500


def _gives_up(decision: Decision) -> bool:
    return any(isinstance(c, cmd.Notify) and c.kind == "agent.failed" for c in decision.commands)

"""Property tests for ``roost.core.transition``: random event sequences on fake time.

A Hypothesis state machine feeds one agent record random requests, start-procedure
reports, Docker observations, liveness probes and timer ticks, with a fake ``now``
that only moves forward, and checks after every step the invariants the reactor
relies on:

- an exit Roost caused (stop, idle stop, shutdown, restart, liveness kill, a
  removed container) is never a crash, and an exit while paused never is either;
- ``failed`` is entered only with ``restart_count == max_restarts`` (or on a
  terminal start failure), with exactly one ``agent.failed`` notification, and
  nothing but ``reset`` leaves it;
- after a stop or pause by request nothing starts the agent again and no restart
  is scheduled until a start/wake/restart request;
- ``restart_count`` never exceeds ``max_restarts``; backoff delays follow
  ``restart_delay``, are capped and never shrink within one crash loop;
- ``Decision.changes`` chain from the input state to the output state;
- events about a container that does not back the agent change nothing;
- ``next_deadline`` never precedes the time its timer counts from, and a
  ``Tick`` changes the state exactly when that deadline has come;
- on a backend without pause (``without_pause``) no command ever pauses;
- a node lost under the agent (``NodeLost``) is no crash: it never uses up a
  restart, never fails the agent, and only it sends ``agent.moved``.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from roost.config import LifecycleSettings as Policy
from roost.core import commands as cmd
from roost.core import events as ev
from roost.core.backoff import restart_delay
from roost.core.policy import Policy as CorePolicy
from roost.core.policy import without_pause
from roost.core.records import AgentRecord, ExitInfo
from roost.core.states import AgentState
from roost.core.transition import Decision, next_deadline, transition

S = AgentState

START = 1_000_000.0  # as FakeClock: fractional steps from here round

policies = st.builds(
    Policy,
    idle_timeout=st.sampled_from([0.0, 0.7, 45.0, 300.0, 1800.0]),
    idle_action=st.sampled_from(["pause", "stop"]),
    pause_after=st.sampled_from([0.0, 0.2, 20.0, 120.0, 600.0]),
    idle_mark_after=st.sampled_from([0.1, 5.0, 30.0, 200.0]),
    max_restarts=st.integers(min_value=0, max_value=4),
    restart_backoff=st.sampled_from([0.0, 1.0, 10.0, 50.0]),
    restart_backoff_max=st.sampled_from([5.0, 30.0, 300.0]),
    restart_reset_after=st.sampled_from([60.0, 600.0]),
    stop_timeout=st.just(10.0),
    liveness_failures=st.integers(min_value=1, max_value=3),
)

exits = st.builds(
    ExitInfo,
    exit_code=st.sampled_from([None, 0, 1, 137, 143]),
    oom_killed=st.booleans(),
    error=st.sampled_from(["", "boom"]),
    log_tail=st.sampled_from(["", "last line"]),
)

#: which container an observation is about (mostly the one backing the agent).
targets = st.sampled_from(["current", "current", "current", "stale"])

requests = st.one_of(
    st.builds(ev.StartRequested, st.sampled_from(["start", "wake", "message"])),
    st.builds(ev.StopRequested),
    st.builds(ev.PauseRequested),
    st.builds(ev.RestartRequested),
    st.builds(ev.ResetRequested),
    st.builds(ev.ShutdownRequested, leave_running=st.booleans()),
    st.builds(ev.Activity),
    st.builds(ev.Tick, busy=st.booleans()),
)

time_steps = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=5.0),
    st.floats(min_value=0.0, max_value=900.0),
)

_CONTAINER_EVENTS = (
    ev.BecameHealthy,
    ev.ContainerExited,
    ev.ContainerVanished,
    ev.ContainerObserved,
    ev.LivenessProbed,
    ev.HealthcheckReported,
    ev.StartFailed,
    ev.NodeLost,
)


def _container_of(event: ev.Event) -> str | None:
    if isinstance(event, _CONTAINER_EVENTS):
        return event.container_id
    return None


def _exit_of(event: ev.Event, before: AgentRecord) -> str | None:
    """The container whose exit this event reports, if it reports one."""
    if isinstance(event, ev.ContainerExited):
        return event.container_id
    if not isinstance(event, ev.ContainerObserved):
        return None
    # "created" while starting is a start cut short; anywhere else, a dead container
    dead = ("exited", "dead") if before.state is S.STARTING else ("exited", "dead", "created")
    return event.container_id if event.status in dead else None


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.policy: CorePolicy = Policy()
        self.now = START
        self.record = AgentRecord(name="echo", state_since=START)
        self.ids = itertools.count(1)
        #: every container that has backed the agent, oldest first.
        self.backed: list[str] = []
        #: Roost asked these containers to stop or removed them: their next exit is Roost's.
        self.exit_owed: set[str] = set()
        #: stopped or paused by request, and no start/wake/restart request since.
        self.asleep_by_request = False
        #: (restart_count, delay) of the last backoff in the current crash loop.
        self.last_backoff: tuple[int, float] | None = None

    @initialize(policy=policies, can_pause=st.booleans())
    def choose_policy(self, policy: Policy, can_pause: bool) -> None:
        self.policy = policy if can_pause else without_pause(policy)

    # -- rules ---------------------------------------------------------------------

    @rule(seconds=time_steps)
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(event=requests)
    def request(self, event: ev.Event) -> None:
        self.step(event)

    @rule(first=requests, second=requests)
    def requests_queued_back_to_back(self, first: ev.Event, second: ev.Event) -> None:
        """Two requests with no Docker event between them, e.g. a wake queued
        while a stop was being carried out (its ``die`` event still to come)."""
        self.step(first)
        self.step(second)

    @rule(
        request=st.sampled_from(
            [ev.StopRequested(), ev.ShutdownRequested(), ev.RestartRequested(), ev.PauseRequested()]
        ),
        wake=st.booleans(),
        exit_info=exits,
    )
    def roost_caused_exit_arrives_late(
        self, request: ev.Event, wake: bool, exit_info: ExitInfo
    ) -> None:
        """The race the reactor really has: Roost stops (or detaches, or pauses) the
        container, maybe a wake is handled, then the old container's ``die`` arrives."""
        old = self.record.container_id
        self.step(request)
        if wake and not isinstance(request, ev.PauseRequested):
            self.step(ev.StartRequested("wake"))
        if old is not None:
            self.step(ev.ContainerExited(old, exit_info))  # checked: never a crash

    @rule()
    def bring_up(self) -> None:
        """A start that goes well: the shortest way to a running agent."""
        self.step(ev.StartRequested())
        self.step(ev.ContainerCreated(self.fresh_id(), "h1"))
        self.step(ev.BecameHealthy(self.pick("current"), "http://127.0.0.1:40000"))

    @precondition(lambda self: next_deadline(self.record, self.policy) is not None)
    @rule()
    def timer_fires(self) -> None:
        deadline = next_deadline(self.record, self.policy)
        assert deadline is not None
        self.now = max(self.now, deadline)
        self.step(ev.Tick())

    @rule(config_hash=st.sampled_from(["", "h1", "h2"]))
    def container_created(self, config_hash: str) -> None:
        self.step(ev.ContainerCreated(self.fresh_id(), config_hash))

    @rule(which=targets)
    def became_healthy(self, which: str) -> None:
        self.step(ev.BecameHealthy(self.pick(which), "http://127.0.0.1:40000"))

    @rule(
        which=st.sampled_from(["current", "stale", "none"]),
        exit_info=st.none() | exits,
        terminal=st.booleans(),
    )
    def start_failed(self, which: str, exit_info: ExitInfo | None, terminal: bool) -> None:
        container = None if which == "none" else self.pick(which)
        self.step(ev.StartFailed(container, "start failed", exit_info, terminal))

    @rule(which=st.sampled_from(["current", "stale", "none"]))
    def start_failed_engine_down(self, which: str) -> None:
        container = None if which == "none" else self.pick(which)
        self.step(ev.StartFailed(container, "Docker unreachable", engine_down=True))

    @rule(which=targets, exit_info=exits, engine_down=st.booleans())
    def container_exited(self, which: str, exit_info: ExitInfo, engine_down: bool) -> None:
        self.step(ev.ContainerExited(self.pick(which), exit_info, engine_down))

    @rule(which=targets, after_outage=st.booleans())
    def container_vanished(self, which: str, after_outage: bool) -> None:
        self.step(ev.ContainerVanished(self.pick(which), after_outage))

    @rule(
        which=targets,
        status=st.sampled_from(["running", "paused", "exited", "dead", "created"]),
        exit_info=st.none() | exits,
        after_outage=st.booleans(),
    )
    def container_observed(
        self, which: str, status: str, exit_info: ExitInfo | None, after_outage: bool
    ) -> None:
        self.step(ev.ContainerObserved(self.pick(which), status, exit_info, after_outage))

    @rule()
    def engine_recovered(self) -> None:
        self.step(ev.EngineRecovered())

    @rule(which=targets, restarts=st.integers(min_value=0, max_value=4))
    def exit_blamed_on_engine(self, which: str, restarts: int) -> None:
        budget = min(restarts, self.policy.max_restarts)  # the count it had before the exit
        self.step(ev.ExitBlamedOnEngine(self.pick(which), budget))

    @rule(which=targets, node=st.sampled_from(["", "198.19.0.12"]))
    def node_lost(self, which: str, node: str) -> None:
        self.step(ev.NodeLost(self.pick(which), node))

    @rule()
    def resumed(self) -> None:
        self.step(ev.Resumed())

    @rule(which=targets, ok=st.booleans())
    def liveness_probed(self, which: str, ok: bool) -> None:
        self.step(ev.LivenessProbed(self.pick(which), ok, "" if ok else "HTTP 503"))

    @rule(which=targets, healthy=st.booleans())
    def healthcheck_reported(self, which: str, healthy: bool) -> None:
        self.step(ev.HealthcheckReported(self.pick(which), healthy))

    # -- helpers -------------------------------------------------------------------

    def fresh_id(self) -> str:
        return f"c{next(self.ids)}"

    def pick(self, which: str) -> str:
        current = self.record.container_id
        if which == "current" and current is not None:
            return current
        # stale: the latest container that once backed the agent, else a stranger
        old = [cid for cid in self.backed if cid != current]
        return old[-1] if old else self.fresh_id()

    def step(self, event: ev.Event) -> None:
        before = self.record
        decision = transition(before, event, now=self.now, policy=self.policy)
        self.check_decision(before, event, decision)
        self.record = decision.record
        if self.record.container_id is not None and self.record.container_id not in self.backed:
            self.backed.append(self.record.container_id)

    # -- per-step properties ---------------------------------------------------------

    def check_decision(self, before: AgentRecord, event: ev.Event, decision: Decision) -> None:
        after = decision.record
        entered = [c.to_state for c in decision.changes]

        # Changes chain from the input state to the output state, stamped now.
        state = before.state
        for change in decision.changes:
            assert change.from_state is state
            assert change.from_state is not change.to_state
            assert change.at == self.now
            state = change.to_state
        assert state is after.state
        if decision.changes:
            assert after.state_since == self.now

        # Events about a container that does not back the agent change nothing.
        container = _container_of(event)
        if container is not None and container != before.container_id:
            assert decision == Decision(before)

        # An exit Roost caused is never a crash; neither is an exit while paused.
        exited = _exit_of(event, before)
        if exited is not None:
            if exited in self.exit_owed or before.state is S.PAUSED:
                assert S.CRASHED not in entered, (event, before)
            self.exit_owed.discard(exited)
        if isinstance(event, ev.ContainerVanished):
            self.exit_owed.discard(event.container_id)
        for command in decision.commands:
            match command:
                case cmd.StopContainer(container_id=cid) | cmd.RemoveContainer(container_id=cid):
                    self.exit_owed.add(cid)
                case cmd.StartContainer(replace=str() as cid):
                    self.exit_owed.add(cid)

        # No pause where the backend has none.
        if not self.policy.can_pause:
            assert not any(isinstance(c, cmd.PauseContainer) for c in decision.commands)
            assert S.PAUSED not in entered

        # A lost node is not the agent's crash: nothing counted, nothing failed.
        moved = [c for c in decision.commands if isinstance(c, cmd.Notify)]
        moved = [c for c in moved if c.kind == "agent.moved"]
        if isinstance(event, ev.NodeLost):
            assert after.restart_count == before.restart_count
            assert S.CRASHED not in entered
            assert S.FAILED not in entered
            if moved:
                [notice] = moved
                assert notice.payload["agent"] == before.name
                assert any(isinstance(c, cmd.StartContainer) for c in decision.commands)
        else:
            assert moved == []

        # failed: only with the restart budget spent (or nothing to retry), one notice.
        notices = [c for c in decision.commands if isinstance(c, cmd.Notify)]
        notices = [c for c in notices if c.kind != "agent.moved"]
        if S.FAILED in entered:
            terminal = isinstance(event, ev.StartFailed) and event.terminal
            assert terminal or after.restart_count == self.policy.max_restarts
            [notice] = notices
            assert notice.kind == "agent.failed"
            assert notice.payload["agent"] == before.name
            assert notice.payload["restart_count"] == after.restart_count
            assert after.last_exit is not None
            assert notice.payload["exit_code"] == after.last_exit.exit_code
            assert notice.payload["oom_killed"] == after.last_exit.oom_killed
            assert notice.payload["log_tail"] == after.last_exit.log_tail
        else:
            assert notices == []
        if before.state is S.FAILED and not isinstance(event, ev.ResetRequested):
            assert after.state is S.FAILED

        # Nothing but a start/wake/restart request brings back an agent put to sleep.
        waking = isinstance(event, ev.StartRequested | ev.RestartRequested)
        if self.asleep_by_request and not waking:
            assert not any(isinstance(c, cmd.StartContainer) for c in decision.commands), event
            assert S.RESTARTING not in entered
            assert S.STARTING not in entered
        if before.state is S.STOPPED and not waking:
            # (an exit blamed on the engine waits for it: the agent did not choose it)
            blamed = isinstance(event, ev.ExitBlamedOnEngine)
            assert after.state is S.STOPPED or (blamed and after.state is S.RESTARTING)
        put_to_sleep = (
            isinstance(event, ev.StopRequested)
            or (isinstance(event, ev.ShutdownRequested) and not event.leave_running)
            or (isinstance(event, ev.PauseRequested) and decision.rejected is None)
        )
        if waking:
            self.asleep_by_request = False
        elif put_to_sleep:
            self.asleep_by_request = True

        # Backoff follows restart_delay, is capped, and never shrinks within a loop.
        if S.RESTARTING in entered and after.restart_at is not None:
            delay = restart_delay(self.policy, after.restart_count - 1)
            assert after.restart_at == self.now + delay
            assert 0 < delay <= self.policy.restart_backoff_max
            # A count that did not grow means the counter was reset: a new loop.
            if self.last_backoff is not None and after.restart_count > self.last_backoff[0]:
                assert delay >= self.last_backoff[1]
            self.last_backoff = (after.restart_count, delay)

        # next_deadline is exact for timer ticks: due ⇔ the tick changes the state.
        if isinstance(event, ev.Tick) and not event.busy:
            due_at = next_deadline(before, self.policy)
            due = due_at is not None and self.now >= due_at
            assert bool(decision.changes) == due, (before, self.now, due_at)
            if not due:
                assert decision == Decision(before)
            following = next_deadline(after, self.policy)
            assert following is None or following > self.now  # the timer loop progresses

    # -- invariants on the record ------------------------------------------------------

    @invariant()
    def restart_count_within_budget(self) -> None:
        assert 0 <= self.record.restart_count <= self.policy.max_restarts

    @invariant()
    def deadline_not_before_its_timer_began(self) -> None:
        r = self.record
        deadline = next_deadline(r, self.policy)
        if deadline is None:
            return
        if r.state is S.RESTARTING:
            assert deadline >= r.state_since
        else:
            began = r.last_activity_at if r.last_activity_at is not None else r.state_since
            assert deadline >= began

    @invariant()
    def restart_at_set_only_while_restarting(self) -> None:
        r = self.record
        if r.restart_at is not None:
            assert r.state is S.RESTARTING
        elif r.state is S.RESTARTING:  # no deadline: it waits for the engine, and says so
            assert r.last_error.startswith("engine unavailable")

    @invariant()
    def url_only_while_up(self) -> None:
        if self.record.url is not None:
            assert self.record.state in (S.RUNNING, S.IDLE)

    @invariant()
    def no_container_while_restarting_or_failed(self) -> None:
        if self.record.state in (S.RESTARTING, S.FAILED, S.CRASHED):
            assert self.record.container_id is None

    @invariant()
    def expected_exit_only_while_down(self) -> None:
        if self.record.expected_exit:
            assert self.record.state not in (S.STARTING, S.RUNNING, S.IDLE, S.PAUSED)
            assert self.record.container_id is not None

    @invariant()
    def crashed_is_never_a_resting_state(self) -> None:
        assert self.record.state is not S.CRASHED

    @invariant()
    def liveness_failures_below_threshold(self) -> None:
        assert 0 <= self.record.liveness_failures < self.policy.liveness_failures


def test_lifecycle_invariants_hold_when_events_arrive_in_any_order() -> None:
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(max_examples=200, stateful_step_count=40, deadline=None),
    )

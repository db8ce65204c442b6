"""The idle policy, driven the way the reactor's timer loop will drive it.

``simulate`` is that loop, run purely on a fake clock: it sleeps until the
earlier of ``next_deadline(record)`` and the next scripted outside event, feeds
the corresponding ``Tick`` or event to ``transition`` and repeats. The rules
(the issue): a running agent quiet for ``idle_mark_after`` (capped by the first
idle step) shows as ``idle``; after ``pause_after`` (if > 0) it is paused; after
``idle_timeout`` ``idle_action`` ("pause" or "stop") applies; ``idle_timeout``
0 disables idling; activity or a busy ``Tick`` brings ``idle`` back to
``running``. Times are asserted as offsets from the simulation's start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.config import LifecycleSettings as Policy
from roost.core import commands as cmd
from roost.core import events as ev
from roost.core.records import AgentRecord
from roost.core.states import AgentState
from roost.core.transition import next_deadline, transition

S = AgentState

T0 = 1_000_000.0
CID = "c1"
URL = "http://127.0.0.1:40000"

POLICY = Policy(
    idle_mark_after=30.0,
    pause_after=300.0,
    idle_timeout=1800.0,
    idle_action="stop",
    stop_timeout=10.0,
)


@dataclasses.dataclass
class Simulation:
    record: AgentRecord
    #: (offset from T0, to_state, reason) for every state change.
    changes: list[tuple[float, AgentState, str]] = dataclasses.field(default_factory=list)
    #: (offset from T0, command) for every command issued.
    commands: list[tuple[float, cmd.Command]] = dataclasses.field(default_factory=list)
    ticks: int = 0


def running_agent(policy: Policy) -> AgentRecord:
    """An agent brought up at T0 the ordinary way: start, created, healthy."""
    record = AgentRecord(name="echo", state_since=T0 - 10.0)
    for event in (ev.StartRequested(), ev.ContainerCreated(CID, "h1"), ev.BecameHealthy(CID, URL)):
        record = transition(record, event, now=T0, policy=policy).record
    assert record.state is S.RUNNING
    return record


def simulate(
    record: AgentRecord,
    policy: Policy,
    *,
    until: float,
    script: list[tuple[float, ev.Event]] | None = None,
    busy: Callable[[float], bool] = lambda offset: False,
    react: Callable[[cmd.Command], ev.Event | None] = lambda command: None,
) -> Simulation:
    """Run the timer loop from T0 to T0 + until.

    ``script``: outside events at offsets; ``busy(offset)``: whether activity is in
    flight when a timer fires; ``react``: the event the runtime answers a command
    with (e.g. ``BecameHealthy`` after ``StartContainer``), delivered at once.
    """
    sim = Simulation(record)
    pending = sorted(script or [], key=lambda item: item[0])
    now = T0
    while True:
        deadline = next_deadline(sim.record, policy)
        next_outside = T0 + pending[0][0] if pending else None
        if next_outside is not None and (deadline is None or next_outside <= deadline):
            if next_outside > T0 + until:
                break
            now = max(now, next_outside)
            event: ev.Event = pending.pop(0)[1]
        elif deadline is not None and deadline <= T0 + until:
            now = max(now, deadline)
            tick = ev.Tick(busy=busy(now - T0))
            sim.ticks += 1
            assert sim.ticks < 1000, "timer loop does not progress"
            changes_before = len(sim.changes)
            feed(sim, tick, now, policy, react)
            if not tick.busy:
                # a quiet tick at its deadline must do something, or the loop spins
                assert len(sim.changes) > changes_before, (sim.record, now)
            continue
        else:
            break
        feed(sim, event, now, policy, react)
    return sim


def feed(
    sim: Simulation,
    event: ev.Event,
    now: float,
    policy: Policy,
    react: Callable[[cmd.Command], ev.Event | None],
) -> None:
    decision = transition(sim.record, event, now=now, policy=policy)
    sim.record = decision.record
    sim.changes += [(now - T0, c.to_state, c.reason) for c in decision.changes]
    sim.commands += [(now - T0, c) for c in decision.commands]
    for command in decision.commands:
        answer = react(command)
        if answer is not None:
            feed(sim, answer, now, policy, react)


def test_agent_walks_running_idle_paused_stopped_when_nobody_talks_to_it() -> None:
    sim = simulate(running_agent(POLICY), POLICY, until=10_000.0)
    assert sim.changes == [
        (30.0, S.IDLE, "no activity"),
        (300.0, S.PAUSED, "idle: pause_after"),
        (1800.0, S.STOPPED, "idle timeout"),
    ]
    assert sim.commands == [
        (300.0, cmd.PauseContainer(CID)),
        (1800.0, cmd.StopContainer(CID, 10.0)),
    ]
    assert sim.ticks == 3
    assert sim.record.expected_exit is True  # the coming exit is Roost's, not a crash
    assert next_deadline(sim.record, POLICY) is None


def test_agent_is_paused_and_stays_paused_when_idle_action_is_pause() -> None:
    policy = POLICY.model_copy(update=dict(pause_after=0.0, idle_action="pause"))
    sim = simulate(running_agent(policy), policy, until=100_000.0)
    assert sim.changes == [(30.0, S.IDLE, "no activity"), (1800.0, S.PAUSED, "idle timeout")]
    assert sim.commands == [(1800.0, cmd.PauseContainer(CID))]
    assert next_deadline(sim.record, policy) is None


def test_agent_is_stopped_without_pausing_when_pause_after_is_zero() -> None:
    policy = POLICY.model_copy(update=dict(pause_after=0.0))
    sim = simulate(running_agent(policy), policy, until=10_000.0)
    assert sim.changes == [(30.0, S.IDLE, "no activity"), (1800.0, S.STOPPED, "idle timeout")]
    assert [c for _, c in sim.commands] == [cmd.StopContainer(CID, 10.0)]


def test_agent_never_idles_when_idle_timeout_is_zero() -> None:
    policy = POLICY.model_copy(update=dict(idle_timeout=0.0))
    start = running_agent(policy)
    assert next_deadline(start, policy) is None
    sim = simulate(start, policy, until=1_000_000.0)
    assert sim.changes == []
    assert sim.ticks == 0
    # a stray sweep changes nothing either
    late = transition(start, ev.Tick(), now=T0 + 1_000_000.0, policy=policy)
    assert late.record == start
    assert late.commands == ()


def test_idle_mark_is_capped_when_first_idle_step_comes_sooner() -> None:
    policy = Policy(idle_mark_after=30.0, pause_after=0.0, idle_timeout=20.0, idle_action="stop")
    sim = simulate(running_agent(policy), policy, until=1000.0)
    assert sim.changes == [(20.0, S.STOPPED, "idle timeout")]
    policy = Policy(
        idle_mark_after=30.0, pause_after=12.0, idle_timeout=1800.0, idle_action="pause"
    )
    sim = simulate(running_agent(policy), policy, until=10_000.0)
    assert sim.changes == [(12.0, S.PAUSED, "idle: pause_after")]


def test_activity_brings_idle_back_to_running_and_restarts_the_clock_when_it_arrives() -> None:
    sim = simulate(running_agent(POLICY), POLICY, until=10_000.0, script=[(100.0, ev.Activity())])
    assert sim.changes == [
        (30.0, S.IDLE, "no activity"),
        (100.0, S.RUNNING, "activity"),
        (130.0, S.IDLE, "no activity"),
        (400.0, S.PAUSED, "idle: pause_after"),
        (1900.0, S.STOPPED, "idle timeout"),
    ]


def test_busy_ticks_keep_agent_running_when_a_stream_stays_open() -> None:
    sim = simulate(
        running_agent(POLICY), POLICY, until=10_000.0, busy=lambda offset: offset < 3000.0
    )
    first_quiet = next(offset for offset, state, _ in sim.changes if state is S.IDLE)
    assert all(offset >= 3000.0 for offset, _, _ in sim.changes)
    # the last busy sweep counts as the last activity: the clock restarts there
    last_busy = first_quiet - 30.0
    assert 3000.0 - 30.0 <= last_busy < 3000.0
    assert sim.changes == [
        (first_quiet, S.IDLE, "no activity"),
        (last_busy + 300.0, S.PAUSED, "idle: pause_after"),
        (last_busy + 1800.0, S.STOPPED, "idle timeout"),
    ]


def test_busy_tick_brings_idle_back_to_running_when_activity_is_in_flight() -> None:
    sim = simulate(running_agent(POLICY), POLICY, until=31.0)
    assert sim.record.state is S.IDLE
    decision = transition(sim.record, ev.Tick(busy=True), now=T0 + 31.0, policy=POLICY)
    assert [(c.to_state, c.reason) for c in decision.changes] == [(S.RUNNING, "activity")]
    assert decision.record.last_activity_at == T0 + 31.0


def test_paused_agent_wakes_and_idles_again_when_a_message_arrives() -> None:
    def runtime(command: cmd.Command) -> ev.Event | None:
        if isinstance(command, cmd.StartContainer):
            return ev.BecameHealthy(CID, URL)  # unpaused and healthy
        return None

    sim = simulate(
        running_agent(POLICY),
        POLICY,
        until=10_000.0,
        script=[(500.0, ev.StartRequested("message"))],
        react=runtime,
    )
    assert sim.changes == [
        (30.0, S.IDLE, "no activity"),
        (300.0, S.PAUSED, "idle: pause_after"),
        (500.0, S.STARTING, "message"),
        (500.0, S.RUNNING, "healthy"),
        (530.0, S.IDLE, "no activity"),
        (800.0, S.PAUSED, "idle: pause_after"),
        (2300.0, S.STOPPED, "idle timeout"),
    ]


def test_tick_at_deadline_fires_when_float_rounding_would_undershoot() -> None:
    """(1e6 + 0.1) - 1e6 < 0.1 in floats: the tick must still fire at the deadline
    ``next_deadline`` gave, or the timer loop would wake again and again for nothing."""
    policy = Policy(idle_mark_after=0.1, pause_after=0.2, idle_timeout=0.7, idle_action="stop")
    sim = simulate(running_agent(policy), policy, until=10.0)
    assert [(state, reason) for _, state, reason in sim.changes] == [
        (S.IDLE, "no activity"),
        (S.PAUSED, "idle: pause_after"),
        (S.STOPPED, "idle timeout"),
    ]
    assert sim.ticks == 3


def test_late_sweep_applies_the_furthest_step_when_timers_were_delayed() -> None:
    start = running_agent(POLICY)
    decision = transition(start, ev.Tick(), now=T0 + 5000.0, policy=POLICY)
    assert [(c.to_state, c.reason) for c in decision.changes] == [(S.STOPPED, "idle timeout")]
    assert decision.commands == (cmd.StopContainer(CID, 10.0),)


policies = st.builds(
    Policy,
    idle_mark_after=st.floats(min_value=0.5, max_value=500.0),
    pause_after=st.one_of(st.just(0.0), st.floats(min_value=0.5, max_value=3000.0)),
    idle_timeout=st.floats(min_value=0.5, max_value=3000.0),
    idle_action=st.sampled_from(["pause", "stop"]),
)


def at(step: float) -> float:
    """The offset of a timer ``step`` seconds after T0, as the float clock sees it."""
    return (T0 + step) - T0


@settings(max_examples=200, deadline=None)
@given(policy=policies)
def test_timer_loop_ends_asleep_on_schedule_when_any_policy_applies(policy: Policy) -> None:
    sim = simulate(running_agent(policy), policy, until=10_000.0)
    first_step = policy.pause_after if policy.pause_after > 0 else policy.idle_timeout
    pause_at = min(policy.pause_after or policy.idle_timeout, policy.idle_timeout)
    if policy.idle_action == "stop":
        assert sim.changes[-1] == (at(policy.idle_timeout), S.STOPPED, "idle timeout")
    else:
        assert sim.changes[-1][:2] == (at(pause_at), S.PAUSED)
    assert next_deadline(sim.record, policy) is None
    # states only go deeper to sleep, each at most once, at most one tick each
    order = [S.RUNNING, S.IDLE, S.PAUSED, S.STOPPED]
    reached = [order.index(state) for _, state, _ in sim.changes]
    assert reached == sorted(set(reached))
    assert sim.ticks == len(sim.changes)
    if S.IDLE in [state for _, state, _ in sim.changes]:
        assert sim.changes[0][0] == at(min(policy.idle_mark_after, first_step))
    offsets = [offset for offset, _, _ in sim.changes]
    assert offsets == sorted(offsets)


@settings(max_examples=200, deadline=None)
@given(
    policy=policies, quiet=st.floats(min_value=0.0, max_value=5000.0), early=st.floats(0.001, 10.0)
)
def test_tick_changes_nothing_when_it_comes_before_the_deadline(
    policy: Policy, quiet: float, early: float
) -> None:
    start = running_agent(policy)
    # let the agent settle wherever the timers have taken it after `quiet` seconds
    record = simulate(start, policy, until=quiet).record
    deadline = next_deadline(record, policy)
    if deadline is None:
        return
    before = max(deadline - early, record.state_since)
    if before >= deadline:
        return
    decision = transition(record, ev.Tick(), now=before, policy=policy)
    assert decision.record == record
    assert decision.commands == ()
    on_time = transition(record, ev.Tick(), now=deadline, policy=policy)
    assert on_time.changes

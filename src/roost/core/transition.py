"""The lifecycle as one pure function.

``transition(record, event, *, now, policy) -> Decision`` takes the agent's
current record and one event and returns the next record, the commands the
reactor must carry out (in order) and the state changes to append to history.

Invariants (property-tested in tests/unit/test_transition_properties.py):
- An exit Roost caused (stop, idle stop, shutdown, restart, liveness or
  HEALTHCHECK kill) is never a crash: such requests first detach or mark the container
  (``expected_exit``), so its later ``die`` is stale or expected.
- ``failed`` is entered only when a crash happens with ``restart_count`` already
  at ``max_restarts`` (or a start fails terminally, e.g. the image is missing);
  nothing but ``reset`` leaves ``failed``.
- The engine's bad days are not the agent's: a start that fails because Docker is
  unreachable waits in ``restarting`` (no deadline, ``restart_at`` None) until
  ``EngineRecovered``, and an exit the engine caused (found after an outage, or
  blamed on the engine going down right after it) restarts without using up
  ``max_restarts``.
- No restart is ever scheduled for an agent that was stopped or paused by request.
- Where the backend cannot pause (``policy.can_pause`` False) no command ever
  pauses: the idle ladder stops instead (``idle_action = "pause"`` and
  ``pause_after`` read as a stop at ``idle_timeout``) and a pause request is refused.
- A node lost under the agent's container (Swarm: its node went down) is not the
  agent's crash: the agent starts again at once, elsewhere, without using up
  ``max_restarts``, and an ``agent.moved`` notice says why.
- Events about a container that no longer backs the agent change nothing.
- Every state change is listed in ``Decision.changes`` with its reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from roost.core import commands as cmd
from roost.core import events as ev
from roost.core.backoff import restart_delay
from roost.core.policy import Policy
from roost.core.records import AgentRecord, ExitInfo, StateChange
from roost.core.states import ACTIVE_STATES, AgentState

__all__ = ["HEALTHCHECK_FAILED", "Decision", "next_deadline", "transition"]

S = AgentState

#: States in which the agent's container is expected to be up (or coming up).
_LIVE = frozenset({S.STARTING, S.RUNNING, S.IDLE})


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    record: AgentRecord
    commands: tuple[cmd.Command, ...] = ()
    changes: tuple[StateChange, ...] = ()
    #: set when the event was a request the current state refuses.
    rejected: str | None = None


class _Builder:
    """Accumulates a record, commands and state changes for one decision.

    Field changes are collected and applied in one ``replace`` when the record is
    next read (``record``, ``done``): a crash's decision sets fields five times,
    and each ``dataclasses.replace`` of the record costs ~5 us, on the restart's
    critical path (issue 13 P3)."""

    __slots__ = ("_pending", "_record", "changes", "commands", "now")

    def __init__(self, record: AgentRecord, now: float) -> None:
        self._record = record
        #: fields set since the record was last read, applied on the next read.
        self._pending: dict[str, Any] = {}
        self.now = now
        self.commands: list[cmd.Command] = []
        self.changes: list[StateChange] = []

    @property
    def record(self) -> AgentRecord:
        if self._pending:
            self._record = self._record.replace(**self._pending)
            self._pending = {}
        return self._record

    def go(self, state: AgentState, reason: str, **fields: object) -> None:
        old = self._pending.get("state", self._record.state)
        if state != old:
            self.changes.append(StateChange(old, state, reason, self.now))
            fields.setdefault("state_since", self.now)
        self._pending.update(fields)
        self._pending["state"] = state

    def set(self, **fields: object) -> None:
        self._pending.update(fields)

    def detach(self, state: AgentState, reason: str, **fields: object) -> None:
        """Go to ``state`` with no container: nothing of the old one (its id, URL,
        pending restart, run, expected exit, failed probes) carries over."""
        self.go(
            state,
            reason,
            container_id=None,
            url=None,
            restart_at=None,
            running_since=None,
            expected_exit=False,
            liveness_failures=0,
            **fields,
        )

    def do(self, *commands: cmd.Command) -> None:
        self.commands.extend(commands)

    def done(self, rejected: str | None = None) -> Decision:
        return Decision(self.record, tuple(self.commands), tuple(self.changes), rejected)


def transition(record: AgentRecord, event: ev.Event, *, now: float, policy: Policy) -> Decision:
    b = _Builder(record, now)
    handler = _HANDLERS[type(event)]
    rejected = handler(b, event, policy)
    return b.done(rejected)


# -- requests ---------------------------------------------------------------------


def _on_start(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.StartRequested)
    r = b.record
    b.set(last_activity_at=b.now)
    if r.state is S.FAILED:
        return f"agent {r.name!r} is failed; reset it first"
    if r.state is S.IDLE:
        b.go(S.RUNNING, e.reason)
    elif r.state in (S.CREATED, S.STOPPED, S.PAUSED, S.CRASHED):
        # A stopped container that is still there is restarted as is; the
        # reactor recreates it when it is gone or its spec changed.
        replace = None
        if r.expected_exit and r.container_id is not None:
            # Roost asked this container to exit and has not seen the exit yet:
            # detach it, so that exit is stale and never read as a crash.
            replace = r.container_id
        b.go(
            S.STARTING,
            e.reason,
            container_id=None if replace is not None else r.container_id,
            expected_exit=False,
            liveness_failures=0,
            url=None,
        )
        b.do(cmd.StartContainer(replace=replace))
    # STARTING / RESTARTING / RUNNING: merged into the start already under way.
    return None


def _on_stop(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.StopRequested)
    _stop(b, p, e.reason, keep_failed=True)
    return None


def _stop(b: _Builder, p: Policy, reason: str, *, keep_failed: bool) -> None:
    r = b.record
    if r.state is S.FAILED and keep_failed:
        return
    if r.last_exit is not None and r.last_exit.container_id:
        # Asked to stop after it exited: that exit is no longer the engine's to give
        # back (ExitBlamedOnEngine matches on this container id).
        b.set(last_exit=dataclasses.replace(r.last_exit, container_id=None))
    if r.state is S.STARTING:
        b.do(cmd.CancelStart())
    if r.container_id is not None and r.state not in (S.STOPPED, S.FAILED):
        b.do(cmd.StopContainer(r.container_id, p.stop_timeout))
        b.set(expected_exit=True)
    target = S.FAILED if r.state is S.FAILED else S.STOPPED
    b.go(target, reason, url=None, restart_at=None, running_since=None)


def _on_pause(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.PauseRequested)
    r = b.record
    if not p.can_pause:
        return f"agent {r.name!r} cannot be paused: its backend has no pause (stop it instead)"
    if r.state is S.PAUSED:
        return None
    if r.state not in ACTIVE_STATES or r.container_id is None:
        return f"agent {r.name!r} is {r.state.value}; only a running agent can be paused"
    b.go(S.PAUSED, e.reason, url=None)
    b.do(cmd.PauseContainer(r.container_id))
    return None


def _on_restart(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.RestartRequested)
    r = b.record
    if r.state is S.FAILED:
        return f"agent {r.name!r} is failed; reset it first"
    if r.state is S.STARTING:
        b.do(cmd.CancelStart())
    # Detach the old container first: its exit is then stale, never a crash.
    b.detach(S.STARTING, e.reason, last_activity_at=b.now)
    b.do(cmd.StartContainer(replace=r.container_id))
    return None


def _on_reset(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.ResetRequested)
    r = b.record
    b.set(restart_count=0, last_error="")
    if r.last_exit is not None and r.last_exit.container_id:
        # The admin settled that exit: it is no longer the engine's to give back
        # (ExitBlamedOnEngine would otherwise restart an agent reset to stopped).
        b.set(last_exit=dataclasses.replace(r.last_exit, container_id=None))
    if r.state is S.FAILED:
        if r.container_id is not None:
            b.do(cmd.RemoveContainer(r.container_id))
        b.go(S.STOPPED, e.reason, container_id=None, url=None, restart_at=None)
    elif r.state is S.RESTARTING:
        b.go(S.STOPPED, e.reason, restart_at=None)
    return None


def _on_shutdown(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.ShutdownRequested)
    if e.leave_running:
        # Containers keep running and are adopted on the next start; only an
        # in-flight start is abandoned (the reconciler finishes it next time).
        if b.record.state is S.STARTING:
            b.do(cmd.CancelStart())
        return None
    if b.record.state in (S.STARTING, S.RUNNING, S.IDLE, S.PAUSED, S.RESTARTING):
        _stop(b, p, "roost shutdown", keep_failed=True)
    return None


# -- the start procedure's reports ---------------------------------------------------


def _on_created(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.ContainerCreated)
    if b.record.state is S.STARTING:
        b.set(container_id=e.container_id, config_hash=e.config_hash or b.record.config_hash)
    else:
        # The start was overtaken (stop, shutdown): nobody owns this container.
        b.do(cmd.RemoveContainer(e.container_id))
    return None


def _on_healthy(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.BecameHealthy)
    r = b.record
    if r.state is not S.STARTING or r.container_id != e.container_id:
        return None
    b.go(
        S.RUNNING,
        "healthy",
        url=e.url,
        running_since=b.now,
        liveness_failures=0,
        last_activity_at=b.now,
        last_error="",
    )
    return None


def _on_start_failed(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.StartFailed)
    r = b.record
    if r.state is not S.STARTING:
        return None
    if e.container_id is not None and r.container_id != e.container_id:
        return None  # stale: a start procedure that was overtaken (crash, restart)
    if e.engine_down:
        # Not the agent's failure: wait for the engine. Whatever container the start
        # made is an orphan the reconcile after the outage removes.
        _wait_for_engine(b, e.error)
        return None
    exit_info = e.exit or ExitInfo(error=e.error)
    if e.container_id is not None:
        b.do(cmd.RemoveContainer(e.container_id))
    b.set(container_id=None, url=None, last_error=e.error)
    if e.terminal:
        b.go(S.CRASHED, e.error, last_exit=exit_info)
        _fail(b, p, exit_info, e.error)
    else:
        _crash(b, p, exit_info, e.error)
    return None


# -- Docker observations -----------------------------------------------------------


def _on_exited(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.ContainerExited)
    r = b.record
    engine_s = e.engine_down and r.container_id == e.container_id and not r.expected_exit
    if engine_s and r.state in _LIVE:
        exit_info = dataclasses.replace(e.exit, container_id=e.container_id)
        _wait_for_engine(b, "the engine went down as the container exited")
        b.set(last_exit=exit_info)
        return None
    _exited(b, p, e.container_id, e.exit)
    return None


def _exited(b: _Builder, p: Policy, container_id: str, exit_info: ExitInfo) -> None:
    r = b.record
    if r.container_id != container_id:
        return  # stale: a container that no longer backs this agent
    if r.expected_exit or r.state in (S.STOPPED, S.FAILED, S.RESTARTING, S.CRASHED):
        b.set(last_exit=exit_info, expected_exit=False)
        return
    if r.state is S.PAUSED:
        # Asleep (by request or idle policy): not a crash, so no restart is
        # scheduled; the next wake starts it again.
        b.go(
            S.STOPPED,
            f"{_describe_exit(exit_info)} while paused",
            last_exit=exit_info,
            url=None,
            running_since=None,
        )
        return
    if exit_info.is_clean and r.state is not S.STARTING:
        b.go(
            S.STOPPED,
            "exited with code 0",
            last_exit=dataclasses.replace(exit_info, container_id=container_id),
            url=None,
            running_since=None,
        )
        return
    b.set(container_id=None, url=None)
    exit_info = dataclasses.replace(exit_info, container_id=container_id)
    _crash(b, p, exit_info, _describe_exit(exit_info))
    # After the restart (when there is one): the reactor carries commands out in
    # order, and the dead container's diagnostics wait for Docker's clean-up of it
    # (~100 ms) anyway; the new container's create goes out first.
    b.do(cmd.RemoveContainer(container_id, diagnose=True))


def _on_exit_details(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.ExitDetails)
    last = b.record.last_exit
    if last is None or last.container_id != e.container_id:
        return None
    found = e.exit
    b.set(
        last_exit=ExitInfo(
            exit_code=last.exit_code if last.exit_code is not None else found.exit_code,
            oom_killed=last.oom_killed or found.oom_killed,
            error=last.error or found.error,
            finished_at=found.finished_at or last.finished_at,
            log_tail=found.log_tail or last.log_tail,
            container_id=last.container_id,
        )
    )
    return None


def _on_vanished(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.ContainerVanished)
    r = b.record
    if r.container_id != e.container_id:
        return None
    if e.after_outage and r.state in _LIVE and not r.expected_exit:
        _restart_after_outage(b, None, "container vanished while the engine was down")
        return None
    if r.state in _LIVE and not r.expected_exit:
        b.set(container_id=None, url=None)
        _crash(b, p, ExitInfo(error="container vanished"), "container vanished")
    elif r.state is S.PAUSED:
        b.go(S.STOPPED, "container vanished while paused", container_id=None, url=None)
    else:
        b.set(container_id=None, url=None, expected_exit=False)
    return None


def _on_observed(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    """Reconcile: SQLite holds the intent, Docker the truth about what runs."""
    assert isinstance(e, ev.ContainerObserved)
    r = b.record
    if r.container_id != e.container_id:
        return None
    status = e.status
    if e.after_outage and status in ("exited", "dead") and r.state in _LIVE and not r.expected_exit:
        _restart_after_outage(b, e.container_id, "container ended while the engine was down")
        return None
    if status in ("exited", "dead", "created"):
        never_started = status == "created"
        # A clean old exit: Roost died between waking a stopped container and
        # ``docker start``. Either way, finish the start instead of calling it a crash.
        old_clean_exit = status == "exited" and e.exit is not None and e.exit.is_clean
        if r.state is S.STARTING and (never_started or old_clean_exit):
            b.do(cmd.StartContainer())
            return None
        _exited(b, p, e.container_id, e.exit or ExitInfo(error=f"container {status}"))
        return None
    # running or paused
    if r.state is S.STARTING:
        b.do(cmd.StartContainer())  # killed mid-start: finish the readiness wait
    elif r.state in ACTIVE_STATES:
        if status == "paused":
            b.go(S.STARTING, "adopted paused container; resuming", url=None)
            b.do(cmd.StartContainer())
    elif r.state is S.PAUSED:
        if status != "paused" and p.can_pause:
            b.do(cmd.PauseContainer(e.container_id))
        elif status != "paused":
            # Paused on a backend that had pause; this one has none: stop it.
            b.set(expected_exit=True)
            b.do(cmd.StopContainer(e.container_id, p.stop_timeout))
            b.go(S.STOPPED, "paused, but the backend has no pause", url=None, running_since=None)
    elif r.state in (S.STOPPED, S.CRASHED, S.RESTARTING, S.FAILED, S.CREATED):
        b.set(expected_exit=True)
        b.do(cmd.StopContainer(e.container_id, p.stop_timeout))
    return None


def _on_engine_recovered(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    r = b.record
    if r.state is S.RESTARTING and r.restart_at is None:
        b.go(S.STARTING, "engine recovered", expected_exit=False, liveness_failures=0)
        b.do(cmd.StartContainer())
    return None


def _on_exit_blamed(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.ExitBlamedOnEngine)
    r = b.record
    last = r.last_exit
    if last is None or last.container_id != e.container_id:
        return None  # another exit happened since: nothing to give back
    if r.state not in (S.CRASHED, S.RESTARTING, S.STARTING, S.STOPPED):
        return None
    if r.state is S.STARTING:
        b.do(cmd.CancelStart())
    b.set(restart_count=e.restart_count)
    # A clean exit's container is let go too: the reconcile after the outage removes
    # it, and the start that follows makes a fresh one.
    _wait_for_engine(b, "the engine went down right after the container exited")
    return None


def _wait_for_engine(b: _Builder, reason: str) -> None:
    """Wait in ``restarting`` (no deadline) until ``EngineRecovered``."""
    b.detach(
        S.RESTARTING, f"engine unavailable: {reason}", last_error=f"engine unavailable: {reason}"
    )


def _restart_after_outage(b: _Builder, container_id: str | None, reason: str) -> None:
    """Start again at once, without counting a restart: the engine ended it."""
    b.detach(S.STARTING, reason)
    b.do(cmd.StartContainer(replace=container_id))


def _on_node_lost(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    """The node under the agent's container went down: not the agent's crash. A live
    agent starts again at once (the backend places it on a healthy node), with its
    restart count untouched; its messages wait for it as for any start."""
    assert isinstance(e, ev.NodeLost)
    r = b.record
    if r.container_id != e.container_id:
        return None  # stale: a container that no longer backs this agent
    where = f"node {e.node}" if e.node else "its node"
    if r.state in _LIVE and not r.expected_exit:
        if r.state is S.STARTING:
            b.do(cmd.CancelStart())
        reason = f"{where} went down; starting again on another node"
        b.detach(S.STARTING, reason, last_error=f"{where} went down")
        b.do(
            cmd.StartContainer(replace=e.container_id),
            cmd.Notify("agent.moved", {"agent": r.name, "node": e.node, "reason": reason}),
        )
    elif r.state is S.PAUSED:
        b.do(cmd.RemoveContainer(e.container_id))
        b.go(S.STOPPED, f"{where} went down while paused", container_id=None, url=None)
    return None


def _on_resumed(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    if b.record.state is S.STARTING and b.record.container_id is None:
        b.do(cmd.StartContainer())
    return None


def _on_liveness(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.LivenessProbed)
    r = b.record
    if r.container_id != e.container_id or r.state not in ACTIVE_STATES:
        return None
    if e.ok:
        if r.liveness_failures:
            b.set(liveness_failures=0)
        return None
    failures = r.liveness_failures + 1
    b.set(liveness_failures=failures)
    if failures < p.liveness_failures:
        return None
    reason = f"unhealthy: {failures} failed health checks" + (f" ({e.detail})" if e.detail else "")
    # Roost kills it, so its die is stale (detached) — the crash is recorded here.
    b.do(cmd.RemoveContainer(e.container_id))
    b.set(container_id=None, url=None)
    _crash(b, p, ExitInfo(error=reason), reason)
    return None


#: Why an agent crashed when its image's own HEALTHCHECK failed.
HEALTHCHECK_FAILED = "unhealthy: the image's HEALTHCHECK failed (Docker health status)"


def _on_healthcheck(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    """Docker's verdict is final (it applied the image's own retries): an unhealthy
    container is handled like one that failed ``liveness_failures`` probes — a
    crash, restarted with backoff. Docker itself never restarts it."""
    assert isinstance(e, ev.HealthcheckReported)
    r = b.record
    if e.healthy or r.container_id != e.container_id or r.state not in _LIVE or r.expected_exit:
        return None
    # Roost removes it, so its die is stale (detached): the crash is recorded here.
    b.do(cmd.RemoveContainer(e.container_id))
    b.set(container_id=None, url=None)
    _crash(b, p, ExitInfo(error=HEALTHCHECK_FAILED), HEALTHCHECK_FAILED)
    return None


# -- activity and time ---------------------------------------------------------------


def _on_activity(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    b.set(last_activity_at=b.now)
    if b.record.state is S.IDLE:
        b.go(S.RUNNING, "activity")
    return None


def _on_tick(b: _Builder, e: ev.Event, p: Policy) -> str | None:
    assert isinstance(e, ev.Tick)
    r = b.record
    if r.state is S.RESTARTING:
        if r.restart_at is not None and b.now >= r.restart_at:
            b.go(S.STARTING, f"restart {r.restart_count}", restart_at=None, expected_exit=False)
            b.do(cmd.StartContainer())
        return None
    if r.state not in (S.RUNNING, S.IDLE, S.PAUSED):
        return None
    if e.busy:
        b.set(last_activity_at=b.now)
        if r.state is S.IDLE:
            b.go(S.RUNNING, "activity")
        return None
    if p.idle_timeout <= 0 or r.container_id is None:
        return None
    # Compare against ``base + step`` exactly as ``next_deadline`` computes it:
    # ``now - base >= step`` can round below ``step`` at that very deadline, and
    # a Tick at its deadline that changes nothing would spin the timer loop.
    base = r.last_activity_at if r.last_activity_at is not None else r.state_since
    if b.now >= base + p.idle_timeout:
        if _idle_action(p) == "stop":
            b.set(expected_exit=True)
            b.do(cmd.StopContainer(r.container_id, p.stop_timeout))
            b.go(S.STOPPED, "idle timeout", url=None, running_since=None)
        elif r.state is not S.PAUSED:
            b.do(cmd.PauseContainer(r.container_id))
            b.go(S.PAUSED, "idle timeout", url=None)
        return None
    if r.state is S.PAUSED:
        return None
    if _pause_after(p) > 0 and b.now >= base + _pause_after(p):
        b.do(cmd.PauseContainer(r.container_id))
        b.go(S.PAUSED, "idle: pause_after", url=None)
        return None
    if r.state is S.RUNNING and b.now >= base + _idle_mark(p):
        b.go(S.IDLE, "no activity")
    return None


def _idle_mark(p: Policy) -> float:
    first_step = _pause_after(p) if _pause_after(p) > 0 else p.idle_timeout
    return min(p.idle_mark_after, first_step)


def _idle_action(p: Policy) -> str:
    """What ``idle_timeout`` does: ``idle_action``, or a stop where pause does not exist."""
    return p.idle_action if p.can_pause else "stop"


def _pause_after(p: Policy) -> float:
    """The pause step's delay; 0 (no pause step) where pause does not exist."""
    return p.pause_after if p.can_pause else 0.0


def next_deadline(record: AgentRecord, policy: Policy) -> float | None:
    """When the agent next needs a ``Tick``, or None if no timer is due."""
    r = record
    if r.state is S.RESTARTING:
        return r.restart_at
    if r.state not in (S.RUNNING, S.IDLE, S.PAUSED) or policy.idle_timeout <= 0:
        return None
    if r.container_id is None:
        return None
    base = r.last_activity_at if r.last_activity_at is not None else r.state_since
    steps: list[float] = []
    if r.state is S.PAUSED:
        if _idle_action(policy) == "stop":
            steps.append(policy.idle_timeout)
    else:
        steps.append(policy.idle_timeout)
        if _pause_after(policy) > 0:
            steps.append(_pause_after(policy))
        if r.state is S.RUNNING:
            steps.append(_idle_mark(policy))
    if not steps:
        return None
    return base + min(steps)


# -- crash handling ------------------------------------------------------------------


def _crash(b: _Builder, p: Policy, exit_info: ExitInfo, reason: str) -> None:
    """Unexpected exit: crashed → restarting (backoff) → starting, or → failed."""
    r = b.record
    count = r.restart_count
    if r.running_since is not None and b.now - r.running_since >= p.restart_reset_after:
        count = 0  # it stayed up long enough: a fresh crash, not part of a loop
    b.go(
        S.CRASHED,
        reason,
        last_exit=exit_info,
        restart_count=count,
        running_since=None,
        url=None,
        expected_exit=False,
        liveness_failures=0,
    )
    if count >= p.max_restarts:
        _fail(b, p, exit_info, reason)
        return
    delay = restart_delay(p, count)
    b.set(restart_count=count + 1)
    if delay <= 0:
        b.go(S.STARTING, f"restart {count + 1} of {p.max_restarts}")
        b.do(cmd.StartContainer())
    else:
        b.go(
            S.RESTARTING,
            f"restart {count + 1} of {p.max_restarts} in {delay:g}s",
            restart_at=b.now + delay,
        )


def _fail(b: _Builder, p: Policy, exit_info: ExitInfo, reason: str) -> None:
    r = b.record
    b.go(S.FAILED, f"gave up after {r.restart_count} restarts: {reason}", restart_at=None)
    b.do(
        cmd.Notify(
            "agent.failed",
            {
                "agent": r.name,
                "exit_code": exit_info.exit_code,
                "oom_killed": exit_info.oom_killed,
                "error": exit_info.error or reason,
                "restart_count": r.restart_count,
                "max_restarts": p.max_restarts,
                "log_tail": exit_info.log_tail,
                "finished_at": exit_info.finished_at,
            },
        )
    )


def _describe_exit(exit_info: ExitInfo) -> str:
    if exit_info.oom_killed:
        return f"killed by the kernel OOM killer (exit code {exit_info.exit_code})"
    if exit_info.error:
        return exit_info.error
    return f"exited with code {exit_info.exit_code}"


_HANDLERS = {
    ev.StartRequested: _on_start,
    ev.StopRequested: _on_stop,
    ev.PauseRequested: _on_pause,
    ev.RestartRequested: _on_restart,
    ev.ResetRequested: _on_reset,
    ev.ShutdownRequested: _on_shutdown,
    ev.ContainerCreated: _on_created,
    ev.BecameHealthy: _on_healthy,
    ev.StartFailed: _on_start_failed,
    ev.ContainerExited: _on_exited,
    ev.ExitDetails: _on_exit_details,
    ev.ContainerVanished: _on_vanished,
    ev.ContainerObserved: _on_observed,
    ev.EngineRecovered: _on_engine_recovered,
    ev.ExitBlamedOnEngine: _on_exit_blamed,
    ev.NodeLost: _on_node_lost,
    ev.Resumed: _on_resumed,
    ev.LivenessProbed: _on_liveness,
    ev.HealthcheckReported: _on_healthcheck,
    ev.Activity: _on_activity,
    ev.Tick: _on_tick,
}

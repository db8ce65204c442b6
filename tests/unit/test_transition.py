"""Table tests for ``roost.core.transition``: every handler, every branch.

Each row is (record before, event, policy) → (state changes with their reasons,
commands, fields of the record after). Times are offsets from one arbitrary
``NOW``; nothing here depends on a real clock.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import pytest

from roost.config import LifecycleSettings as Policy
from roost.core import commands as cmd
from roost.core import events as ev
from roost.core.policy import Policy as CorePolicy
from roost.core.policy import without_pause
from roost.core.records import AgentRecord, ExitInfo
from roost.core.states import AgentState
from roost.core.transition import HEALTHCHECK_FAILED, Decision, next_deadline, transition

S = AgentState

NOW = 50_000.0
CUR = "c-current"
OLD = "c-old"
NEW = "c-new"
URL = "http://127.0.0.1:49153"

POLICY = Policy(
    idle_timeout=1800.0,
    idle_action="stop",
    pause_after=0.0,
    idle_mark_after=30.0,
    max_restarts=3,
    restart_backoff=10.0,
    restart_backoff_max=300.0,
    restart_reset_after=600.0,
    stop_timeout=10.0,
    liveness_failures=3,
)
PAUSING = POLICY.model_copy(update=dict(idle_action="pause"))
#: The same policies on a backend without pause (Docker Swarm).
NO_PAUSE = without_pause(POLICY)
PAUSING_NO_PAUSE = without_pause(PAUSING)
NO_BACKOFF = POLICY.model_copy(update=dict(restart_backoff=0.0))
#: The library this replaces: one restart after an unexpected exit, then failed.
LIBRARY = POLICY.model_copy(update=dict(max_restarts=1, restart_backoff=0.0))

CRASH = ExitInfo(exit_code=1, finished_at="2024-01-01T00:00:00Z", log_tail="Traceback: boom")
CLEAN = ExitInfo(exit_code=0)
OOM = ExitInfo(exit_code=137, oom_killed=True, log_tail="Killed")


def record(state: AgentState, **fields: Any) -> AgentRecord:
    base: dict[str, Any] = {"name": "echo", "state": state, "state_since": NOW - 60.0}
    return AgentRecord(**{**base, **fields})


def created(**f: Any) -> AgentRecord:
    return record(S.CREATED, **f)


def starting(**f: Any) -> AgentRecord:
    return record(S.STARTING, **{"last_activity_at": NOW - 2.0, **f})


def running(**f: Any) -> AgentRecord:
    base = {
        "container_id": CUR,
        "url": URL,
        "running_since": NOW - 60.0,
        "last_activity_at": NOW - 5.0,
        "config_hash": "h1",
    }
    state = f.pop("state", S.RUNNING)
    return record(state, **{**base, **f})


def idle(**f: Any) -> AgentRecord:
    return running(**{"state": S.IDLE, "last_activity_at": NOW - 40.0, **f})


def paused(**f: Any) -> AgentRecord:
    return running(**{"state": S.PAUSED, "url": None, "last_activity_at": NOW - 400.0, **f})


def stopped(**f: Any) -> AgentRecord:
    return record(S.STOPPED, **{"container_id": CUR, "last_exit": CLEAN, **f})


def restarting(**f: Any) -> AgentRecord:
    return record(S.RESTARTING, **{"restart_count": 1, "restart_at": NOW + 5.0, **f})


def failed(**f: Any) -> AgentRecord:
    return record(S.FAILED, **{"restart_count": 3, "last_exit": CRASH, "last_error": "x", **f})


def crashed(**f: Any) -> AgentRecord:
    return record(S.CRASHED, **f)


@dataclasses.dataclass(frozen=True)
class Row:
    record: AgentRecord
    event: ev.Event
    #: expected state changes, in order, as (to_state, reason).
    path: tuple[tuple[AgentState, str], ...] = ()
    commands: tuple[cmd.Command, ...] = ()
    #: expected fields of the record after the decision.
    fields: Mapping[str, object] = dataclasses.field(default_factory=dict)
    policy: CorePolicy = POLICY
    rejected: bool = False
    #: the record must come back exactly as it went in.
    unchanged: bool = False


def at_cur(exit_info: ExitInfo) -> ExitInfo:
    """An exit as the record keeps it: tagged with the container it belongs to."""
    return dataclasses.replace(exit_info, container_id=CUR)


def row(
    id_: str,
    before: AgentRecord,
    event: ev.Event,
    path: tuple[tuple[AgentState, str], ...] = (),
    commands: tuple[cmd.Command, ...] = (),
    **kw: Any,
) -> Any:
    return pytest.param(Row(before, event, path, commands, **kw), id=id_)


def decide(r: Row) -> Decision:
    return transition(r.record, r.event, now=NOW, policy=r.policy)


def check(r: Row) -> Decision:
    decision = decide(r)
    assert [(c.to_state, c.reason) for c in decision.changes] == list(r.path)
    assert decision.commands == r.commands
    assert (decision.rejected is not None) == r.rejected
    expected_state = r.path[-1][0] if r.path else r.record.state
    assert decision.record.state is expected_state
    for name, value in r.fields.items():
        assert getattr(decision.record, name) == value, name
    if r.unchanged:
        assert decision.record == r.record
    # every change is stamped now and chains from the state before
    previous = r.record.state
    for change in decision.changes:
        assert change.from_state is previous
        assert change.at == NOW
        previous = change.to_state
    if decision.changes:
        assert decision.record.state_since == NOW
    else:
        assert decision.record.state_since == r.record.state_since
    return decision


def restart_in(n: int, delay: float, of: int = 3) -> tuple[AgentState, str]:
    return (S.RESTARTING, f"restart {n} of {of} in {delay:g}s")


def failed_payload(exit_info: ExitInfo, error: str, restarts: int, of: int = 3) -> dict[str, Any]:
    return {
        "agent": "echo",
        "exit_code": exit_info.exit_code,
        "oom_killed": exit_info.oom_killed,
        "error": error,
        "restart_count": restarts,
        "max_restarts": of,
        "log_tail": exit_info.log_tail,
        "finished_at": exit_info.finished_at,
    }


# -- requests --------------------------------------------------------------------------

START_ROWS = [
    row(
        "created",
        created(),
        ev.StartRequested(),
        ((S.STARTING, "start"),),
        (cmd.StartContainer(),),
        fields={"container_id": None, "last_activity_at": NOW},
    ),
    row(
        "stopped-container-reused",
        stopped(),
        ev.StartRequested("message"),
        ((S.STARTING, "message"),),
        (cmd.StartContainer(),),
        fields={"container_id": CUR, "expected_exit": False},
    ),
    row(
        "stopped-exit-not-seen-yet-detached",
        stopped(expected_exit=True),
        ev.StartRequested("wake"),
        ((S.STARTING, "wake"),),
        (cmd.StartContainer(replace=CUR),),
        fields={"container_id": None, "expected_exit": False},
    ),
    row(
        "paused-woken",
        paused(liveness_failures=1),
        ev.StartRequested("wake"),
        ((S.STARTING, "wake"),),
        (cmd.StartContainer(),),
        fields={"container_id": CUR, "url": None, "liveness_failures": 0},
    ),
    row(
        "crashed",
        crashed(),
        ev.StartRequested(),
        ((S.STARTING, "start"),),
        (cmd.StartContainer(),),
    ),
    row(
        "idle-back-to-running",
        idle(),
        ev.StartRequested("message"),
        ((S.RUNNING, "message"),),
        fields={"url": URL, "last_activity_at": NOW},
    ),
    row("running-merged", running(), ev.StartRequested(), fields={"last_activity_at": NOW}),
    row("starting-merged", starting(), ev.StartRequested(), fields={"last_activity_at": NOW}),
    row(
        "restarting-merged",
        restarting(),
        ev.StartRequested(),
        fields={"restart_at": NOW + 5.0, "restart_count": 1},
    ),
    row("failed-refused", failed(), ev.StartRequested(), rejected=True),
]


@pytest.mark.parametrize("r", START_ROWS)
def test_start_request_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


STOPPED_BY_REQUEST = {"expected_exit": True, "url": None, "running_since": None, "restart_at": None}

STOP_ROWS = [
    row(
        "running",
        running(),
        ev.StopRequested(),
        ((S.STOPPED, "stop requested"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields={**STOPPED_BY_REQUEST, "container_id": CUR},
    ),
    row(
        "idle",
        idle(),
        ev.StopRequested("admin"),
        ((S.STOPPED, "admin"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields=STOPPED_BY_REQUEST,
    ),
    row(
        "paused",
        paused(),
        ev.StopRequested(),
        ((S.STOPPED, "stop requested"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields=STOPPED_BY_REQUEST,
    ),
    row(
        "starting-with-container",
        starting(container_id=CUR),
        ev.StopRequested(),
        ((S.STOPPED, "stop requested"),),
        (cmd.CancelStart(), cmd.StopContainer(CUR, 10.0)),
        fields=STOPPED_BY_REQUEST,
    ),
    row(
        "starting-before-create",
        starting(),
        ev.StopRequested(),
        ((S.STOPPED, "stop requested"),),
        (cmd.CancelStart(),),
        fields={"expected_exit": False, "container_id": None},
    ),
    row(
        "restarting-cancels-restart",
        restarting(),
        ev.StopRequested(),
        ((S.STOPPED, "stop requested"),),
        fields={"restart_at": None, "restart_count": 1},
    ),
    row("stopped-again", stopped(), ev.StopRequested(), fields={"expected_exit": False}),
    row("failed-stays-failed", failed(), ev.StopRequested(), unchanged=True),
    row("created", created(), ev.StopRequested(), ((S.STOPPED, "stop requested"),)),
]


@pytest.mark.parametrize("r", STOP_ROWS)
def test_stop_request_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


PAUSE_ROWS = [
    row(
        "running",
        running(),
        ev.PauseRequested(),
        ((S.PAUSED, "pause requested"),),
        (cmd.PauseContainer(CUR),),
        fields={"url": None, "container_id": CUR},
    ),
    row(
        "idle",
        idle(),
        ev.PauseRequested("admin"),
        ((S.PAUSED, "admin"),),
        (cmd.PauseContainer(CUR),),
    ),
    row("paused-already", paused(), ev.PauseRequested(), unchanged=True),
    row("starting-refused", starting(container_id=CUR), ev.PauseRequested(), rejected=True),
    row("stopped-refused", stopped(), ev.PauseRequested(), rejected=True),
    row("restarting-refused", restarting(), ev.PauseRequested(), rejected=True),
    row("failed-refused", failed(), ev.PauseRequested(), rejected=True),
    row("created-refused", created(), ev.PauseRequested(), rejected=True),
    row(
        "running-without-container-refused",
        running(container_id=None),
        ev.PauseRequested(),
        rejected=True,
    ),
]


@pytest.mark.parametrize("r", PAUSE_ROWS)
def test_pause_request_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


DETACHED = {
    "container_id": None,
    "url": None,
    "restart_at": None,
    "running_since": None,
    "expected_exit": False,
    "liveness_failures": 0,
    "last_activity_at": NOW,
}

RESTART_ROWS = [
    row(
        "running",
        running(liveness_failures=2),
        ev.RestartRequested(),
        ((S.STARTING, "restart requested"),),
        (cmd.StartContainer(replace=CUR),),
        fields=DETACHED,
    ),
    row(
        "idle",
        idle(),
        ev.RestartRequested("admin"),
        ((S.STARTING, "admin"),),
        (cmd.StartContainer(replace=CUR),),
        fields=DETACHED,
    ),
    row(
        "starting",
        starting(container_id=CUR),
        ev.RestartRequested(),
        (),  # already starting: no state change
        (cmd.CancelStart(), cmd.StartContainer(replace=CUR)),
        fields=DETACHED,
    ),
    row(
        "paused",
        paused(),
        ev.RestartRequested(),
        ((S.STARTING, "restart requested"),),
        (cmd.StartContainer(replace=CUR),),
        fields=DETACHED,
    ),
    row(
        "stopped-exit-pending",
        stopped(expected_exit=True),
        ev.RestartRequested(),
        ((S.STARTING, "restart requested"),),
        (cmd.StartContainer(replace=CUR),),
        fields=DETACHED,
    ),
    row(
        "restarting-skips-backoff",
        restarting(restart_count=2),
        ev.RestartRequested(),
        ((S.STARTING, "restart requested"),),
        (cmd.StartContainer(),),
        fields={**DETACHED, "restart_count": 2},
    ),
    row(
        "created",
        created(),
        ev.RestartRequested(),
        ((S.STARTING, "restart requested"),),
        (cmd.StartContainer(),),
    ),
    row("failed-refused", failed(), ev.RestartRequested(), rejected=True, unchanged=True),
]


@pytest.mark.parametrize("r", RESTART_ROWS)
def test_restart_request_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


RESET_ROWS = [
    row(
        "failed-cleared",
        failed(),
        ev.ResetRequested(),
        ((S.STOPPED, "reset requested"),),
        fields={"restart_count": 0, "last_error": "", "container_id": None, "last_exit": CRASH},
    ),
    row(
        "failed-settles-its-exit-so-the-engine-is-not-blamed-for-it-later",
        failed(last_exit=at_cur(CRASH)),
        ev.ResetRequested(),
        ((S.STOPPED, "reset requested"),),
        fields={"last_exit": CRASH},
    ),
    row(
        "failed-with-leftover-container",
        failed(container_id=CUR),
        ev.ResetRequested("admin"),
        ((S.STOPPED, "admin"),),
        (cmd.RemoveContainer(CUR),),
        fields={"container_id": None, "restart_count": 0},
    ),
    row(
        "restarting-cancelled",
        restarting(restart_count=2),
        ev.ResetRequested(),
        ((S.STOPPED, "reset requested"),),
        fields={"restart_count": 0, "restart_at": None},
    ),
    row(
        "running-counter-only",
        running(restart_count=2),
        ev.ResetRequested(),
        fields={"restart_count": 0, "container_id": CUR},
    ),
    row(
        "stopped-error-cleared",
        stopped(restart_count=1, last_error="boom"),
        ev.ResetRequested(),
        fields={"restart_count": 0, "last_error": ""},
    ),
]


@pytest.mark.parametrize("r", RESET_ROWS)
def test_reset_request_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


SHUTDOWN_ROWS = [
    row(
        "leave-running-running", running(), ev.ShutdownRequested(leave_running=True), unchanged=True
    ),
    row("leave-running-paused", paused(), ev.ShutdownRequested(leave_running=True), unchanged=True),
    row(
        "leave-running-starting",
        starting(container_id=CUR),
        ev.ShutdownRequested(leave_running=True),
        (),
        (cmd.CancelStart(),),
        unchanged=True,
    ),
    row(
        "running",
        running(),
        ev.ShutdownRequested(),
        ((S.STOPPED, "roost shutdown"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields=STOPPED_BY_REQUEST,
    ),
    row(
        "idle",
        idle(),
        ev.ShutdownRequested(),
        ((S.STOPPED, "roost shutdown"),),
        (cmd.StopContainer(CUR, 10.0),),
    ),
    row(
        "paused",
        paused(),
        ev.ShutdownRequested(),
        ((S.STOPPED, "roost shutdown"),),
        (cmd.StopContainer(CUR, 10.0),),
    ),
    row(
        "starting-before-create",
        starting(),
        ev.ShutdownRequested(),
        ((S.STOPPED, "roost shutdown"),),
        (cmd.CancelStart(),),
    ),
    row(
        "restarting",
        restarting(),
        ev.ShutdownRequested(),
        ((S.STOPPED, "roost shutdown"),),
        fields={"restart_at": None},
    ),
    row("stopped", stopped(), ev.ShutdownRequested(), unchanged=True),
    row("failed", failed(), ev.ShutdownRequested(), unchanged=True),
    row("created", created(), ev.ShutdownRequested(), unchanged=True),
]


@pytest.mark.parametrize("r", SHUTDOWN_ROWS)
def test_shutdown_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


# -- the start procedure's reports -----------------------------------------------------

CREATED_ROWS = [
    row(
        "starting-records-container",
        starting(config_hash="h1"),
        ev.ContainerCreated(NEW, "h2"),
        fields={"container_id": NEW, "config_hash": "h2"},
    ),
    row(
        "starting-keeps-hash-when-none-given",
        starting(config_hash="h1"),
        ev.ContainerCreated(NEW),
        fields={"container_id": NEW, "config_hash": "h1"},
    ),
    row(
        "stopped-overtaken-removed",
        stopped(),
        ev.ContainerCreated(NEW, "h2"),
        (),
        (cmd.RemoveContainer(NEW),),
        unchanged=True,
    ),
    row(
        "restarting-overtaken-removed",
        restarting(),
        ev.ContainerCreated(NEW),
        (),
        (cmd.RemoveContainer(NEW),),
        unchanged=True,
    ),
]


@pytest.mark.parametrize("r", CREATED_ROWS)
def test_container_created_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


HEALTHY_ROWS = [
    row(
        "starting",
        starting(container_id=CUR, last_error="earlier failure", liveness_failures=1),
        ev.BecameHealthy(CUR, URL),
        ((S.RUNNING, "healthy"),),
        fields={
            "url": URL,
            "running_since": NOW,
            "last_activity_at": NOW,
            "liveness_failures": 0,
            "last_error": "",
        },
    ),
    row("stale-container", starting(container_id=CUR), ev.BecameHealthy(OLD, URL), unchanged=True),
    row("starting-before-create", starting(), ev.BecameHealthy(NEW, URL), unchanged=True),
    row("stopped", stopped(), ev.BecameHealthy(CUR, URL), unchanged=True),
]


@pytest.mark.parametrize("r", HEALTHY_ROWS)
def test_became_healthy_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


TIMEOUT_EXIT = ExitInfo(error="not healthy after 120s", log_tail="listening...")
TERMINAL_EXIT = ExitInfo(error="image roost-mimic:latest not found")

START_FAILED_ROWS = [
    row(
        "with-container",
        starting(container_id=CUR),
        ev.StartFailed(CUR, "not healthy after 120s", TIMEOUT_EXIT),
        ((S.CRASHED, "not healthy after 120s"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR),),
        fields={
            "container_id": None,
            "restart_count": 1,
            "restart_at": NOW + 10.0,
            "last_error": "not healthy after 120s",
            "last_exit": TIMEOUT_EXIT,
        },
    ),
    row(
        "before-create",
        starting(),
        ev.StartFailed(None, "docker unreachable"),
        ((S.CRASHED, "docker unreachable"), restart_in(1, 10)),
        fields={"last_exit": ExitInfo(error="docker unreachable"), "restart_count": 1},
    ),
    row(
        "no-backoff-starts-again",
        starting(container_id=CUR),
        ev.StartFailed(CUR, "boom"),
        ((S.CRASHED, "boom"), (S.STARTING, "restart 1 of 3")),
        (cmd.RemoveContainer(CUR), cmd.StartContainer()),
        policy=NO_BACKOFF,
        fields={"restart_count": 1, "container_id": None},
    ),
    row(
        "terminal-fails-at-once",
        starting(),
        ev.StartFailed(None, TERMINAL_EXIT.error, TERMINAL_EXIT, terminal=True),
        (
            (S.CRASHED, TERMINAL_EXIT.error),
            (S.FAILED, f"gave up after 0 restarts: {TERMINAL_EXIT.error}"),
        ),
        (cmd.Notify("agent.failed", failed_payload(TERMINAL_EXIT, TERMINAL_EXIT.error, 0)),),
        fields={"restart_count": 0, "restart_at": None, "last_exit": TERMINAL_EXIT},
    ),
    row(
        "stale-overtaken-procedure",
        starting(),
        ev.StartFailed(OLD, "boom"),
        unchanged=True,
    ),
    row(
        "stale-other-container",
        starting(container_id=CUR),
        ev.StartFailed(OLD, "boom"),
        unchanged=True,
    ),
    row("running-ignores", running(), ev.StartFailed(CUR, "boom"), unchanged=True),
    row("stopped-ignores", stopped(), ev.StartFailed(None, "boom"), unchanged=True),
]


@pytest.mark.parametrize("r", START_FAILED_ROWS)
def test_start_failed_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


# -- Docker observations ---------------------------------------------------------------

CRASHED_OUT = {
    "container_id": None,
    "url": None,
    "running_since": None,
    "restart_count": 1,
    "restart_at": NOW + 10.0,
    "expected_exit": False,
    "liveness_failures": 0,
}

EXITED_ROWS = [
    row(
        "running-crash",
        running(liveness_failures=1),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields={**CRASHED_OUT, "last_exit": at_cur(CRASH)},
    ),
    row(
        "idle-crash",
        idle(),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields=CRASHED_OUT,
    ),
    row(
        "starting-crash",
        starting(container_id=CUR),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields=CRASHED_OUT,
    ),
    row(
        "starting-clean-exit-is-a-crash",
        starting(container_id=CUR),
        ev.ContainerExited(CUR, CLEAN),
        ((S.CRASHED, "exited with code 0"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
    ),
    row(
        "running-clean-exit-stopped",
        running(),
        ev.ContainerExited(CUR, CLEAN),
        ((S.STOPPED, "exited with code 0"),),
        fields={
            "container_id": CUR,
            "last_exit": at_cur(CLEAN),
            "url": None,
            "running_since": None,
        },
    ),
    row(
        "idle-clean-exit-stopped",
        idle(),
        ev.ContainerExited(CUR, CLEAN),
        ((S.STOPPED, "exited with code 0"),),
    ),
    row(
        "oom",
        running(),
        ev.ContainerExited(CUR, OOM),
        ((S.CRASHED, "killed by the kernel OOM killer (exit code 137)"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields={"last_exit": at_cur(OOM)},
    ),
    row(
        "exit-code-0-with-error-is-a-crash",
        running(),
        ev.ContainerExited(CUR, ExitInfo(exit_code=0, error="task failed")),
        ((S.CRASHED, "task failed"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
    ),
    row(
        "second-restart-doubles",
        running(restart_count=1),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(2, 20)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields={"restart_count": 2, "restart_at": NOW + 20.0},
    ),
    row(
        "third-restart-doubles",
        running(restart_count=2),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(3, 40)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields={"restart_count": 3, "restart_at": NOW + 40.0},
    ),
    row(
        "backoff-capped",
        running(restart_count=2),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(3, 25)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        policy=POLICY.model_copy(update=dict(restart_backoff_max=25.0)),
        fields={"restart_at": NOW + 25.0},
    ),
    row(
        "max-restarts-failed",
        running(restart_count=3),
        ev.ContainerExited(CUR, CRASH),
        (
            (S.CRASHED, "exited with code 1"),
            (S.FAILED, "gave up after 3 restarts: exited with code 1"),
        ),
        (
            cmd.Notify("agent.failed", failed_payload(CRASH, "exited with code 1", 3)),
            cmd.RemoveContainer(CUR, diagnose=True),
        ),
        fields={
            "restart_count": 3,
            "container_id": None,
            "restart_at": None,
            "last_exit": at_cur(CRASH),
        },
    ),
    row(
        "counter-reset-after-running-long-enough",
        running(restart_count=3, running_since=NOW - 600.0),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields={"restart_count": 1, "restart_at": NOW + 10.0},
    ),
    row(
        "counter-kept-just-before-reset",
        running(restart_count=3, running_since=NOW - 599.5),
        ev.ContainerExited(CUR, CRASH),
        (
            (S.CRASHED, "exited with code 1"),
            (S.FAILED, "gave up after 3 restarts: exited with code 1"),
        ),
        (
            cmd.Notify("agent.failed", failed_payload(CRASH, "exited with code 1", 3)),
            cmd.RemoveContainer(CUR, diagnose=True),
        ),
    ),
    row(
        "library-first-exit-restarts-at-once",
        running(),
        ev.ContainerExited(CUR, CRASH),
        ((S.CRASHED, "exited with code 1"), (S.STARTING, "restart 1 of 1")),
        (cmd.StartContainer(), cmd.RemoveContainer(CUR, diagnose=True)),
        policy=LIBRARY,
        fields={"restart_count": 1, "container_id": None, "restart_at": None},
    ),
    row(
        "library-second-exit-failed",
        running(restart_count=1),
        ev.ContainerExited(CUR, CRASH),
        (
            (S.CRASHED, "exited with code 1"),
            (S.FAILED, "gave up after 1 restarts: exited with code 1"),
        ),
        (
            cmd.Notify("agent.failed", failed_payload(CRASH, "exited with code 1", 1, of=1)),
            cmd.RemoveContainer(CUR, diagnose=True),
        ),
        policy=LIBRARY,
    ),
    row(
        "expected-exit-absorbed",
        stopped(expected_exit=True),
        ev.ContainerExited(CUR, CRASH),
        fields={"expected_exit": False, "last_exit": CRASH, "container_id": CUR},
    ),
    row(
        "stopped-late-exit-absorbed",
        stopped(),
        ev.ContainerExited(CUR, CRASH),
        fields={"last_exit": CRASH},
    ),
    row(
        "paused-exit-stops-without-restart",
        paused(),
        ev.ContainerExited(CUR, ExitInfo(exit_code=137)),
        ((S.STOPPED, "exited with code 137 while paused"),),
        fields={"container_id": CUR, "last_exit": ExitInfo(exit_code=137), "restart_at": None},
    ),
    row("stale-container", running(), ev.ContainerExited(OLD, CRASH), unchanged=True),
    row("starting-before-create-stale", starting(), ev.ContainerExited(OLD, CRASH), unchanged=True),
]


@pytest.mark.parametrize("r", EXITED_ROWS)
def test_container_exited_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


DETAILS = ExitInfo(
    exit_code=137, oom_killed=True, finished_at="2026-01-01T00:00:01Z", log_tail="last words"
)

EXIT_DETAILS_ROWS = [
    row(
        "details-complete-last-exit-of-that-container",
        restarting(last_exit=at_cur(ExitInfo(exit_code=137))),
        ev.ExitDetails(CUR, DETAILS),
        fields={"last_exit": at_cur(DETAILS)},
    ),
    row(
        "details-keep-the-die-event-exit-code",
        restarting(last_exit=at_cur(ExitInfo(exit_code=1))),
        ev.ExitDetails(CUR, DETAILS),
        fields={"last_exit": at_cur(dataclasses.replace(DETAILS, exit_code=1))},
    ),
    row(
        "details-of-another-container-ignored",
        restarting(last_exit=at_cur(ExitInfo(exit_code=1))),
        ev.ExitDetails(OLD, DETAILS),
        unchanged=True,
    ),
    row(
        "details-without-last-exit-ignored",
        running(),
        ev.ExitDetails(CUR, DETAILS),
        unchanged=True,
    ),
]


@pytest.mark.parametrize("r", EXIT_DETAILS_ROWS)
def test_exit_details_complete_last_exit_when_they_match_its_container(r: Row) -> None:
    check(r)


VANISHED = ExitInfo(error="container vanished")

VANISHED_ROWS = [
    row(
        "running-crash",
        running(),
        ev.ContainerVanished(CUR),
        ((S.CRASHED, "container vanished"), restart_in(1, 10)),
        fields={**CRASHED_OUT, "last_exit": VANISHED},
    ),
    row(
        "starting-crash",
        starting(container_id=CUR),
        ev.ContainerVanished(CUR),
        ((S.CRASHED, "container vanished"), restart_in(1, 10)),
        fields={"container_id": None},
    ),
    row(
        "paused-stopped",
        paused(),
        ev.ContainerVanished(CUR),
        ((S.STOPPED, "container vanished while paused"),),
        fields={"container_id": None, "url": None},
    ),
    row(
        "stopped-forgets-container",
        stopped(expected_exit=True),
        ev.ContainerVanished(CUR),
        fields={"container_id": None, "expected_exit": False},
    ),
    row("stale-container", running(), ev.ContainerVanished(OLD), unchanged=True),
]


@pytest.mark.parametrize("r", VANISHED_ROWS)
def test_container_vanished_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


OBSERVED_ROWS = [
    row("running-adopted", running(), ev.ContainerObserved(CUR, "running"), unchanged=True),
    row("idle-adopted", idle(), ev.ContainerObserved(CUR, "running"), unchanged=True),
    row("paused-kept-paused", paused(), ev.ContainerObserved(CUR, "paused"), unchanged=True),
    row(
        "paused-but-running-paused-again",
        paused(),
        ev.ContainerObserved(CUR, "running"),
        (),
        (cmd.PauseContainer(CUR),),
        unchanged=True,
    ),
    row(
        "running-but-paused-resumed",
        running(),
        ev.ContainerObserved(CUR, "paused"),
        ((S.STARTING, "adopted paused container; resuming"),),
        (cmd.StartContainer(),),
        fields={"url": None, "container_id": CUR},
    ),
    row(
        "starting-running-finish-readiness",
        starting(container_id=CUR),
        ev.ContainerObserved(CUR, "running"),
        (),
        (cmd.StartContainer(),),
        unchanged=True,
    ),
    row(
        "starting-created-finish-start",
        starting(container_id=CUR),
        ev.ContainerObserved(CUR, "created"),
        (),
        (cmd.StartContainer(),),
        unchanged=True,
    ),
    row(
        "starting-exited-cleanly-finish-start",
        starting(container_id=CUR),
        ev.ContainerObserved(CUR, "exited", ExitInfo(exit_code=0)),
        (),
        (cmd.StartContainer(),),
        unchanged=True,
    ),
    row(
        "starting-exited-crash",
        starting(container_id=CUR),
        ev.ContainerObserved(CUR, "exited", CRASH),
        ((S.CRASHED, "exited with code 1"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
    ),
    row(
        "running-exited-clean-stopped",
        running(),
        ev.ContainerObserved(CUR, "exited", CLEAN),
        ((S.STOPPED, "exited with code 0"),),
        fields={"container_id": CUR},
    ),
    row(
        "running-dead-crash",
        running(),
        ev.ContainerObserved(CUR, "dead"),
        ((S.CRASHED, "container dead"), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR, diagnose=True),),
        fields={"last_exit": at_cur(ExitInfo(error="container dead"))},
    ),
    row(
        "stopped-but-running-stopped",
        stopped(),
        ev.ContainerObserved(CUR, "running"),
        (),
        (cmd.StopContainer(CUR, 10.0),),
        fields={"expected_exit": True},
    ),
    row(
        "created-but-running-stopped",
        created(container_id=CUR),
        ev.ContainerObserved(CUR, "running"),
        (),
        (cmd.StopContainer(CUR, 10.0),),
        fields={"expected_exit": True},
    ),
    row(
        "stopped-exited-absorbed",
        stopped(),
        ev.ContainerObserved(CUR, "exited", CRASH),
        fields={"last_exit": CRASH, "container_id": CUR},
    ),
    row("stale-container", running(), ev.ContainerObserved(OLD, "exited", CRASH), unchanged=True),
]


@pytest.mark.parametrize("r", OBSERVED_ROWS)
def test_container_observed_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


RESUMED_ROWS = [
    row(
        "starting-before-create",
        starting(),
        ev.Resumed(),
        (),
        (cmd.StartContainer(),),
        unchanged=True,
    ),
    row("starting-with-container", starting(container_id=CUR), ev.Resumed(), unchanged=True),
    row("running", running(), ev.Resumed(), unchanged=True),
    row("stopped", stopped(container_id=None), ev.Resumed(), unchanged=True),
]


@pytest.mark.parametrize("r", RESUMED_ROWS)
def test_resumed_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


def unhealthy(failures: int, detail: str = "") -> str:
    return f"unhealthy: {failures} failed health checks" + (f" ({detail})" if detail else "")


LIVENESS_ROWS = [
    row(
        "ok-resets-count",
        running(liveness_failures=2),
        ev.LivenessProbed(CUR, ok=True),
        fields={"liveness_failures": 0},
    ),
    row("ok-when-healthy", running(), ev.LivenessProbed(CUR, ok=True), unchanged=True),
    row(
        "first-failure-counted",
        running(),
        ev.LivenessProbed(CUR, ok=False),
        fields={"liveness_failures": 1},
    ),
    row(
        "second-failure-counted",
        idle(liveness_failures=1),
        ev.LivenessProbed(CUR, ok=False, detail="timeout"),
        fields={"liveness_failures": 2},
    ),
    row(
        "third-failure-crash",
        running(liveness_failures=2),
        ev.LivenessProbed(CUR, ok=False, detail="HTTP 503"),
        ((S.CRASHED, unhealthy(3, "HTTP 503")), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR),),
        fields={**CRASHED_OUT, "last_exit": ExitInfo(error=unhealthy(3, "HTTP 503"))},
    ),
    row(
        "idle-third-failure-crash",
        idle(liveness_failures=2),
        ev.LivenessProbed(CUR, ok=False),
        ((S.CRASHED, unhealthy(3)), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR),),
    ),
    row(
        "single-failure-policy",
        running(),
        ev.LivenessProbed(CUR, ok=False),
        ((S.CRASHED, unhealthy(1)), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR),),
        policy=POLICY.model_copy(update=dict(liveness_failures=1)),
    ),
    row(
        "starting-ignored",
        starting(container_id=CUR),
        ev.LivenessProbed(CUR, ok=False),
        unchanged=True,
    ),
    row("paused-ignored", paused(), ev.LivenessProbed(CUR, ok=False), unchanged=True),
    row(
        "stale-container",
        running(liveness_failures=2),
        ev.LivenessProbed(OLD, ok=False),
        unchanged=True,
    ),
]


@pytest.mark.parametrize("r", LIVENESS_ROWS)
def test_liveness_probe_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


HEALTHCHECK_ROWS = [
    row(
        "running-unhealthy-crash",
        running(),
        ev.HealthcheckReported(CUR, healthy=False),
        ((S.CRASHED, HEALTHCHECK_FAILED), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR),),
        fields={**CRASHED_OUT, "last_exit": ExitInfo(error=HEALTHCHECK_FAILED)},
    ),
    row(
        "idle-unhealthy-crash",
        idle(liveness_failures=1),
        ev.HealthcheckReported(CUR, healthy=False),
        ((S.CRASHED, HEALTHCHECK_FAILED), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR),),
        fields={"liveness_failures": 0, "container_id": None},
    ),
    row(
        "starting-unhealthy-crash",
        starting(container_id=CUR),
        ev.HealthcheckReported(CUR, healthy=False),
        ((S.CRASHED, HEALTHCHECK_FAILED), restart_in(1, 10)),
        (cmd.RemoveContainer(CUR),),
    ),
    row(
        "library-restarts-at-once",
        running(),
        ev.HealthcheckReported(CUR, healthy=False),
        ((S.CRASHED, HEALTHCHECK_FAILED), (S.STARTING, "restart 1 of 1")),
        (cmd.RemoveContainer(CUR), cmd.StartContainer()),
        policy=LIBRARY,
        fields={"restart_count": 1, "container_id": None, "url": None},
    ),
    row(
        "library-second-time-failed",
        running(restart_count=1),
        ev.HealthcheckReported(CUR, healthy=False),
        (
            (S.CRASHED, HEALTHCHECK_FAILED),
            (S.FAILED, f"gave up after 1 restarts: {HEALTHCHECK_FAILED}"),
        ),
        (
            cmd.RemoveContainer(CUR),
            cmd.Notify(
                "agent.failed",
                failed_payload(ExitInfo(error=HEALTHCHECK_FAILED), HEALTHCHECK_FAILED, 1, of=1),
            ),
        ),
        policy=LIBRARY,
    ),
    row("healthy-ignored", running(), ev.HealthcheckReported(CUR, healthy=True), unchanged=True),
    row(
        "paused-ignored",
        paused(),
        ev.HealthcheckReported(CUR, healthy=False),
        unchanged=True,
    ),
    row(
        "stopping-ignored",
        running(expected_exit=True),
        ev.HealthcheckReported(CUR, healthy=False),
        unchanged=True,
    ),
    row(
        "stopped-ignored",
        stopped(),
        ev.HealthcheckReported(CUR, healthy=False),
        unchanged=True,
    ),
    row(
        "stale-container",
        running(),
        ev.HealthcheckReported(OLD, healthy=False),
        unchanged=True,
    ),
]


@pytest.mark.parametrize("r", HEALTHCHECK_ROWS)
def test_healthcheck_report_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


# -- activity and time -----------------------------------------------------------------

ACTIVITY_ROWS = [
    row(
        "idle-back-to-running",
        idle(),
        ev.Activity(),
        ((S.RUNNING, "activity"),),
        fields={"last_activity_at": NOW},
    ),
    row("running-refreshed", running(), ev.Activity(), fields={"last_activity_at": NOW}),
    row("paused-refreshed-not-woken", paused(), ev.Activity(), fields={"last_activity_at": NOW}),
    row("stopped-refreshed", stopped(), ev.Activity(), fields={"last_activity_at": NOW}),
]


@pytest.mark.parametrize("r", ACTIVITY_ROWS)
def test_activity_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


IDLE_STOPPED = {"expected_exit": True, "url": None, "running_since": None, "container_id": CUR}

TICK_ROWS = [
    row(
        "restart-due",
        restarting(restart_at=NOW),
        ev.Tick(),
        ((S.STARTING, "restart 1"),),
        (cmd.StartContainer(),),
        fields={"restart_at": None, "restart_count": 1, "expected_exit": False},
    ),
    row("restart-not-yet-due", restarting(restart_at=NOW + 0.5), ev.Tick(), unchanged=True),
    row(
        "running-marked-idle",
        running(last_activity_at=NOW - 30.0),
        ev.Tick(),
        ((S.IDLE, "no activity"),),
    ),
    row(
        "running-not-quiet-enough", running(last_activity_at=NOW - 29.9), ev.Tick(), unchanged=True
    ),
    row(
        "running-past-idle-timeout-stopped",
        running(last_activity_at=NOW - 1800.0),
        ev.Tick(),
        ((S.STOPPED, "idle timeout"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields=IDLE_STOPPED,
    ),
    row(
        "idle-timeout-stop",
        idle(last_activity_at=NOW - 1800.0),
        ev.Tick(),
        ((S.STOPPED, "idle timeout"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields=IDLE_STOPPED,
    ),
    row("idle-before-timeout", idle(last_activity_at=NOW - 1799.0), ev.Tick(), unchanged=True),
    row(
        "idle-timeout-pause",
        idle(last_activity_at=NOW - 1800.0),
        ev.Tick(),
        ((S.PAUSED, "idle timeout"),),
        (cmd.PauseContainer(CUR),),
        policy=PAUSING,
        fields={"url": None, "container_id": CUR, "expected_exit": False},
    ),
    row(
        "paused-idle-timeout-stop",
        paused(last_activity_at=NOW - 1800.0),
        ev.Tick(),
        ((S.STOPPED, "idle timeout"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields=IDLE_STOPPED,
    ),
    row(
        "paused-idle-timeout-pause-stays",
        paused(last_activity_at=NOW - 5000.0),
        ev.Tick(),
        policy=PAUSING,
        unchanged=True,
    ),
    row(
        "idle-pause-after",
        idle(last_activity_at=NOW - 300.0),
        ev.Tick(),
        ((S.PAUSED, "idle: pause_after"),),
        (cmd.PauseContainer(CUR),),
        policy=POLICY.model_copy(update=dict(pause_after=300.0)),
    ),
    row(
        "idle-before-pause-after",
        idle(last_activity_at=NOW - 299.0),
        ev.Tick(),
        policy=POLICY.model_copy(update=dict(pause_after=300.0)),
        unchanged=True,
    ),
    row(
        "paused-after-pause-after-waits-for-timeout",
        paused(last_activity_at=NOW - 1000.0),
        ev.Tick(),
        policy=POLICY.model_copy(update=dict(pause_after=300.0)),
        unchanged=True,
    ),
    row(
        "idle-mark-capped-by-pause-after",
        running(last_activity_at=NOW - 20.0),
        ev.Tick(),
        ((S.PAUSED, "idle: pause_after"),),
        (cmd.PauseContainer(CUR),),
        policy=POLICY.model_copy(update=dict(pause_after=20.0)),
    ),
    row(
        "idle-mark-capped-by-idle-timeout",
        running(last_activity_at=NOW - 10.0),
        ev.Tick(),
        ((S.STOPPED, "idle timeout"),),
        (cmd.StopContainer(CUR, 10.0),),
        policy=POLICY.model_copy(update=dict(idle_timeout=10.0)),
    ),
    row(
        "busy-idle-back-to-running",
        idle(last_activity_at=NOW - 1000.0),
        ev.Tick(busy=True),
        ((S.RUNNING, "activity"),),
        fields={"last_activity_at": NOW},
    ),
    row(
        "busy-running-refreshed",
        running(last_activity_at=NOW - 5000.0),
        ev.Tick(busy=True),
        fields={"last_activity_at": NOW},
    ),
    row(
        "busy-paused-refreshed",
        paused(last_activity_at=NOW - 5000.0),
        ev.Tick(busy=True),
        fields={"last_activity_at": NOW},
    ),
    row(
        "idling-disabled",
        running(last_activity_at=NOW - 100_000.0),
        ev.Tick(),
        policy=POLICY.model_copy(update=dict(idle_timeout=0.0, pause_after=60.0)),
        unchanged=True,
    ),
    row(
        "no-activity-yet-counts-from-state-since",
        running(last_activity_at=None, state_since=NOW - 30.0),
        ev.Tick(),
        ((S.IDLE, "no activity"),),
    ),
    row(
        "running-without-container",
        running(container_id=None, last_activity_at=NOW - 5000.0),
        ev.Tick(),
        unchanged=True,
    ),
    row("starting-ignored", starting(last_activity_at=NOW - 5000.0), ev.Tick(), unchanged=True),
    row("stopped-ignored", stopped(last_activity_at=NOW - 5000.0), ev.Tick(), unchanged=True),
    row("failed-ignored", failed(), ev.Tick(busy=True), unchanged=True),
    row("created-ignored", created(), ev.Tick(), unchanged=True),
]


@pytest.mark.parametrize("r", TICK_ROWS)
def test_tick_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


# -- the engine's bad days ------------------------------------------------------------------

ENGINE_WAIT = "engine unavailable: "
WAITING = {"restart_at": None, "container_id": None, "url": None}

ENGINE_ROWS = [
    row(
        "start-failed-engine-down-waits-uncounted",
        starting(container_id=CUR, restart_count=2),
        ev.StartFailed(CUR, "Docker is not reachable", engine_down=True),
        ((S.RESTARTING, ENGINE_WAIT + "Docker is not reachable"),),
        fields={
            **WAITING,
            "restart_count": 2,
            "last_error": ENGINE_WAIT + "Docker is not reachable",
        },
    ),
    row(
        "start-failed-engine-down-even-at-the-limit",
        starting(restart_count=3),
        ev.StartFailed(None, "refused", engine_down=True),
        ((S.RESTARTING, ENGINE_WAIT + "refused"),),
        fields={**WAITING, "restart_count": 3},
    ),
    row(
        "exit-as-engine-goes-down-waits-uncounted",
        running(restart_count=3),
        ev.ContainerExited(CUR, CRASH, engine_down=True),
        ((S.RESTARTING, ENGINE_WAIT + "the engine went down as the container exited"),),
        fields={**WAITING, "restart_count": 3, "last_exit": at_cur(CRASH)},
    ),
    row(
        "exit-as-engine-goes-down-of-a-stopped-agent-is-just-recorded",
        stopped(expected_exit=True),
        ev.ContainerExited(CUR, CLEAN, engine_down=True),
        fields={"expected_exit": False},
    ),
    row(
        "recovered-starts-who-waited",
        restarting(restart_at=None),
        ev.EngineRecovered(),
        ((S.STARTING, "engine recovered"),),
        (cmd.StartContainer(),),
    ),
    row("recovered-leaves-backoff-alone", restarting(), ev.EngineRecovered(), unchanged=True),
    row("recovered-leaves-running-alone", running(), ev.EngineRecovered(), unchanged=True),
    row("recovered-leaves-stopped-alone", stopped(), ev.EngineRecovered(), unchanged=True),
    row(
        "observed-exited-after-outage-restarts-uncounted",
        running(restart_count=1),
        ev.ContainerObserved(CUR, "exited", CRASH, after_outage=True),
        ((S.STARTING, "container ended while the engine was down"),),
        (cmd.StartContainer(replace=CUR),),
        fields={"restart_count": 1, "container_id": None},
    ),
    row(
        "observed-exited-after-outage-stopped-by-request-stays",
        running(expected_exit=True),
        ev.ContainerObserved(CUR, "exited", CLEAN, after_outage=True),
        fields={"expected_exit": False},
    ),
    row(
        "vanished-after-outage-restarts-uncounted",
        running(restart_count=1),
        ev.ContainerVanished(CUR, after_outage=True),
        ((S.STARTING, "container vanished while the engine was down"),),
        (cmd.StartContainer(),),
        fields={"restart_count": 1},
    ),
    row(
        "exit-blamed-gives-the-restart-back",
        restarting(restart_count=2, last_exit=at_cur(CRASH)),
        ev.ExitBlamedOnEngine(CUR, restart_count=1),
        (),  # restarting already: it now waits for the engine, not for a deadline
        fields={
            **WAITING,
            "restart_count": 1,
            "last_error": ENGINE_WAIT + "the engine went down right after the container exited",
        },
    ),
    row(
        "exit-blamed-cancels-the-restart-under-way",
        starting(restart_count=1, last_exit=at_cur(CRASH)),
        ev.ExitBlamedOnEngine(CUR, restart_count=0),
        ((S.RESTARTING, ENGINE_WAIT + "the engine went down right after the container exited"),),
        (cmd.CancelStart(),),
        fields={**WAITING, "restart_count": 0},
    ),
    row(
        "exit-blamed-clean-exit-lets-its-container-go",
        stopped(last_exit=at_cur(CLEAN)),
        ev.ExitBlamedOnEngine(CUR, restart_count=0),
        ((S.RESTARTING, ENGINE_WAIT + "the engine went down right after the container exited"),),
        fields=WAITING,
    ),
    row(
        "exit-blamed-for-another-container-is-stale",
        restarting(last_exit=at_cur(CRASH)),
        ev.ExitBlamedOnEngine(OLD, restart_count=0),
        unchanged=True,
    ),
    row(
        "exit-blamed-while-running-again-changes-nothing",
        running(last_exit=at_cur(CRASH)),
        ev.ExitBlamedOnEngine(CUR, restart_count=0),
        unchanged=True,
    ),
]


@pytest.mark.parametrize("r", ENGINE_ROWS)
def test_engine_outage_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


# -- node loss and backends without pause -------------------------------------------------

MOVED = "node 198.19.0.12 went down; starting again on another node"

NODE_ROWS = [
    row(
        "running-moves-uncounted",
        running(restart_count=2),
        ev.NodeLost(CUR, "198.19.0.12"),
        ((S.STARTING, MOVED),),
        (
            cmd.StartContainer(replace=CUR),
            cmd.Notify("agent.moved", {"agent": "echo", "node": "198.19.0.12", "reason": MOVED}),
        ),
        fields={
            "restart_count": 2,
            "container_id": None,
            "url": None,
            "running_since": None,
            "last_error": "node 198.19.0.12 went down",
        },
    ),
    row(
        "running-at-the-limit-still-moves",
        running(restart_count=3),
        ev.NodeLost(CUR, "198.19.0.12"),
        ((S.STARTING, MOVED),),
        (
            cmd.StartContainer(replace=CUR),
            cmd.Notify("agent.moved", {"agent": "echo", "node": "198.19.0.12", "reason": MOVED}),
        ),
        fields={"restart_count": 3},
    ),
    row(
        "idle-moves",
        idle(),
        ev.NodeLost(CUR, "198.19.0.12"),
        ((S.STARTING, MOVED),),
        (
            cmd.StartContainer(replace=CUR),
            cmd.Notify("agent.moved", {"agent": "echo", "node": "198.19.0.12", "reason": MOVED}),
        ),
    ),
    row(
        "starting-cancels-and-moves",
        starting(container_id=CUR, restart_count=1),
        ev.NodeLost(CUR, "198.19.0.12"),
        (),  # starting already: the start begins again, elsewhere
        (
            cmd.CancelStart(),
            cmd.StartContainer(replace=CUR),
            cmd.Notify("agent.moved", {"agent": "echo", "node": "198.19.0.12", "reason": MOVED}),
        ),
        fields={"restart_count": 1, "container_id": None},
    ),
    row(
        "nameless-node-is-its-node",
        running(),
        ev.NodeLost(CUR),
        ((S.STARTING, "its node went down; starting again on another node"),),
        (
            cmd.StartContainer(replace=CUR),
            cmd.Notify(
                "agent.moved",
                {
                    "agent": "echo",
                    "node": "",
                    "reason": "its node went down; starting again on another node",
                },
            ),
        ),
    ),
    row(
        "paused-is-stopped",
        paused(),
        ev.NodeLost(CUR, "n2"),
        ((S.STOPPED, "node n2 went down while paused"),),
        (cmd.RemoveContainer(CUR),),
        fields={"container_id": None},
    ),
    row(
        "stopping-by-request-stays-stopped",
        running(expected_exit=True),
        ev.NodeLost(CUR, "n2"),
        unchanged=True,
    ),
    row("stopped-unchanged", stopped(), ev.NodeLost(CUR, "n2"), unchanged=True),
    row("another-container-is-stale", running(), ev.NodeLost(OLD, "n2"), unchanged=True),
    row("restarting-unchanged", restarting(container_id=None), ev.NodeLost(CUR), unchanged=True),
    row("failed-unchanged", failed(container_id=CUR), ev.NodeLost(CUR), unchanged=True),
]


@pytest.mark.parametrize("r", NODE_ROWS)
def test_node_lost_follows_table_when_in_each_state(r: Row) -> None:
    check(r)


NO_PAUSE_ROWS = [
    row(
        "pause-request-refused",
        running(),
        ev.PauseRequested(),
        rejected=True,
        policy=NO_PAUSE,
        unchanged=True,
    ),
    row(
        "idle-action-pause-stops-instead",
        idle(last_activity_at=NOW - 1800.0),
        ev.Tick(),
        ((S.STOPPED, "idle timeout"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields={"expected_exit": True, "url": None},
        policy=PAUSING_NO_PAUSE,
    ),
    row(
        "pause-after-step-skipped",
        idle(last_activity_at=NOW - 400.0),
        ev.Tick(),
        unchanged=True,
        policy=without_pause(POLICY.model_copy(update=dict(pause_after=300.0))),
    ),
    row(
        "pause-after-idle-timeout-stops",
        idle(last_activity_at=NOW - 1800.0),
        ev.Tick(),
        ((S.STOPPED, "idle timeout"),),
        (cmd.StopContainer(CUR, 10.0),),
        policy=without_pause(PAUSING.model_copy(update=dict(pause_after=300.0))),
    ),
    row(
        "observed-paused-record-is-stopped",
        paused(),
        ev.ContainerObserved(CUR, "running"),
        ((S.STOPPED, "paused, but the backend has no pause"),),
        (cmd.StopContainer(CUR, 10.0),),
        fields={"expected_exit": True},
        policy=NO_PAUSE,
    ),
]


@pytest.mark.parametrize("r", NO_PAUSE_ROWS)
def test_backend_without_pause_stops_instead_when_the_idle_ladder_would_pause(r: Row) -> None:
    check(r)


ALL_ROWS = [
    *NODE_ROWS,
    *NO_PAUSE_ROWS,
    *ENGINE_ROWS,
    *EXIT_DETAILS_ROWS,
    *START_ROWS,
    *STOP_ROWS,
    *PAUSE_ROWS,
    *RESTART_ROWS,
    *RESET_ROWS,
    *SHUTDOWN_ROWS,
    *CREATED_ROWS,
    *HEALTHY_ROWS,
    *START_FAILED_ROWS,
    *EXITED_ROWS,
    *VANISHED_ROWS,
    *OBSERVED_ROWS,
    *RESUMED_ROWS,
    *LIVENESS_ROWS,
    *HEALTHCHECK_ROWS,
    *ACTIVITY_ROWS,
    *TICK_ROWS,
]


def test_tables_cover_every_event_type_when_collected() -> None:
    covered = {type(p.values[0].event) for p in ALL_ROWS}
    assert covered == set(typing.get_args(ev.Event))


# -- next_deadline ---------------------------------------------------------------------

DEADLINE_ROWS = [
    pytest.param(restarting(restart_at=NOW + 7.0), POLICY, 7.0, id="restarting-restart-at"),
    pytest.param(running(last_activity_at=NOW), POLICY, 30.0, id="running-idle-mark"),
    pytest.param(
        running(last_activity_at=NOW),
        POLICY.model_copy(update=dict(idle_mark_after=100.0, idle_timeout=50.0)),
        50.0,
        id="running-mark-capped-by-timeout",
    ),
    pytest.param(
        running(last_activity_at=NOW),
        POLICY.model_copy(update=dict(idle_mark_after=100.0, pause_after=40.0)),
        40.0,
        id="running-mark-capped-by-pause-after",
    ),
    pytest.param(idle(last_activity_at=NOW), POLICY, 1800.0, id="idle-timeout"),
    pytest.param(
        idle(last_activity_at=NOW),
        POLICY.model_copy(update=dict(pause_after=300.0)),
        300.0,
        id="idle-pause-after",
    ),
    pytest.param(paused(last_activity_at=NOW), POLICY, 1800.0, id="paused-then-stopped"),
    pytest.param(paused(last_activity_at=NOW), PAUSING, None, id="paused-stays-paused"),
    pytest.param(
        idle(last_activity_at=NOW),
        without_pause(POLICY.model_copy(update=dict(pause_after=300.0))),
        1800.0,
        id="no-pause-skips-pause-after",
    ),
    pytest.param(
        running(last_activity_at=NOW),
        without_pause(POLICY.model_copy(update=dict(idle_mark_after=100.0, pause_after=40.0))),
        100.0,
        id="no-pause-mark-not-capped-by-pause-after",
    ),
    pytest.param(
        paused(last_activity_at=NOW), PAUSING_NO_PAUSE, 1800.0, id="no-pause-paused-is-stopped"
    ),
    pytest.param(
        running(last_activity_at=None, state_since=NOW),
        POLICY,
        30.0,
        id="no-activity-counts-from-state-since",
    ),
    pytest.param(
        running(last_activity_at=NOW),
        POLICY.model_copy(update=dict(idle_timeout=0.0)),
        None,
        id="idling-disabled",
    ),
    pytest.param(running(container_id=None, last_activity_at=NOW), POLICY, None, id="no-container"),
    pytest.param(restarting(restart_at=None), POLICY, None, id="restarting-without-restart-at"),
    pytest.param(starting(), POLICY, None, id="starting"),
    pytest.param(stopped(), POLICY, None, id="stopped"),
    pytest.param(failed(), POLICY, None, id="failed"),
    pytest.param(created(), POLICY, None, id="created"),
]


@pytest.mark.parametrize(("before", "policy", "offset"), DEADLINE_ROWS)
def test_next_deadline_follows_table_when_in_each_state(
    before: AgentRecord, policy: CorePolicy, offset: float | None
) -> None:
    deadline = next_deadline(before, policy)
    if offset is None:
        assert deadline is None
    else:
        assert deadline == NOW + offset


# -- short stories ---------------------------------------------------------------------


def apply(
    before: AgentRecord, events: list[ev.Event], *, policy: Policy, step: float = 1.0
) -> tuple[AgentRecord, list[Decision]]:
    """Feed events one second apart; return the final record and every decision."""
    now = NOW
    decisions = []
    current = before
    for event in events:
        now += step
        decision = transition(current, event, now=now, policy=policy)
        decisions.append(decision)
        current = decision.record
    return current, decisions


def notifications(decisions: list[Decision]) -> list[cmd.Notify]:
    return [c for d in decisions for c in d.commands if isinstance(c, cmd.Notify)]


def test_library_policy_restarts_once_then_fails_when_agent_exits_twice() -> None:
    events: list[ev.Event] = [
        ev.StartRequested(),
        ev.ContainerCreated("c1"),
        ev.BecameHealthy("c1", URL),
        ev.ContainerExited("c1", CRASH),  # one restart, at once
        ev.ContainerCreated("c2"),
        ev.BecameHealthy("c2", URL),
        ev.ContainerExited("c2", CRASH),  # second exit: failed
    ]
    final, decisions = apply(created(), events, policy=LIBRARY)
    assert final.state is S.FAILED
    assert final.restart_count == 1
    assert [d.record.state for d in decisions] == [
        S.STARTING,
        S.STARTING,
        S.RUNNING,
        S.STARTING,
        S.STARTING,
        S.RUNNING,
        S.FAILED,
    ]
    [notice] = notifications(decisions)
    assert notice.kind == "agent.failed"
    assert notice.payload["agent"] == "echo"
    assert notice.payload["exit_code"] == 1
    assert notice.payload["oom_killed"] is False
    assert notice.payload["log_tail"] == "Traceback: boom"
    assert notice.payload["restart_count"] == 1


def test_crash_loop_backs_off_then_fails_and_reset_clears_when_agent_keeps_crashing() -> None:
    current = running(container_id="c0")
    now = NOW
    delays = []
    all_decisions: list[Decision] = []
    for n in range(4):
        d = transition(current, ev.ContainerExited(f"c{n}", OOM), now=now, policy=POLICY)
        all_decisions.append(d)
        current = d.record
        if current.state is S.FAILED:
            break
        assert current.restart_at is not None
        delays.append(current.restart_at - now)
        now = current.restart_at
        d = transition(current, ev.Tick(), now=now, policy=POLICY)
        assert d.record.state is S.STARTING
        assert d.commands == (cmd.StartContainer(),)
        for event in (ev.ContainerCreated(f"c{n + 1}"), ev.BecameHealthy(f"c{n + 1}", URL)):
            now += 1.0
            d = transition(d.record, event, now=now, policy=POLICY)
        current = d.record
        assert current.state is S.RUNNING
        now += 1.0
    assert delays == [10.0, 20.0, 40.0]
    assert current.state is S.FAILED
    assert current.restart_count == 3
    [notice] = notifications(all_decisions)
    assert notice.payload["oom_killed"] is True
    assert notice.payload["exit_code"] == 137
    assert notice.payload["restart_count"] == 3
    # Only reset leaves failed; then a start works again.
    for refused in (ev.StartRequested(), ev.RestartRequested(), ev.PauseRequested()):
        assert transition(current, refused, now=now, policy=POLICY).rejected is not None
    cleared = transition(current, ev.ResetRequested(), now=now, policy=POLICY).record
    assert (cleared.state, cleared.restart_count) == (S.STOPPED, 0)
    started = transition(cleared, ev.StartRequested(), now=now, policy=POLICY)
    assert started.record.state is S.STARTING
    assert started.commands == (cmd.StartContainer(),)


@pytest.mark.parametrize(
    "request_event",
    [ev.StopRequested(), ev.ShutdownRequested(), ev.RestartRequested()],
    ids=["stop", "shutdown", "restart"],
)
def test_exit_roost_caused_is_never_a_crash_when_a_wake_comes_before_the_exit(
    request_event: ev.Event,
) -> None:
    """The reactor may process a wake before the ``die`` event of the stop it
    asked for; that late exit must not be read as a crash of the new start."""
    final, decisions = apply(
        running(),
        [
            request_event,
            ev.StartRequested("message"),
            ev.ContainerExited(CUR, ExitInfo(exit_code=143)),
        ],
        policy=POLICY,
    )
    assert all(c.to_state is not S.CRASHED for d in decisions for c in d.changes)
    assert final.state is S.STARTING
    assert final.restart_count == 0


def test_paused_agent_is_not_restarted_when_its_container_is_killed() -> None:
    final, decisions = apply(
        running(),
        [ev.PauseRequested(), ev.ContainerExited(CUR, ExitInfo(exit_code=137))],
        policy=POLICY,
    )
    assert final.state is S.STOPPED
    assert not any(isinstance(c, cmd.StartContainer) for d in decisions for c in d.commands)
    woken = transition(final, ev.StartRequested(), now=NOW + 10, policy=POLICY)
    assert woken.record.state is S.STARTING
    assert woken.commands == (cmd.StartContainer(),)


def test_overtaken_start_failure_is_not_counted_twice_when_exit_already_crashed_it() -> None:
    """Exit during startup and the start procedure's own failure report describe
    one crash; with no backoff the second report must not count a second one."""
    final, _ = apply(
        starting(container_id=CUR),
        [ev.ContainerExited(CUR, CRASH), ev.StartFailed(CUR, "container exited during startup")],
        policy=LIBRARY,
    )
    assert final.state is S.STARTING
    assert final.restart_count == 1

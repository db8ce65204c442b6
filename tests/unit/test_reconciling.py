"""Table tests for ``roost.core.reconciling.plan_reconcile``.

Rules (DESIGN.md, "Runtime contract"): adopt this instance's labelled
containers that match a record (same id → ``ContainerObserved``, never a
restart), remove this instance's orphans, never touch unlabelled containers or
another instance's, leave job containers to the job runner, mark agents whose
container vanished, resume agents caught mid-start, keep paused ones paused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest

from roost.config import LifecycleSettings as Policy
from roost.core import commands as cmd
from roost.core import events as ev
from roost.core.labels import AGENT, CONFIG_HASH, INSTANCE, JOB, MANAGED, agent_labels
from roost.core.reconciling import Observed, ReconcilePlan, plan_reconcile
from roost.core.records import AgentRecord, ExitInfo
from roost.core.states import AgentState
from roost.core.transition import transition

S = AgentState
ME = "inst-a"
OTHER = "inst-b"
NOW = 30_000.0


def ours(agent: str) -> dict[str, str]:
    return agent_labels(ME, agent, "h1")


def agent(name: str, state: AgentState, container_id: str | None) -> AgentRecord:
    return AgentRecord(name=name, state=state, container_id=container_id, state_since=NOW - 100)


@dataclasses.dataclass(frozen=True)
class Case:
    records: Mapping[str, AgentRecord]
    containers: tuple[Observed, ...]
    events: tuple[tuple[str, ev.Event], ...] = ()
    orphans: tuple[str, ...] = ()


def case(id_: str, records: list[AgentRecord], containers: list[Observed], **kw: object) -> object:
    by_name = {r.name: r for r in records}
    return pytest.param(Case(by_name, tuple(containers), **kw), id=id_)  # type: ignore[arg-type]


EXIT = ExitInfo(exit_code=1, finished_at="2024-01-01T00:00:00Z")

CASES = [
    case("empty", [], []),
    case(
        "adopt-running",
        [agent("echo", S.RUNNING, "c1")],
        [Observed("c1", ours("echo"), "running")],
        events=(("echo", ev.ContainerObserved("c1", "running")),),
    ),
    case(
        "adopt-exited-with-exit-info",
        [agent("echo", S.RUNNING, "c1")],
        [Observed("c1", ours("echo"), "exited", EXIT)],
        events=(("echo", ev.ContainerObserved("c1", "exited", EXIT)),),
    ),
    case(
        "adopt-paused",
        [agent("echo", S.PAUSED, "c1")],
        [Observed("c1", ours("echo"), "paused")],
        events=(("echo", ev.ContainerObserved("c1", "paused")),),
    ),
    case(
        "orphan-of-unknown-agent-removed",
        [],
        [Observed("c9", ours("ghost"), "running")],
        orphans=("c9",),
    ),
    case(
        "orphan-without-agent-label-removed",
        [],
        [Observed("c9", {MANAGED: "true", INSTANCE: ME}, "exited")],
        orphans=("c9",),
    ),
    case(
        "older-container-of-known-agent-removed",
        [agent("echo", S.RUNNING, "c2")],
        [Observed("c1", ours("echo"), "exited"), Observed("c2", ours("echo"), "running")],
        events=(("echo", ev.ContainerObserved("c2", "running")),),
        orphans=("c1",),
    ),
    case(
        "container-of-agent-that-has-none-removed",
        [agent("echo", S.STOPPED, None)],
        [Observed("c1", ours("echo"), "running")],
        orphans=("c1",),
    ),
    case(
        "other-instance-ignored",
        [],
        [Observed("c9", agent_labels(OTHER, "echo", "h1"), "running")],
    ),
    case(
        "other-instance-same-id-not-adopted",
        [agent("echo", S.RUNNING, "c1")],
        [Observed("c1", agent_labels(OTHER, "echo", "h1"), "running")],
        events=(("echo", ev.ContainerVanished("c1")),),
    ),
    case("unlabelled-ignored", [], [Observed("c9", {}, "running")]),
    case(
        "foreign-labels-ignored",
        [],
        [Observed("c9", {"com.docker.compose.project": "x", AGENT: "echo"}, "running")],
    ),
    case(
        "managed-false-ignored",
        [],
        [Observed("c9", {MANAGED: "false", INSTANCE: ME, AGENT: "echo"}, "running")],
    ),
    case(
        "instance-label-missing-ignored",
        [],
        [Observed("c9", {MANAGED: "true", AGENT: "echo"}, "running")],
    ),
    case(
        "job-container-left-to-job-runner",
        [],
        [Observed("j1", {MANAGED: "true", INSTANCE: ME, JOB: "job-1", CONFIG_HASH: "h"}, "exited")],
    ),
    case(
        "vanished",
        [agent("echo", S.RUNNING, "c1")],
        [],
        events=(("echo", ev.ContainerVanished("c1")),),
    ),
    case(
        "vanished-while-paused",
        [agent("echo", S.PAUSED, "c1")],
        [Observed("c2", ours("other-agent"), "running")],
        events=(("echo", ev.ContainerVanished("c1")),),
        orphans=("c2",),
    ),
    case(
        "starting-without-container-resumed",
        [agent("echo", S.STARTING, None)],
        [],
        events=(("echo", ev.Resumed()),),
    ),
    case(
        "starting-with-container-observed-not-resumed",
        [agent("echo", S.STARTING, "c1")],
        [Observed("c1", ours("echo"), "created")],
        events=(("echo", ev.ContainerObserved("c1", "created")),),
    ),
    case("stopped-without-container-left-alone", [agent("echo", S.STOPPED, None)], []),
    case("failed-without-container-left-alone", [agent("echo", S.FAILED, None)], []),
    case(
        "several-agents",
        [
            agent("a", S.RUNNING, "ca"),
            agent("b", S.IDLE, "cb"),
            agent("c", S.STARTING, None),
            agent("d", S.STOPPED, "cd"),
        ],
        [
            Observed("cb", ours("b"), "running"),
            Observed("x1", {}, "running"),
            Observed("ca", ours("a"), "running"),
            Observed("x2", ours("zombie"), "dead"),
            Observed("x3", agent_labels(OTHER, "a", "h1"), "running"),
        ],
        events=(
            ("b", ev.ContainerObserved("cb", "running")),
            ("a", ev.ContainerObserved("ca", "running")),
            ("c", ev.Resumed()),
            ("d", ev.ContainerVanished("cd")),
        ),
        orphans=("x2",),
    ),
]


@pytest.mark.parametrize("c", CASES)
def test_plan_follows_table_when_comparing_records_with_docker(c: Case) -> None:
    plan = plan_reconcile(c.records, c.containers, instance=ME)
    assert plan == ReconcilePlan(c.events, c.orphans)


def test_orphans_are_only_this_instances_labelled_containers_when_planned() -> None:
    containers = [
        Observed("mine", ours("ghost"), "running"),
        Observed("theirs", agent_labels(OTHER, "ghost", "h1"), "running"),
        Observed("plain", {}, "running"),
        Observed("job", {**ours("ghost"), JOB: "j"}, "running"),
    ]
    plan = plan_reconcile({}, containers, instance=ME)
    assert plan.orphans == ("mine",)
    for orphan in plan.orphans:
        labels = next(c.labels for c in containers if c.container_id == orphan)
        assert labels[MANAGED] == "true"
        assert labels[INSTANCE] == ME


# -- the plan fed to transition: what reconcile does to each agent -----------------------


def reconcile_commands(
    record: AgentRecord, container: Observed
) -> tuple[AgentRecord, list[cmd.Command]]:
    plan = plan_reconcile({record.name: record}, [container], instance=ME)
    assert plan.orphans == ()
    commands: list[cmd.Command] = []
    for name, event in plan.events:
        assert name == record.name
        decision = transition(record, event, now=NOW, policy=Policy())
        record = decision.record
        commands.extend(decision.commands)
    return record, commands


def test_adopted_container_keeps_running_without_restart_when_ids_match() -> None:
    before = agent("echo", S.RUNNING, "c1")
    after, commands = reconcile_commands(before, Observed("c1", ours("echo"), "running"))
    assert commands == []
    assert after == before


def test_paused_container_stays_paused_when_adopted() -> None:
    before = agent("echo", S.PAUSED, "c1")
    after, commands = reconcile_commands(before, Observed("c1", ours("echo"), "paused"))
    assert commands == []
    assert after.state is S.PAUSED


def test_paused_agent_is_paused_again_when_its_container_was_unpaused() -> None:
    before = agent("echo", S.PAUSED, "c1")
    after, commands = reconcile_commands(before, Observed("c1", ours("echo"), "running"))
    assert commands == [cmd.PauseContainer("c1")]
    assert after.state is S.PAUSED


def test_agent_is_marked_when_its_container_vanished() -> None:
    before = agent("echo", S.RUNNING, "c1")
    plan = plan_reconcile({"echo": before}, [], instance=ME)
    [(name, event)] = plan.events
    decision = transition(before, event, now=NOW, policy=Policy())
    assert name == "echo"
    assert decision.record.container_id is None
    assert decision.changes[0].to_state is S.CRASHED
    assert decision.changes[0].reason == "container vanished"


def test_interrupted_start_is_finished_when_starting_agent_has_no_container() -> None:
    before = agent("echo", S.STARTING, None)
    plan = plan_reconcile({"echo": before}, [], instance=ME)
    [(_, event)] = plan.events
    decision = transition(before, event, now=NOW, policy=Policy())
    assert decision.commands == (cmd.StartContainer(),)
    assert decision.record.state is S.STARTING

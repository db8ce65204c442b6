"""Reconcile planning: compare SQLite's intent with what Docker runs. Pure.

Rules (DESIGN.md, "Runtime contract"):
- Only containers labelled ``roost.managed=true`` and ``roost.instance=<ours>`` are
  ever considered; everything else is left alone, whatever it is called.
- A container that backs an agent (same container id as the record) is adopted
  as it is: it gets a ``ContainerObserved`` event, never a restart.
- A labelled agent container that no record owns is an orphan: removed.
  Job containers are left to the job runner.
- A record whose container is missing gets ``ContainerVanished``.
- A record caught mid-start with no container yet gets ``Resumed``.
- ``after_outage``: the engine just came back, so what the listing shows happened
  while it was away; the events say so (the lifecycle does not count those exits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from roost.core import events as ev
from roost.core.labels import AGENT, INSTANCE, JOB, MANAGED
from roost.core.records import AgentRecord, ExitInfo
from roost.core.states import AgentState

__all__ = ["Observed", "ReconcilePlan", "plan_reconcile"]


@dataclasses.dataclass(frozen=True, slots=True)
class Observed:
    container_id: str
    labels: Mapping[str, str]
    status: str
    exit: ExitInfo | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ReconcilePlan:
    events: tuple[tuple[str, ev.Event], ...] = ()
    orphans: tuple[str, ...] = ()


def plan_reconcile(
    records: Mapping[str, AgentRecord],
    containers: Sequence[Observed],
    *,
    instance: str,
    after_outage: bool = False,
) -> ReconcilePlan:
    events: list[tuple[str, ev.Event]] = []
    orphans: list[str] = []
    seen: set[str] = set()
    for c in containers:
        if c.labels.get(MANAGED) != "true" or c.labels.get(INSTANCE) != instance:
            continue  # not ours: never touched
        if JOB in c.labels:
            continue  # the job runner reconciles its own
        name = c.labels.get(AGENT)
        record = records.get(name) if name is not None else None
        if record is not None and record.container_id == c.container_id:
            seen.add(c.container_id)
            events.append(
                (
                    record.name,
                    ev.ContainerObserved(c.container_id, c.status, c.exit, after_outage),
                )
            )
        else:
            orphans.append(c.container_id)
    for name, record in records.items():
        if record.container_id is not None and record.container_id not in seen:
            events.append((name, ev.ContainerVanished(record.container_id, after_outage)))
        elif record.container_id is None and record.state is AgentState.STARTING:
            events.append((name, ev.Resumed()))
    return ReconcilePlan(tuple(events), tuple(orphans))

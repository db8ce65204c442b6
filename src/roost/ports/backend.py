"""The agent backend port: what the supervisor asks of whatever runs its agents.

Role: an agent is backed by one *unit* at a time, which the backend names by an
id (the record's ``container_id``). On a Docker Engine (``EngineBackend``) a
unit is a container; on a Docker Swarm (``SwarmBackend``) it is a service of one
replica, and what runs is its current task, on some node. The supervisor
(``reactor.supervising``) and the agents facade talk to agents only through this
port; jobs keep the container runtime (``ports.runtime``) under it.

The port speaks in the runtime port's plain data: a unit is described as a
container (``ContainerSpec`` to create one, ``ContainerState`` from ``status``,
``ContainerInfo`` from ``list``, ``RuntimeEvent`` from ``observe``), so the
engine backend passes Docker's answers through untouched.

Operations: ``ensure`` (create a unit for a spec), ``wake`` (run it: start,
unpause, scale to one), ``sleep`` (pause or stop it), ``remove``, ``status``,
``endpoint`` (where its port answers), ``logs_tail``/``logs``, ``list`` (what
exists, for reconcile) and ``observe`` (events, with ``gap`` when some may have
been lost).

Invariants every implementation keeps (checked by tests/contract/test_backend_contract.py):
- ``capabilities`` says what the backend can do; the engine above chooses from it
  (the idle ladder pauses only where ``can_pause``; snapshots need ``can_commit``)
  and never asks for what is missing: ``sleep(mode="pause")`` where pause does
  not exist raises ``ContainerError``.
- ``wake`` returns once the unit runs (its process started), never before; a unit
  that cannot run (its task failed or was rejected) raises ``ContainerError``, one
  still not running after ``timeout`` seconds raises ``StartupTimeout``.
- ``sleep(mode="stop")`` returns once the unit no longer runs; it stays there to
  be woken again. ``remove`` and ``sleep`` of a unit that is gone are no-ops.
- ``status`` of a unit that is gone raises ``ContainerNotFound``; its ``status``
  field uses Docker's container words (``created``, ``running``, ``paused``,
  ``exited``, ``dead``); ``running`` is True only while the unit is wanted up and
  its process runs; ``exit`` tells how the last run ended (OOM where the backend
  can know it, else a clear "unknown" in ``error``).
- Errors are Roost's own, as for the runtime: ``DockerUnavailable`` when the engine
  (or the swarm manager) cannot be reached, ``ContainerNotFound``, ``ContainerError``.
- ``observe`` never blocks the engine, reconnects (or re-polls) on its own, yields
  ``lost`` when it cannot reach the engine and ``gap`` once it can again (events
  may have been missed: the caller re-lists). Kinds are the runtime's
  ``CONTAINER_EVENT_KINDS`` (``die`` with ``exit_code``, ``oom``, ``destroy``,
  ``health_status``; no others) plus
  ``node_lost``: the node under the unit went down (``RuntimeEvent.node``).
- Secrets (the agent's token in ``ContainerSpec.env``) never reach labels, names
  or logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Literal, Protocol

from roost.ports.runtime import ContainerInfo, ContainerSpec, ContainerState, RuntimeEvent

__all__ = ["CONTAINER_EVENT_KINDS", "AgentBackend", "Capabilities", "Endpoint", "SleepMode"]

#: The runtime's event kinds ``observe`` reports (a backend may add its own, as
#: ``node_lost``): what the supervisor acts on. The engine backend subscribes to
#: these only, so Docker's other events (``create``, ``start``, ``pause``,
#: ``unpause``, ``kill``, ``stop``, ...) cost Roost nothing; an ``unpause``
#: arrives as the wake it answers returns (bench P2 phases: ~0.3 ms of CPU a wake).
CONTAINER_EVENT_KINDS = frozenset({"die", "oom", "destroy", "health_status"})

#: How an agent sleeps: frozen in place (``pause``) or stopped (``stop``).
SleepMode = Literal["pause", "stop"]


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do that another may not (see README "Docker Swarm")."""

    #: freeze a running unit and thaw it (~15 ms on an engine); the idle ladder's pause.
    can_pause: bool
    #: commit a unit as an image (job snapshots).
    can_commit: bool
    #: the agent's port can be published on the host's loopback only; False: on
    #: every interface of the node the unit runs on.
    publishes_on_loopback: bool
    #: ``no_new_privileges`` is applied (setuid binaries cannot escalate).
    no_new_privileges: bool
    #: swap can be limited (memory-swap equal to memory); False: only memory is.
    limits_swap: bool
    #: an exit always says whether the OOM killer ended it; False: only where the
    #: node's own API is reachable, else it says the OOM flag is unknown.
    reports_oom: bool
    #: a named volume is one and the same for every agent; False: one per node.
    shared_volumes: bool
    #: units run on one of several nodes and may lose theirs (``node_lost``).
    spans_nodes: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a unit's port answers, as Roost reaches it: ``host:port`` is the
    published port; ``own_ip`` is the container's own address on its network
    when the backend knows it (deliveries go there once it answered, skipping
    Docker's port proxy: roost.reactor.addressing), else None."""

    host: str
    port: int
    own_ip: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class AgentBackend(Protocol):
    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def kind(self) -> str:
        """``engine`` or ``swarm`` (``[docker] backend``)."""
        ...

    async def ping(self) -> str:
        """The engine's API version; DockerUnavailable if unreachable."""
        ...

    async def ensure_image(self, image: str, *, pull_timeout: float = 300.0) -> None:
        """Have ``image`` where units can use it: pulled if absent on an engine
        (ImageUnavailable if it cannot be had); nodes of a swarm pull for themselves."""
        ...

    async def ensure(self, spec: ContainerSpec, *, placement: tuple[str, ...] = ()) -> str:
        """Create a unit for ``spec`` (placed by ``placement`` constraints where the
        backend places units) and return its id. It runs once ``wake`` returns. An
        engine never pulls here: ImageUnavailable when the image is absent (the
        supervisor then calls ``ensure_image`` and ensures again)."""
        ...

    async def wake(self, unit_id: str, *, paused: bool = False, timeout: float = 120.0) -> None:
        """Run the unit: start it, or unpause it (``paused``: it was paused by
        ``sleep``), or scale it up; return once it runs (see the module docstring)."""
        ...

    async def sleep(self, unit_id: str, *, mode: SleepMode, grace: float = 10.0) -> None:
        """Pause the unit, or stop it (SIGTERM, ``grace`` seconds, then SIGKILL).
        Gone already: no-op."""
        ...

    async def remove(self, unit_id: str) -> None:
        """Remove the unit, running or not. Gone already: no-op."""
        ...

    async def status(self, unit_id: str) -> ContainerState:
        """What the unit is now; ContainerNotFound if gone."""
        ...

    async def endpoint(self, unit_id: str) -> Endpoint | None:
        """Where the unit's port answers now; None when it publishes none (yet)."""
        ...

    async def logs_tail(self, unit_id: str, *, lines: int = 50) -> str: ...

    def logs(
        self,
        unit_id: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[str]:
        """The unit's output, as ``ContainerRuntime.logs``. ContainerNotFound if gone."""
        ...

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """Every unit carrying all of ``labels``, in any state."""
        ...

    def observe(self, labels: Mapping[str, str]) -> AsyncIterator[RuntimeEvent]:
        """Events of the units carrying ``labels``, forever (see the module docstring)."""
        ...

    async def close(self) -> None: ...

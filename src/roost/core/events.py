"""Events fed to ``transition``: requests, Docker observations and timers.

Events are plain frozen data. A container event always names the container it
is about; an event about a container that no longer backs the agent is stale
and ignored by ``transition``.
"""

from __future__ import annotations

import dataclasses

from roost.core.records import ExitInfo

__all__ = [
    "Activity",
    "BecameHealthy",
    "ContainerCreated",
    "ContainerExited",
    "ContainerObserved",
    "ContainerVanished",
    "EngineRecovered",
    "Event",
    "ExitBlamedOnEngine",
    "ExitDetails",
    "HealthcheckReported",
    "LivenessProbed",
    "NodeLost",
    "PauseRequested",
    "ResetRequested",
    "RestartRequested",
    "Resumed",
    "ShutdownRequested",
    "StartFailed",
    "StartRequested",
    "StopRequested",
    "Tick",
]


@dataclasses.dataclass(frozen=True, slots=True)
class StartRequested:
    """Start or wake the agent (API start/wake, a message, a proxied request)."""

    reason: str = "start"


@dataclasses.dataclass(frozen=True, slots=True)
class StopRequested:
    reason: str = "stop requested"


@dataclasses.dataclass(frozen=True, slots=True)
class PauseRequested:
    reason: str = "pause requested"


@dataclasses.dataclass(frozen=True, slots=True)
class RestartRequested:
    reason: str = "restart requested"


@dataclasses.dataclass(frozen=True, slots=True)
class ResetRequested:
    reason: str = "reset requested"


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownRequested:
    leave_running: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerCreated:
    """The start procedure created this container (before starting it)."""

    container_id: str
    config_hash: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class BecameHealthy:
    container_id: str
    url: str


@dataclasses.dataclass(frozen=True, slots=True)
class StartFailed:
    """The start procedure gave up. ``terminal``: retrying cannot help (no image).
    ``engine_down``: it failed because the Docker engine is unreachable — not the
    agent's fault, so it is not counted against ``max_restarts``."""

    container_id: str | None
    error: str
    exit: ExitInfo | None = None
    terminal: bool = False
    engine_down: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerExited:
    """The container exited. ``engine_down``: the engine stopped answering right
    then (it could not even tell why), so the exit is taken as the engine's."""

    container_id: str
    exit: ExitInfo
    engine_down: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ExitDetails:
    """Diagnostics read from a crashed container before its removal (finished-at,
    OOM flag, error, log tail); they complete ``last_exit`` of that container."""

    container_id: str
    exit: ExitInfo


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerVanished:
    """Reconcile: the agent's container no longer exists in Docker. ``after_outage``:
    found by the reconcile after the engine came back (the engine lost it)."""

    container_id: str
    after_outage: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerObserved:
    """Reconcile: the agent's container exists; ``status`` is Docker's.
    ``after_outage``: found by the reconcile after the engine came back, so an exit
    it shows happened while the engine was away (its restart is not the agent's)."""

    container_id: str
    status: str
    exit: ExitInfo | None = None
    after_outage: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class EngineRecovered:
    """The Docker engine answers again after an outage: starts that waited for it go on."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExitBlamedOnEngine:
    """The engine went down right after this container exited (a daemon stop kills
    its containers): the exit was the engine's, not the agent's. ``restart_count``
    is the agent's count before that exit, which is given back."""

    container_id: str
    restart_count: int


@dataclasses.dataclass(frozen=True, slots=True)
class NodeLost:
    """The node the container runs on went down (a Swarm node marked ``down``): the
    container is out of reach, through no fault of the agent. ``node`` names the
    node (its address or id) for the reason shown."""

    container_id: str
    node: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Resumed:
    """Reconcile: Roost restarted while this agent was starting and had no container yet."""


@dataclasses.dataclass(frozen=True, slots=True)
class LivenessProbed:
    container_id: str
    ok: bool
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class HealthcheckReported:
    """Docker's health status of the container changed: the verdict of the image's
    own HEALTHCHECK, after the retries the image asks for (Docker's
    ``health_status`` event). ``healthy`` False: Docker marked it unhealthy."""

    container_id: str
    healthy: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Activity:
    """Something proved the agent is in use."""


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. ``busy``: activity is in flight right now (streams, leases, deliveries)."""

    busy: bool = False


Event = (
    StartRequested
    | StopRequested
    | PauseRequested
    | RestartRequested
    | ResetRequested
    | ShutdownRequested
    | ContainerCreated
    | BecameHealthy
    | StartFailed
    | ContainerExited
    | ExitDetails
    | ContainerVanished
    | ContainerObserved
    | EngineRecovered
    | ExitBlamedOnEngine
    | NodeLost
    | Resumed
    | LivenessProbed
    | HealthcheckReported
    | Activity
    | Tick
)

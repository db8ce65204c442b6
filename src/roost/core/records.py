"""Frozen data the core reasons about: the agent record and what Docker tells us.

Invariants:
- ``AgentRecord`` is immutable; every change is a new record from ``transition``.
- ``container_id`` is the one container that currently backs the agent, or None.
- ``restart_count`` counts restarts since the last reset (``reset`` or having
  stayed running ``restart_reset_after`` seconds).
- ``expected_exit`` is set when Roost itself asked the container to stop, so the
  exit that follows is never mistaken for a crash.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from roost.core.states import ACTIVE_STATES, AgentState

__all__ = ["AgentRecord", "ExitInfo", "SessionHealth", "StateChange"]


class SessionHealth(enum.StrEnum):
    """Health of an agent's container (library contract)."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STARTING = "starting"
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a container ended (library contract)."""

    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    finished_at: str | None = None
    log_tail: str = ""
    #: the container this exit belongs to (not part of the JSON contract).
    container_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The contract fields (DESIGN.md "Interfaces")."""
        return {
            "exit_code": self.exit_code,
            "oom_killed": self.oom_killed,
            "error": self.error,
            "finished_at": self.finished_at,
        }

    def to_json_with_tail(self) -> dict[str, Any]:
        """The contract fields and the log tail (what the API shows of an exit)."""
        return {**self.to_json(), "log_tail": self.log_tail}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ExitInfo | None:
        if data is None:
            return None
        return cls(
            exit_code=data.get("exit_code"),
            oom_killed=bool(data.get("oom_killed", False)),
            error=str(data.get("error") or ""),
            finished_at=data.get("finished_at"),
            log_tail=str(data.get("log_tail") or ""),
        )

    @property
    def is_clean(self) -> bool:
        """Exit code 0 and not OOM-killed: nobody asked, but nothing went wrong."""
        return self.exit_code == 0 and not self.oom_killed and not self.error


@dataclasses.dataclass(frozen=True, slots=True)
class AgentRecord:
    name: str
    state: AgentState = AgentState.CREATED
    container_id: str | None = None
    url: str | None = None
    config_hash: str = ""
    restart_count: int = 0
    last_exit: ExitInfo | None = None
    last_error: str = ""
    last_activity_at: float | None = None
    state_since: float = 0.0
    running_since: float | None = None
    #: when in ``restarting``: the time the next start is due.
    restart_at: float | None = None
    #: Roost asked the current container to stop/exit; its exit is not a crash.
    expected_exit: bool = False
    #: consecutive failed liveness probes while running.
    liveness_failures: int = 0
    #: optimistic-concurrency version, bumped by the store on every write.
    version: int = 0

    def replace(self, **changes: Any) -> AgentRecord:
        return dataclasses.replace(self, **changes)

    @property
    def awake(self) -> bool:
        """Healthy and reachable: running or idle, with a URL."""
        return self.state in ACTIVE_STATES and self.url is not None


@dataclasses.dataclass(frozen=True, slots=True)
class StateChange:
    """One line of an agent's history: a state change and why it happened."""

    from_state: AgentState
    to_state: AgentState
    reason: str
    at: float

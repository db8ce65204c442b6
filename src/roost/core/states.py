"""Agent lifecycle states (contract: the names are fixed by DESIGN.md)."""

from __future__ import annotations

import enum

__all__ = ["ACTIVE_STATES", "AgentState"]


class AgentState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    IDLE = "idle"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"
    RESTARTING = "restarting"
    FAILED = "failed"


#: States in which the agent has (or is getting) a live container that answers.
ACTIVE_STATES = frozenset({AgentState.RUNNING, AgentState.IDLE})

"""Commands returned by ``transition`` for the reactor to carry out.

The reactor executes them in order. Commands never carry secrets: they name
containers and agents; the reactor looks the spec up itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "CancelStart",
    "Command",
    "Notify",
    "PauseContainer",
    "RemoveContainer",
    "StartContainer",
    "StopContainer",
]


@dataclasses.dataclass(frozen=True, slots=True)
class StartContainer:
    """Bring the agent up: unpause, start or (re)create, then wait until healthy.

    ``replace``: a container to remove first (restart, crash, changed spec).
    """

    replace: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CancelStart:
    """Abandon an in-flight start procedure."""


@dataclasses.dataclass(frozen=True, slots=True)
class PauseContainer:
    container_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class StopContainer:
    container_id: str
    timeout: float
    remove: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class RemoveContainer:
    """Remove a container. ``diagnose``: it crashed; read its exit details and log
    tail first and report them with ``ExitDetails`` (off the restart's critical path)."""

    container_id: str
    diagnose: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Notify:
    """Tell the admin (webhook, log line, SSE). ``kind`` e.g. ``agent.failed``."""

    kind: str
    payload: dict[str, Any]


Command = StartContainer | CancelStart | PauseContainer | StopContainer | RemoveContainer | Notify

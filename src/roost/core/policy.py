"""Per-agent lifecycle policy: the numbers the transition function obeys.

All durations are float seconds. ``idle_timeout == 0`` disables idling;
``pause_after == 0`` skips the pause step. Built from configuration by
``roost.config``; the core never reads configuration itself.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["Policy"]


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    idle_timeout: float = 1800.0
    idle_action: Literal["pause", "stop"] = "stop"
    pause_after: float = 0.0
    #: quiet this long and a running agent shows as ``idle`` (capped by the first idle step).
    idle_mark_after: float = 30.0
    max_restarts: int = 3
    restart_backoff: float = 10.0
    restart_backoff_max: float = 300.0
    restart_reset_after: float = 600.0
    startup_timeout: float = 120.0
    stop_timeout: float = 10.0
    liveness_interval: float = 10.0
    liveness_failures: int = 3

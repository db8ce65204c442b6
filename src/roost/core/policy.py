"""What the lifecycle needs to know of an agent's settings: the ``Policy`` interface.

The core never reads configuration and never re-declares a setting: it names
the numbers it obeys here, and ``roost.config.ResolvedAgent`` (whose
``LifecycleSettings`` declare them, with their defaults) satisfies this
interface as it is. All durations are float seconds. ``idle_timeout == 0``
disables idling; ``pause_after == 0`` skips the pause step.
"""

from __future__ import annotations

from typing import Literal, Protocol

__all__ = ["Policy"]


class Policy(Protocol):
    @property
    def idle_timeout(self) -> float: ...
    @property
    def idle_action(self) -> Literal["pause", "stop"]: ...
    @property
    def pause_after(self) -> float: ...
    @property
    def idle_mark_after(self) -> float:
        """Quiet this long and a running agent shows as ``idle`` (capped by the first idle step)."""
        ...

    @property
    def max_restarts(self) -> int: ...
    @property
    def restart_backoff(self) -> float: ...
    @property
    def restart_backoff_max(self) -> float: ...
    @property
    def restart_reset_after(self) -> float: ...
    @property
    def startup_timeout(self) -> float: ...
    @property
    def stop_timeout(self) -> float: ...
    @property
    def liveness_interval(self) -> float: ...
    @property
    def liveness_failures(self) -> int: ...

"""What the lifecycle needs to know of an agent's settings: the ``Policy`` interface.

The core never reads configuration and never re-declares a setting: it names
the numbers it obeys here, and ``roost.config.ResolvedAgent`` (whose
``LifecycleSettings`` declare them, with their defaults) satisfies this
interface as it is. All durations are float seconds. ``idle_timeout == 0``
disables idling; ``pause_after == 0`` skips the pause step.

``can_pause`` is not a setting but what the backend offers (``ports.backend``
``Capabilities.can_pause``): a Docker Engine pauses, a Swarm service cannot. Where
it is False the idle ladder stops instead of pausing and a pause request is
refused. Settings answer True; :func:`without_pause` is the view of a policy on a
backend without pause.
"""

from __future__ import annotations

from typing import Literal, Protocol

__all__ = ["Policy", "without_pause"]


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
    @property
    def can_pause(self) -> bool:
        """The backend can pause the agent's container (see the module docstring)."""
        ...


def without_pause(policy: Policy) -> Policy:
    """``policy`` as it applies on a backend that cannot pause (``can_pause`` False)."""
    return _WithoutPause(policy)


class _WithoutPause:
    """Every number of the wrapped policy; ``can_pause`` False."""

    __slots__ = ("_policy",)

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    @property
    def idle_timeout(self) -> float:
        return self._policy.idle_timeout

    @property
    def idle_action(self) -> Literal["pause", "stop"]:
        return self._policy.idle_action

    @property
    def pause_after(self) -> float:
        return self._policy.pause_after

    @property
    def idle_mark_after(self) -> float:
        return self._policy.idle_mark_after

    @property
    def max_restarts(self) -> int:
        return self._policy.max_restarts

    @property
    def restart_backoff(self) -> float:
        return self._policy.restart_backoff

    @property
    def restart_backoff_max(self) -> float:
        return self._policy.restart_backoff_max

    @property
    def restart_reset_after(self) -> float:
        return self._policy.restart_reset_after

    @property
    def startup_timeout(self) -> float:
        return self._policy.startup_timeout

    @property
    def stop_timeout(self) -> float:
        return self._policy.stop_timeout

    @property
    def liveness_interval(self) -> float:
        return self._policy.liveness_interval

    @property
    def liveness_failures(self) -> int:
        return self._policy.liveness_failures

    @property
    def can_pause(self) -> bool:
        return False

"""Restart backoff as data: first delay ``restart_backoff``, doubling, capped.

``restart_delay(policy, n)`` is the delay before restart number ``n + 1``
(``n`` restarts already happened since the last reset).
"""

from __future__ import annotations

from roost.core.policy import Policy

__all__ = ["restart_delay", "restart_delays"]


def restart_delay(policy: Policy, restarts_so_far: int) -> float:
    if policy.restart_backoff <= 0:
        return 0.0
    # Cap the exponent first so a huge count cannot overflow the float.
    exponent = min(max(restarts_so_far, 0), 62)
    return float(min(policy.restart_backoff * (2.0**exponent), policy.restart_backoff_max))


def restart_delays(policy: Policy) -> tuple[float, ...]:
    """The whole sequence of delays up to ``max_restarts`` (for display and docs)."""
    return tuple(restart_delay(policy, n) for n in range(policy.max_restarts))

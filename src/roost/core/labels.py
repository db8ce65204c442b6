"""Container label keys (contract: DESIGN.md "Runtime contract"). Roost never
touches a container that does not carry ``roost.managed=true`` and its own
``roost.instance``."""

from __future__ import annotations

__all__ = [
    "AGENT",
    "CONFIG_HASH",
    "INSTANCE",
    "JOB",
    "MANAGED",
    "PROJECT",
    "SNAPSHOT",
    "agent_labels",
    "ownership",
]

MANAGED = "roost.managed"
INSTANCE = "roost.instance"
AGENT = "roost.agent"
JOB = "roost.job"
CONFIG_HASH = "roost.config-hash"
PROJECT = "roost.project"
SNAPSHOT = "roost.snapshot"


def ownership(instance: str) -> dict[str, str]:
    """The labels every container of this instance carries (used to list them)."""
    return {MANAGED: "true", INSTANCE: instance}


def agent_labels(instance: str, agent: str, config_hash: str) -> dict[str, str]:
    return {**ownership(instance), AGENT: agent, CONFIG_HASH: config_hash}

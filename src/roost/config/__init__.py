"""Roost's configuration: the ``roost.toml`` schema, its loader, and resolved agent specs.

- :mod:`roost.config.fields` — each value's check (durations, sizes, names ...);
- :mod:`roost.config.agents` — an agent's settings, declared once, grouped by concern;
- :mod:`roost.config.settings` — the file's sections, ``Settings`` and the loader;
- :mod:`roost.config.problems` — validation errors as ``file: key: message`` lines.
"""

from __future__ import annotations

from roost.config.agents import (
    AGENT_KEYS,
    CONTAINER_KEYS,
    AgentSettings,
    ContainerSettings,
    DeliverySettings,
    HoldSettings,
    LifecycleSettings,
    ResolvedAgent,
    RoutingSettings,
    SpawnedAgent,
    resolve_agent,
)
from roost.config.fields import (
    parse_capabilities,
    parse_duration,
    parse_size,
    validate_agent_name,
)
from roost.config.settings import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_NAME,
    DockerConfig,
    JobsConfig,
    NotifyConfig,
    ServerConfig,
    Settings,
    SwarmConfig,
    find_config_file,
    load_settings,
    parse_agent_settings,
    parse_settings,
)

__all__ = [
    "AGENT_KEYS",
    "CONFIG_ENV_VAR",
    "CONTAINER_KEYS",
    "DEFAULT_CONFIG_NAME",
    "AgentSettings",
    "ContainerSettings",
    "DeliverySettings",
    "DockerConfig",
    "HoldSettings",
    "JobsConfig",
    "LifecycleSettings",
    "NotifyConfig",
    "ResolvedAgent",
    "RoutingSettings",
    "ServerConfig",
    "Settings",
    "SpawnedAgent",
    "SwarmConfig",
    "find_config_file",
    "load_settings",
    "parse_agent_settings",
    "parse_capabilities",
    "parse_duration",
    "parse_settings",
    "parse_size",
    "resolve_agent",
    "validate_agent_name",
]
